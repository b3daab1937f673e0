"""Interruptions through the real workflow on the time-skipping server (rules 3, 8, 9, 12).

Operator controls, pending LinkedIn invitations, sender accounts that disconnect and come
back, daily caps shared by many leads, and sending schedules. Times are checked in workflow
time, read from each step's `at`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.accounts import AccountCheck, AccountCheckInput
from sequencer.campaign import Sender, parse_campaign
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE
from sequencer.models import (
    AccountRef,
    EnrollmentInput,
    EnrollmentResult,
    InvitationAnswer,
    Lead,
    OperatorAction,
    Reassignment,
    RecordInput,
    StepInput,
    StepOutcome,
)
from sequencer.schedule import SendingSchedule
from sequencer.storage import Store, sending_slots
from sequencer.temporal import lead_worker
from workflows.lead_sequence import RELEASE, LeadSequenceWorkflow
from workflows.sender_account import AccountState, SenderAccountWorkflow, account_workflow_id

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


@pytest.fixture(params=["account workflow", "database"])
def store(request, tmp_path):
    """Where the worker books sending slots: None for the account workflows, or a database."""
    if request.param == "account workflow":
        yield None
        return
    store = Store(f"sqlite:///{tmp_path / 'slots.db'}")
    yield store
    store.close()


def lead(number: int = 0) -> Lead:
    return Lead(
        email=f"lead{number}@example.com",
        first_name="Ann",
        linkedin_url=f"https://www.linkedin.com/in/lead-{number}",
    )


def email(wait: str = "0s") -> dict[str, Any]:
    return {"type": "email", "subject": "Hi", "body": "Hello", "wait_after": wait}


def campaign(*steps: dict[str, Any], **settings: Any):
    data = {"name": f"Interruptions {uuid.uuid4().hex[:6]}", "steps": list(steps)}
    data["sender"] = settings.pop("sender", {"email": "rep@acme.test"})
    data.update(settings)
    return parse_campaign(data)


class Channels:
    """Channel activities that succeed, unless the sender account is marked broken."""

    def __init__(self) -> None:
        self.broken: set[str] = set()  # sender addresses whose sends raise an interruption
        self.senders: list[str] = []
        self.block: asyncio.Event | None = None  # when set up, each send waits for it
        self.started = asyncio.Event()
        self.invitation = "pending"

    @activity.defn(name="send_email")
    async def send_email(self, input: StepInput) -> StepOutcome:
        assert input.sender is not None
        if input.sender.email in self.broken:
            raise ApplicationError(
                "535 5.7.8 authentication failed",
                type=ACCOUNT_INTERRUPTED_ERROR_TYPE,
                non_retryable=True,
            )
        self.started.set()
        if self.block is not None:
            await self.block.wait()
        self.senders.append(input.sender.email)
        return StepOutcome(status="sent", detail="ok")

    @activity.defn(name="linkedin_step")
    async def linkedin_step(self, input: StepInput) -> StepOutcome:
        if input.step.type == "linkedin_invite":
            return StepOutcome(status="sent", invitation=self.invitation)
        return StepOutcome(status="sent")

    @activity.defn(name="create_task")
    async def create_task(self, input: StepInput) -> StepOutcome:
        return StepOutcome(status="sent")

    @activity.defn(name="record_activity")
    async def record_activity(self, record: RecordInput) -> int:
        return len(record.entries)

    @activity.defn(name="check_account")
    async def check_account(self, input: AccountCheckInput) -> AccountCheck:
        assert input.sender is not None
        working = input.sender.email not in self.broken
        return AccountCheck(ok=working, detail="works" if working else "still refused")

    def activities(self) -> list:
        return [
            self.send_email,
            self.linkedin_step,
            self.create_task,
            self.record_activity,
            self.check_account,
        ]


class Run:
    """Leads of one campaign on a worker of their own task queue.

    With a `store`, the worker books sending slots in that database, and leads start as the
    current release starts them. Without one, the account workflows book the slots, and leads
    start as the previous release did, unless `release` names another.
    """

    def __init__(
        self,
        env,
        channels: Channels,
        check_interval: timedelta | None = None,
        store: Store | None = None,
        release: str | None = None,
    ):
        self.env = env
        self.channels = channels
        self.task_queue = f"interruptions-{uuid.uuid4()}"
        self.leads: list[WorkflowHandle] = []
        self.release = release or (RELEASE if store is not None else None)
        self.worker = lead_worker(
            env.client,
            self.task_queue,
            channels.activities(),
            account_check_interval=check_interval,
            end_accounts=True,
            store=store,
        )

    async def __aenter__(self) -> Run:
        await self.worker.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        # A lead left running after a failed test would stop the shared test server's clock
        # for every later test, so end it while the worker still runs.
        for handle in self.leads:
            description = await handle.describe()
            if description.status == WorkflowExecutionStatus.RUNNING:
                await handle.terminate("the test is over")
        await self.worker.__aexit__(*exc_info)

    async def start(self, camp, lead: Lead) -> WorkflowHandle:
        handle = await self.env.client.start_workflow(
            LeadSequenceWorkflow.run,
            EnrollmentInput(campaign=camp, lead=lead, release=self.release),
            id=f"lead-{uuid.uuid4()}",
            task_queue=self.task_queue,
        )
        self.leads.append(handle)
        return handle

    def account(self, account_id: str) -> WorkflowHandle:
        return self.env.client.get_workflow_handle(account_workflow_id(account_id, self.task_queue))


async def state(handle: WorkflowHandle) -> EnrollmentResult:
    return await handle.query(LeadSequenceWorkflow.activity)


async def until(handle: WorkflowHandle, predicate, description: str) -> EnrollmentResult:
    """Poll the lead's state (in real time: the server does not skip time while polling)."""
    for _ in range(200):
        result = await state(handle)
        if predicate(result):
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting until {description}; last state: {result}")


