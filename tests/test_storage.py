"""The database layer on a real SQLite file: idempotent writes and stats from the log."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import OperationalError

from sequencer.campaign import parse_campaign
from sequencer.models import Lead, LogEntry, RecordInput, TaskInput, workflow_id_for
from sequencer.storage import NotFoundError, Store

T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
CAMPAIGN = parse_campaign(
    {
        "name": "Storage test",
        "sender": {"email": "rep@acme.test"},
        "steps": [
            {"type": "email", "subject": "Hi", "body": "Hello", "wait_after": "1d"},
            {"type": "linkedin_visit", "wait_after": "1d"},
            {"type": "email", "subject": "Hi again", "body": "Hello"},
        ],
    }
)


@pytest.fixture
def store(database_url):
    """A store on SQLite, then on PostgreSQL."""
    result = Store(database_url)
    result.save_campaign(CAMPAIGN)
    yield result
    result.close()


def step_entry(seq: int, step: int, status: str, minutes: int = 0, reason: str | None = None):
    kind = CAMPAIGN.steps[step - 1]
    return LogEntry(
        seq=seq,
        at=T0 + timedelta(minutes=minutes),
        kind="step",
        status=status,
        step=step,
        step_type=kind.type,
        channel=kind.channel.value,
        reason=reason,
    )


def enroll(store: Store, email: str) -> str:
    lead = Lead(email=email)
    workflow_id = workflow_id_for(CAMPAIGN.id, lead.key)
    assert store.add_enrollment(workflow_id, CAMPAIGN.id, lead)
    return workflow_id


def record(store: Store, workflow_id: str, status: str, entries, address=None) -> int:
    return store.record(
        RecordInput(
            workflow_id=workflow_id,
            campaign_id=CAMPAIGN.id,
            campaign_name=CAMPAIGN.name,
            lead_key="x",
            status=status,
            unsubscribed=address is not None,
            entries=entries,
            unsubscribe_address=address,
        )
    )


def test_enrollment_added_once(store):
    lead = Lead(email="ann@example.com")
    workflow_id = workflow_id_for(CAMPAIGN.id, lead.key)
    assert store.add_enrollment(workflow_id, CAMPAIGN.id, lead) is True
    assert store.add_enrollment(workflow_id, CAMPAIGN.id, lead) is False
    assert len(store.list_enrollments(CAMPAIGN.id)) == 1


def test_retried_record_writes_once(store):
    workflow_id = enroll(store, "ann@example.com")
    entries = [step_entry(1, 1, "sent"), step_entry(2, 2, "sent", 5)]
    assert record(store, workflow_id, "running", entries) == 2
    assert record(store, workflow_id, "running", entries) == 0
    assert len(store.log(workflow_id)) == 2


def test_stats_match_step_states(store):
    ann = enroll(store, "ann@example.com")
    ben = enroll(store, "ben@example.com")
    record(
        store,
        ann,
        "completed",
        [step_entry(1, 1, "sent"), step_entry(2, 2, "sent"), step_entry(3, 3, "sent")],
    )
    record(
        store,
        ben,
        "completed",
        [
            step_entry(1, 1, "sent"),
            step_entry(2, 1, "bounced", 60, "bounce"),
            step_entry(3, 3, "skipped", 60, "step 1 bounced"),
            step_entry(4, 2, "sent", 60),
        ],
        address="ben@example.com",
    )

    stats = store.stats(CAMPAIGN.id)
    assert stats.leads["completed"] == 2
    assert stats.unsubscribed == 1
    assert stats.steps[1].as_dict() == {
        "sent": 1,
        "failed": 0,
        "bounced": 1,
        "skipped": 0,
        "waiting": 0,
        "failure_rate": 0.5,
    }
    assert stats.channels["email"].sent == 2
    assert stats.channels["email"].bounced == 1
    assert stats.channels["email"].skipped == 1
    assert stats.channels["linkedin"].sent == 2
    assert stats.channels["linkedin"].failure_rate == 0.0

    states = [s.status.value for s in store.step_states(ben, CAMPAIGN)]
    assert states == ["bounced", "sent", "skipped"]
    assert store.is_suppressed("BEN@example.com ")


def test_final_status_cancels_open_tasks(store):
    workflow_id = enroll(store, "ann@example.com")
    task = store.create_task(
        TaskInput(
            workflow_id=workflow_id,
            campaign_id=CAMPAIGN.id,
            lead_key="ann@example.com",
            step_number=2,
            step_type="call",
            instructions="Call Ann",
        )
    )
    again = store.create_task(
        TaskInput(
            workflow_id=workflow_id,
            campaign_id=CAMPAIGN.id,
            lead_key="ann@example.com",
            step_number=2,
            step_type="call",
            instructions="Call Ann",
        )
    )
    assert again.id == task.id
    record(store, workflow_id, "replied", [step_entry(1, 2, "skipped", 1, "replied")])
    assert store.get_task(task.id).status == "cancelled"
    assert store.close_task(task.id, "done") is False


def test_unknown_campaign_lists_known(store):
    with pytest.raises(NotFoundError, match="storage-test"):
        store.get_campaign("nope")


def test_unknown_lead_named(store):
    with pytest.raises(NotFoundError, match="'zed@example.com' is not enrolled"):
        store.get_enrollment(CAMPAIGN.id, "zed@example.com")


def test_lead_found_by_any_spelling(store):
    enroll(store, "ann@example.com")
    assert store.get_enrollment(CAMPAIGN.id, "  ANN@Example.com").lead_key == "ann@example.com"


def test_external_event_recorded_once(store):
    workflow_id = enroll(store, "ann@example.com")
    entry = step_entry(0, 1, "bounced", 90, "bounce")
    assert store.record_external(workflow_id, "bounce:1:0", entry) is True
    assert store.record_external(workflow_id, "bounce:1:0", entry) is False
    assert len(store.log(workflow_id)) == 1


# The worker's write queue: writes that wait together share one transaction.


def new_entry(workflow_id: str) -> RecordInput:
    return RecordInput(
        workflow_id=workflow_id,
        campaign_id=CAMPAIGN.id,
        campaign_name=CAMPAIGN.name,
        lead_key="x",
        status="running",
        entries=[step_entry(1, 1, "sent")],
    )


async def test_concurrent_writes_share_transaction(store):
    workflow_ids = [enroll(store, f"lead{number}@example.com") for number in range(20)]
    counts = await asyncio.gather(
        *(store.writes.run(store.record_in, new_entry(w)) for w in workflow_ids)
    )
    assert counts == [1] * 20
    assert store.writes.transactions == 1
    assert store.writes.writes == 20
    assert [store.workflow_entries(w) for w in workflow_ids] == [1] * 20


def fails(connection, message: str) -> None:
    raise ValueError(message)


async def test_failed_write_reaches_its_caller(store):
    """The others run again, each in a transaction of its own, and are committed."""
    first, second = (enroll(store, f"lead{n}@example.com") for n in range(2))
    results = await asyncio.gather(
        store.writes.run(store.record_in, new_entry(first)),
        store.writes.run(fails, "no such step"),
        store.writes.run(store.record_in, new_entry(second)),
        return_exceptions=True,
    )
    assert results[0] == 1
    assert results[2] == 1
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "no such step"
    assert store.workflow_entries(first) == 1
    assert store.workflow_entries(second) == 1


def unavailable(connection) -> None:
    raise OperationalError("INSERT", {}, Exception("database is locked"))


async def test_unavailable_database_fails_whole_batch(store):
    """A locked or unreachable database fails all of them at once, and none stays written:
    running each again alone could wait for the lock once per write."""
    workflow_id = enroll(store, "lead@example.com")
    results = await asyncio.gather(
        store.writes.run(store.record_in, new_entry(workflow_id)),
        store.writes.run(unavailable),
        return_exceptions=True,
    )
    assert all(isinstance(result, OperationalError) for result in results)
    assert store.workflow_entries(workflow_id) == 0
    # The queue goes on: a later write is committed.
    assert await store.writes.run(store.record_in, new_entry(workflow_id)) == 1


async def test_cancelled_caller_leaves_others_results(store):
    workflow_ids = [enroll(store, f"lead{number}@example.com") for number in range(3)]
    calls = [
        asyncio.ensure_future(store.writes.run(store.record_in, new_entry(w))) for w in workflow_ids
    ]
    await asyncio.sleep(0)
    calls[1].cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 1
    assert results[2] == 1
    assert isinstance(results[1], asyncio.CancelledError)
    # The cancelled caller's write may or may not have run. The queue is not stuck.
    assert await store.writes.run(store.record_in, new_entry(workflow_ids[1])) in (0, 1)
    assert store.workflow_entries(workflow_ids[1]) == 1