async def result(handle: WorkflowHandle) -> EnrollmentResult:
    """Wait for the lead to end; return its state with the activity log."""
    await asyncio.wait_for(handle.result(), timeout=60)
    return await state(handle)


def offsets(result: EnrollmentResult) -> list[tuple[str, timedelta | None]]:
    return [
        (s.status.value, s.at - result.enrolled_at if s.at and result.enrolled_at else None)
        for s in result.steps
    ]


def events(result: EnrollmentResult) -> list[str]:
    return [e.status for e in result.log if e.kind == "event"]


async def update_count(handle: WorkflowHandle) -> int:
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    )


# Operator controls (rule 12)


async def test_pause_freezes_the_remaining_wait(time_skipping_env):
    env = time_skipping_env
    async with Run(env, Channels()) as run:
        handle = await run.start(campaign(email("2d"), email()), lead())
        await until(handle, lambda r: r.steps[0].status == "sent", "step 1 is sent")
        await env.sleep(DAY / 2)
        answer = await handle.execute_update(
            LeadSequenceWorkflow.control, OperatorAction(action="pause", note="holiday")
        )
        assert "paused" in answer
        await env.sleep(10 * DAY)
        paused = await state(handle)
        assert paused.status == "paused"
        assert paused.steps[1].status == "pending"
        await handle.execute_update(LeadSequenceWorkflow.control, OperatorAction(action="resume"))
        done = await result(handle)
    assert done.status == "completed"
    # Paused at 12h with 36h left; resumed at about 10d 12h; step 2 36h after that.
    step_2 = done.steps[1].at - done.enrolled_at
    assert 12 * DAY <= step_2 < 12 * DAY + HOUR


async def test_refused_controls_leave_no_trace(time_skipping_env):
    env = time_skipping_env
    async with Run(env, Channels()) as run:
        handle = await run.start(campaign(email("2d"), email()), lead())
        await until(handle, lambda r: r.steps[0].status == "sent", "step 1 is sent")
        before = await update_count(handle)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                LeadSequenceWorkflow.control, OperatorAction(action="resume")
            )
        assert "not paused" in str(refused.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                LeadSequenceWorkflow.answer_invitation, InvitationAnswer(accepted=True)
            )
        assert "no LinkedIn invitation" in str(refused.value.cause)
        assert await update_count(handle) == before
        await handle.execute_update(LeadSequenceWorkflow.control, OperatorAction(action="pause"))
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                LeadSequenceWorkflow.control, OperatorAction(action="pause")
            )
        assert "already paused" in str(refused.value.cause)
        assert await update_count(handle) == before + 1
        await handle.execute_update(LeadSequenceWorkflow.control, OperatorAction(action="remove"))
        done = await result(handle)
    assert done.status == "removed"
    assert offsets(done)[1][0] == "skipped"
    assert done.steps[1].reason == "removed"
    assert events(done)[-1] == "ended"


async def test_pause_during_an_executing_step(time_skipping_env):
    env = time_skipping_env
    channels = Channels()
    channels.block = asyncio.Event()
    async with Run(env, channels) as run:
        handle = await run.start(campaign(email("1d"), email()), lead())
        await asyncio.wait_for(channels.started.wait(), timeout=30)
        # The send is in flight: the pause is applied at once, and the step still completes.
        answer = await handle.execute_update(
            LeadSequenceWorkflow.control, OperatorAction(action="pause")
        )
        assert "paused" in answer
        channels.block.set()
        paused = await until(handle, lambda r: r.steps[0].status == "sent", "step 1 is sent")
        assert paused.status == "paused"
        channels.block = None
        await env.sleep(3 * DAY)
        assert (await state(handle)).steps[1].status == "pending"
        await handle.execute_update(LeadSequenceWorkflow.control, OperatorAction(action="resume"))
        done = await result(handle)
    # The full day of wait after step 1 was frozen, then counted from the resume at 3d.
    step_2 = done.steps[1].at - done.enrolled_at
    assert 4 * DAY <= step_2 < 4 * DAY + HOUR
    assert channels.senders == ["rep@acme.test", "rep@acme.test"]


# Pending LinkedIn invitations (rule 9)

LINKEDIN = [
    {"type": "linkedin_invite", "wait_after": "1d"},
    {"type": "linkedin_message", "message": "Thanks", "wait_after": "2d"},
    email(),
]


async def test_message_waits_for_the_invitation_then_sends(time_skipping_env):
    env = time_skipping_env
    async with Run(env, Channels()) as run:
        handle = await run.start(campaign(*LINKEDIN), lead())
        await env.sleep(3 * DAY)
        waiting = await state(handle)
        assert [s.status.value for s in waiting.steps] == ["sent", "waiting", "pending"]
        assert waiting.steps[1].reason == "invitation_pending"
        await handle.execute_update(
            LeadSequenceWorkflow.answer_invitation, InvitationAnswer(accepted=True)
        )
        done = await result(handle)
    assert done.status == "completed"
    message, follow_up = done.steps[1].at - done.enrolled_at, done.steps[2].at - done.enrolled_at
    assert 3 * DAY <= message < 3 * DAY + HOUR
    # The wait after the message counts from the acceptance (plus the send's milliseconds).
    assert 2 * DAY <= follow_up - message < 2 * DAY + MINUTE
    assert "invite_accepted" in events(done)


async def test_declined_invitation_fails_the_waiting_message(time_skipping_env):
    env = time_skipping_env
    async with Run(env, Channels()) as run:
        handle = await run.start(campaign(*LINKEDIN), lead())
        await env.sleep(2 * DAY)
        await handle.execute_update(
            LeadSequenceWorkflow.answer_invitation,
            InvitationAnswer(accepted=False, detail="declined"),
        )
        done = await result(handle)
    statuses = [(s.status.value, s.reason) for s in done.steps]
    assert statuses == [
        ("sent", None),
        ("failed", "invite_not_accepted"),
        ("sent", None),
    ]
    # The email ran as soon as the message failed, not 2 days later.
    assert done.steps[2].at - done.steps[1].at < MINUTE


async def test_unanswered_invitation_times_out(time_skipping_env):
    env = time_skipping_env
    async with Run(env, Channels()) as run:
        handle = await run.start(campaign(*LINKEDIN, invite_timeout="5d"), lead())
        done = await result(handle)
    assert done.steps[1].status == "failed"
    assert done.steps[1].reason == "invite_not_accepted"
    assert done.steps[1].detail == "not accepted within 5 days"
    # The timeout counts from the invitation, sent at 0.
    failed_at = done.steps[1].at - done.enrolled_at
    assert 5 * DAY <= failed_at < 5 * DAY + HOUR
    assert done.steps[2].at - done.steps[1].at < MINUTE


async def test_already_connected_lead_gets_the_message_on_time(time_skipping_env):
    env = time_skipping_env
    channels = Channels()
    channels.invitation = "accepted"
    async with Run(env, channels) as run:
        done = await result(await run.start(campaign(*LINKEDIN), lead()))
    assert [status for status, _ in offsets(done)] == ["sent", "sent", "sent"]
    expected = [timedelta(0), DAY, 3 * DAY]
    assert all(e <= at < e + MINUTE for (_, at), e in zip(offsets(done), expected, strict=True))


# Sender accounts (rule 8)


async def test_disconnected_account_pauses_its_leads_until_reconnected(time_skipping_env, store):
    env = time_skipping_env
    channels = Channels()
    channels.broken.add("rep@acme.test")
    async with Run(env, channels, store=store) as run:
        camp = campaign(email("1d"), email())
        first = await run.start(camp, lead(1))
        await until(first, lambda r: r.status == "paused", "the first lead pauses")
        account = run.account("email:rep@acme.test")
        status = await account.query(SenderAccountWorkflow.status)
        assert status.connected is False
        assert "535" in (status.reason or "")
        # A second lead of the account pauses without trying to send.
        second = await run.start(camp, lead(2))
        paused = await until(second, lambda r: r.status == "paused", "the second lead pauses")
        assert paused.steps[0].status == "pending"
        await env.sleep(3 * DAY)
        assert (await state(first)).status == "paused"
        channels.broken.clear()
        with pytest.raises(WorkflowUpdateFailedError):
            await account.execute_update(SenderAccountWorkflow.disconnect, "again")
        await account.execute_update(SenderAccountWorkflow.reconnect, "password fixed")
        done = [await result(first), await result(second)]
    for lead_result in done:
        assert lead_result.status == "completed"
        assert [s.status.value for s in lead_result.steps] == ["sent", "sent"]
        log = events(lead_result)
        assert log.index("paused") < log.index("resumed")
        # Step 1 ran at the reconnection; the day of wait after it was kept.
        step_1 = lead_result.steps[0].at - lead_result.enrolled_at
        assert 3 * DAY <= step_1 < 3 * DAY + HOUR
        assert DAY <= lead_result.steps[1].at - lead_result.steps[0].at < DAY + MINUTE


async def test_health_check_resumes_leads(time_skipping_env, store):
    env = time_skipping_env
    channels = Channels()
    channels.broken.add("rep@acme.test")
    async with Run(env, channels, check_interval=timedelta(minutes=15), store=store) as run:
        handle = await run.start(campaign(email()), lead())
        await until(handle, lambda r: r.status == "paused", "the lead pauses")
        await env.sleep(HOUR)
        assert (await state(handle)).status == "paused"
        channels.broken.clear()
        done = await result(handle)
    assert done.status == "completed"
    assert "resumed" in events(done)
    sent_at = done.steps[0].at - done.enrolled_at
    assert HOUR <= sent_at <= HOUR + timedelta(minutes=16)


async def test_reassign_moves_a_paused_lead_to_another_sender(time_skipping_env, store):
    env = time_skipping_env
    channels = Channels()
    channels.broken.add("rep@acme.test")
    async with Run(env, channels, store=store) as run:
        handle = await run.start(campaign(email()), lead())
        await until(handle, lambda r: r.status == "paused", "the lead pauses")
        # Operators find the leads waiting on an account with these two search attributes.
        # The lead sets them after writing its log, a moment after the query shows the pause.
        await until_attributes(
            handle,
            {"SequencerAccount": "email:rep@acme.test", "SequencerStage": "paused-account"},
        )
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                LeadSequenceWorkflow.reassign,
                Reassignment(sender=Sender(email="rep@acme.test")),
            )
        assert "already sends from" in str(refused.value.cause)
        answer = await handle.execute_update(
            LeadSequenceWorkflow.reassign, Reassignment(sender=Sender(email="backup@acme.test"))
        )
        assert "backup@acme.test" in answer
        done = await result(handle)
        waiting = (
            await run.account("email:rep@acme.test").query(SenderAccountWorkflow.status)
        ).waiting_leads
    assert done.status == "completed"
    assert channels.senders == ["backup@acme.test"]
    assert waiting == 0
    assert await attributes(handle) == {"SequencerStage": "ended"}


async def test_account_attribute_follows_next_step(time_skipping_env):
    env = time_skipping_env
    channels = Channels()
    async with Run(env, channels) as run:
        camp = campaign(
            email("1d"),
            {"type": "call", "wait_after": "1d"},
            {"type": "linkedin_visit"},
            linkedin={"account": "rep-linkedin"},
        )
        handle = await run.start(camp, lead())
        await until(handle, lambda r: r.steps[0].status == "sent", "the email is sent")
        # No account in use before a call: a person places it.
        await until_attributes(handle, {"SequencerStage": "step-2-call"})
        await env.sleep(DAY + HOUR)
        await until_attributes(
            handle,
            {
                "SequencerStage": "step-3-linkedin_visit",
                "SequencerAccount": "linkedin:rep-linkedin",
            },
        )
        done = await result(handle)
    assert done.status == "completed"
    assert await attributes(handle) == {"SequencerStage": "ended"}


async def attributes(handle: WorkflowHandle) -> dict[str, str]:
    """The lead's stage and account search attributes, as the Temporal UI shows them."""
    found = (await handle.describe()).typed_search_attributes
    return {
        pair.key.name: pair.value
        for pair in found
        if pair.key.name in ("SequencerStage", "SequencerAccount")
    }


async def until_attributes(handle: WorkflowHandle, expected: dict[str, str]) -> None:
    for _ in range(200):
        found = await attributes(handle)
        if found == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"search attributes {found}, expected {expected}")


# Daily caps


def busiest_day(times: list[datetime]) -> int:
    """Return the most sends within any 24 hours, checking every window that starts at a send."""
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + DAY) for start in times)


async def test_daily_cap_across_200_leads(time_skipping_env, store):
    env = time_skipping_env
    channels = Channels()
    camp = campaign(email(), sender={"email": "rep@acme.test", "daily_limit": 50})
    async with Run(env, channels, store=store) as run:
        handles = [await run.start(camp, lead(n)) for n in range(200)]
        results = []
        for handle in handles:
            results.append(await result(handle))
    sent = [r.steps[0].at for r in results]
    assert all(r.status == "completed" for r in results)
    assert len(channels.senders) == 200
    assert busiest_day(sent) == 50
    # Served in four days: each batch of 50 waits for the 24 hours after the one before.
    start = min(sent)
    assert max(sent) - start < 3 * DAY + HOUR
    by_day = Counter((t - start) // DAY for t in sent)
    assert sorted(by_day.values()) == [50, 50, 50, 50]
    paused = [r for r in results if "paused" in events(r)]
    assert len(paused) == 150
    if store is not None:
        # Booked in the database: the account's workflow never started, and the leads of the
        # current release record no patch marker.
        assert not await started(run.account("email:rep@acme.test"))
        with store.engine.connect() as connection:
            assert (
                connection.execute(select(func.count()).select_from(sending_slots)).scalar() == 200
            )
        history = await handles[0].fetch_history()
        assert not any(e.HasField("marker_recorded_event_attributes") for e in history.events)
    else:
        assert await started(run.account("email:rep@acme.test"))


async def started(handle: WorkflowHandle) -> bool:
    """Return whether the workflow was ever started."""
    try:
        await handle.describe()
    except RPCError as error:
        assert error.status == RPCStatusCode.NOT_FOUND
        return False
    return True


async def test_reconnect_while_the_cap_is_reached(time_skipping_env):
    env = time_skipping_env
    channels = Channels()
    camp = campaign(email(), sender={"email": "rep@acme.test", "daily_limit": 1})
    async with Run(env, channels) as run:
        first = await run.start(camp, lead(1))
        # One lead at a time, so that the first one gets the day's only slot.
        await until(first, lambda r: r.steps[0].status == "sent", "the first lead is sent")
        second = await run.start(camp, lead(2))
        await until(second, lambda r: r.status == "paused", "the second lead hits the cap")
        account = run.account("email:rep@acme.test")
        await env.sleep(HOUR)
        await account.execute_update(SenderAccountWorkflow.disconnect, "maintenance")
        await account.execute_update(SenderAccountWorkflow.reconnect, "back")
        # The reconnection does not lift the cap: the second lead still waits for its slot.
        assert (await state(second)).status == "paused"
        done = [await result(first), await result(second)]
    assert DAY <= done[1].steps[0].at - done[0].steps[0].at < DAY + 2 * MINUTE
    assert busiest_day([r.steps[0].at for r in done]) == 1


async def test_disconnect_stops_a_lead_that_holds_a_slot(time_skipping_env, store):
    """A lead waiting for its slot under the daily limit does not send through an account
    disconnected meanwhile: it pauses on the account and sends once it is reconnected."""
    env = time_skipping_env
    channels = Channels()
    sender = Sender(email="rep@acme.test", daily_limit=1)
    camp = campaign(email(), sender=sender.model_dump(mode="json"))
    account = AccountRef(id=sender.account_id, channel="email", sender=sender)
    async with Run(env, channels, store=store, release=RELEASE) as run:
        first = await run.start(camp, lead(1))
        await until(first, lambda r: r.steps[0].status == "sent", "the first lead is sent")
        second = await run.start(camp, lead(2))
        await until(second, lambda r: r.status == "paused", "the second lead hits the limit")
        slots = run.worker.accounts
        await slots.update_account(account, run.task_queue, "disconnect", "mailbox migration")
        await env.sleep(2 * DAY)
        paused = await state(second)
        assert paused.status == "paused"
        assert paused.log[-1].reason == "email:rep@acme.test is disconnected"
        assert channels.senders == ["rep@acme.test"]
        await slots.update_account(account, run.task_queue, "reconnect", "migrated")
        done = await result(second)
    assert done.status == "completed"
    assert channels.senders == ["rep@acme.test", "rep@acme.test"]


async def test_min_spacing_between_two_sends(time_skipping_env, store):
    env = time_skipping_env
    camp = campaign(email(), sender={"email": "rep@acme.test", "min_spacing": "10m"})
    async with Run(env, Channels(), store=store) as run:
        handles = [await run.start(camp, lead(n)) for n in range(4)]
        done = [await result(h) for h in handles]
    times = sorted(r.steps[0].at for r in done)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Sends go out at their slots, ten minutes apart, give or take the send's milliseconds.
    assert all(abs(gap - timedelta(minutes=10)) < timedelta(seconds=1) for gap in gaps)
    # Spacing is a plain wait, not a pause.
    assert all("paused" not in events(r) for r in done)


async def test_campaign_new_leads_per_day(time_skipping_env, store):
    env = time_skipping_env
    camp = campaign(email(), max_new_leads_per_day=2)
    async with Run(env, Channels(), store=store) as run:
        handles = [await run.start(camp, lead(n)) for n in range(5)]
        done = [await result(h) for h in handles]
    times = sorted(r.steps[0].at for r in done)
    start = times[0]
    assert [(t - start) // DAY for t in times] == [0, 0, 1, 1, 2]


# Sending schedule (rule 3)


async def test_steps_run_only_inside_the_schedule(time_skipping_env):
    env = time_skipping_env
    now = await env.get_current_time()
    # A window that opens 3 hours from now and lasts 2 hours, every day, in UTC.
    opens = (now + 3 * HOUR).replace(minute=0, second=0, microsecond=0)
    window = {
        "timezone": "UTC",
        "days": "mon-sun",
        "start": opens.strftime("%H:%M"),
        "end": (opens + 2 * HOUR).strftime("%H:%M"),
    }
    if opens.hour >= 22:
        pytest.skip("the window would run past midnight")
    camp = campaign(email("1d"), email("30m"), email(), schedule=window)
    async with Run(env, Channels()) as run:
        done = await result(await run.start(camp, lead()))
    schedule = SendingSchedule.model_validate(window)
    sent = [s.at for s in done.steps]
    assert all(schedule.allows(at) for at in sent)
    assert opens <= sent[0] < opens + MINUTE
    assert DAY <= sent[1] - sent[0] < DAY + MINUTE
    assert timedelta(minutes=30) <= sent[2] - sent[1] < timedelta(minutes=31)


async def test_account_continues_as_new_and_keeps_its_bookings(time_skipping_env):
    env = time_skipping_env
    sender = Sender(email="rep@acme.test", daily_limit=4)
    camp = campaign(email(), sender=sender.model_dump(mode="json"))
    async with Run(env, Channels()) as run:
        account = run.account(sender.account_id)
        first_run = await env.client.start_workflow(
            SenderAccountWorkflow.run,
            AccountState(
                account=AccountRef(id=sender.account_id, channel="email", sender=sender),
                updates_per_run=5,
            ),
            id=account.id,
            task_queue=run.task_queue,
        )
        handles = [await run.start(camp, lead(n)) for n in range(12)]
        done = [await result(h) for h in handles]
        latest = await account.describe()
    assert all(r.status == "completed" for r in done)
    # Bookings made before each continue-as-new still count against the cap after it.
    assert busiest_day([r.steps[0].at for r in done]) == 4
    assert latest.run_id != first_run.result_run_id


async def test_resumed_or_reassigned_lead_keeps_its_place(time_skipping_env, store):
    env = time_skipping_env
    channels = Channels()
    camp = campaign(email(), sender={"email": "rep@acme.test", "daily_limit": 1})
    async with Run(env, channels, store=store) as run:
        # One lead at a time, so that they book the slots in this order.
        first = await run.start(camp, lead(1))
        await until(first, lambda r: r.steps[0].status == "sent", "the first lead is sent")
        second = await run.start(camp, lead(2))
        await until(second, lambda r: r.status == "paused", "the second lead hits the limit")
        third = await run.start(camp, lead(3))
        await until(third, lambda r: r.status == "paused", "the third lead hits the limit")
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await second.execute_update(
                LeadSequenceWorkflow.control, OperatorAction(action="resume")
            )
        assert "waits for a sending slot" in str(refused.value.cause)
        # An operator's pause and resume put the lead back on its slot, paused by the limit.
        await second.execute_update(LeadSequenceWorkflow.control, OperatorAction(action="pause"))
        await second.execute_update(LeadSequenceWorkflow.control, OperatorAction(action="resume"))
        back = await until(
            second, lambda r: r.status == "paused" and events(r)[-1] == "paused", "re-paused"
        )
        assert back.log[-1].reason == "daily limit of email:rep@acme.test reached"
        # Moving the third lead to another sender sends at once from there.
        await third.execute_update(
            LeadSequenceWorkflow.reassign, Reassignment(sender=Sender(email="backup@acme.test"))
        )
        moved = await result(third)
        done = [await result(first), await result(second)]
    assert moved.steps[0].at - moved.enrolled_at < MINUTE
    # The second lead was sent at the slot it was given first, despite the pause and resume.
    first_pause = next(e for e in done[1].log if e.status == "paused")
    slot = datetime.strptime(first_pause.detail.split("next slot at ")[1], "%Y-%m-%d %H:%M UTC")
    assert abs(done[1].steps[0].at - slot.replace(tzinfo=UTC)) < MINUTE
    assert done[1].steps[0].at - done[0].steps[0].at > DAY
    assert sorted(channels.senders) == ["backup@acme.test", "rep@acme.test", "rep@acme.test"]


async def test_operator_disconnect_outlasts_the_health_check(time_skipping_env):
    env = time_skipping_env
    channels = Channels()
    async with Run(env, channels, check_interval=timedelta(minutes=15)) as run:
        handle = await run.start(campaign(email("1d"), email()), lead())
        await until(handle, lambda r: r.steps[0].status == "sent", "step 1 is sent")
        account = run.account("email:rep@acme.test")
        await account.execute_update(SenderAccountWorkflow.disconnect, "mailbox migration")
        await env.sleep(2 * DAY)
        # The account works, but only an operator's reconnect ends an operator's disconnect.
        assert (await account.query(SenderAccountWorkflow.status)).connected is False
        assert (await state(handle)).status == "paused"
        await account.execute_update(SenderAccountWorkflow.reconnect, "migrated")
        done = await result(handle)
    assert done.status == "completed"
    assert done.steps[1].at - done.enrolled_at >= 2 * DAY
