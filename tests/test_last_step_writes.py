"""The last step's activity writes the lead's end: the same log the workflow holds, on the
time-skipping server with a real SQLite store."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError

from activities.records import StoreActivities
from sequencer.campaign import parse_campaign
from sequencer.channels import StepStatus
from sequencer.models import EnrollmentInput, Lead, OperatorAction, StepInput, StepOutcome
from sequencer.simulate import LeadScript, SimulatedChannels
from sequencer.storage import Store
from sequencer.temporal import lead_worker
from workflows.lead_sequence import RELEASE, LeadSequenceWorkflow

LEAD = Lead(
    email="ann@example.com", first_name="Ann", linkedin_url="https://www.linkedin.com/in/ann"
)


def campaign(last_wait: str = "0s"):
    return parse_campaign(
        {
            "name": f"Last step {uuid.uuid4().hex[:6]}",
            "sender": {"email": "rep@acme.test"},
            "steps": [
                {"type": "email", "subject": "Hi", "body": "One", "wait_after": last_wait},
                {"type": "linkedin_visit"},
                {"type": "email", "subject": "Again", "body": "Two"},
            ],
        }
    )


@pytest.fixture
def store(tmp_path):
    result = Store(f"sqlite:///{tmp_path / 'sequencer.db'}")
    yield result
    result.close()


class HeldLastEmail(SimulatedChannels):
    """Simulated channels whose email of step 3 waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__({})
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    @activity.defn(name="send_email")
    async def send_email(self, input: StepInput) -> StepOutcome:
        if input.step_number == 3:
            self.started.set()
            await self.go.wait()
        return StepOutcome(status=StepStatus.SENT, detail="simulated")


async def run_lead(
    env, store: Store, channels: SimulatedChannels, camp, body=None, lead: Lead = LEAD
):
    """Run one lead to its end on a worker that books and writes in `store`."""
    store.save_campaign(camp)
    workflow_id = f"lead-{uuid.uuid4()}"
    store.add_enrollment(workflow_id, camp.id, lead)
    records = StoreActivities(store)
    queue = f"last-step-{uuid.uuid4()}"
    async with lead_worker(
        env.client,
        queue,
        [channels.send_email, channels.linkedin_step, records.record_activity],
        account_check_interval=None,
        end_accounts=True,
        store=store,
    ):
        handle = await env.client.start_workflow(
            LeadSequenceWorkflow.run,
            EnrollmentInput(campaign=camp, lead=lead, release=RELEASE),
            id=workflow_id,
            task_queue=queue,
        )
        if body is not None:
            await body(handle)
        await asyncio.wait_for(handle.result(), timeout=60)
        state = await handle.query(LeadSequenceWorkflow.activity)
    return handle, state


async def log_writes(handle: WorkflowHandle) -> int:
    history = await handle.fetch_history()
    return sum(
        1
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "record_activity"
    )


async def test_last_step_writes_the_end(time_skipping_env, store):
    handle, state = await run_lead(time_skipping_env, store, SimulatedChannels({}), campaign())
    assert state.status == "completed"
    assert store.log(handle.id) == state.log
    assert [e.status for e in state.log][-1] == "ended"
    assert store.get_enrollment_by_workflow(handle.id).status == "completed"
    assert await log_writes(handle) == 0
    # Channel queues are off by default: every step ran on the lead's own queue.
    history = await handle.fetch_history()
    queues = {
        e.activity_task_scheduled_event_attributes.task_queue.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    assert queues == {(await handle.describe()).task_queue}


async def test_end_outside_the_schedule_in_the_leads_timezone(time_skipping_env, store):
    """The last step's activity rebuilds the lead's schedule, in the lead's timezone: the
    wait after the last step falls outside it, which the log notes before the end."""
    now = await time_skipping_env.get_current_time()
    tokyo = ZoneInfo("Asia/Tokyo")
    # A two-hour window in Tokyo that starts about three hours from now, moved to 01:00 when
    # it would run past midnight, so that it is closed now and opens within a day.
    local = now.astimezone(tokyo)
    start = (local.hour + 3) % 24
    if start > 21:
        start = 1
    opens = local.replace(hour=start, minute=0, second=0, microsecond=0)
    if opens <= local:
        opens += timedelta(days=1)
    camp = parse_campaign(
        {
            "name": f"Last step {uuid.uuid4().hex[:6]}",
            "sender": {"email": "rep@acme.test"},
            "schedule": {
                "timezone": "UTC",
                "days": "mon-sun",
                "start": f"{start:02d}:00",
                "end": f"{start + 2:02d}:00",
            },
            "steps": [
                {"type": "email", "subject": "Hi", "body": "One"},
                {"type": "email", "subject": "Again", "body": "Two", "wait_after": "6h"},
            ],
        }
    )
    lead = LEAD.model_copy(update={"timezone": "Asia/Tokyo"})

    handle, state = await run_lead(time_skipping_env, store, SimulatedChannels({}), camp, lead=lead)
    assert state.status == "completed"
    assert abs(state.steps[0].at - opens) < timedelta(minutes=1)
    assert [e.status for e in state.log if e.kind == "event"][-2:] == ["waiting", "ended"]
    assert store.log(handle.id) == state.log
    assert await log_writes(handle) == 1  # when it waited for the window, before step 1


async def test_rest_before_the_end(time_skipping_env, store):
    handle, state = await run_lead(time_skipping_env, store, SimulatedChannels({}), campaign("1d"))
    assert state.status == "completed"
    assert store.log(handle.id) == state.log
    # Once when the lead went to sleep after step 1; the end came with step 3.
    assert await log_writes(handle) == 1


async def test_failed_last_step_is_written_by_the_workflow(time_skipping_env, store):
    channels = SimulatedChannels({LEAD.key: LeadScript(steps={3: "fail"})})
    handle, state = await run_lead(time_skipping_env, store, channels, campaign())
    assert state.status == "stopped"
    assert [s.status for s in state.steps] == ["sent", "sent", "failed"]
    assert store.log(handle.id) == state.log
    assert store.get_enrollment_by_workflow(handle.id).status == "stopped"
    assert await log_writes(handle) == 1


async def test_pause_during_the_last_step_loses_no_entry(time_skipping_env, store):
    channels = HeldLastEmail()
    answers: list[str] = []

    async def pause_while_held(handle: WorkflowHandle) -> None:
        await asyncio.wait_for(channels.started.wait(), timeout=30)
        pause = asyncio.create_task(
            handle.execute_update(LeadSequenceWorkflow.control, OperatorAction(action="pause"))
        )
        await asyncio.sleep(0.5)
        channels.go.set()
        try:
            answers.append(await pause)
        except WorkflowUpdateFailedError as error:
            answers.append(str(error.cause))

    handle, state = await run_lead(
        time_skipping_env, store, channels, campaign(), body=pause_while_held
    )
    assert [s.status for s in state.steps] == ["sent", "sent", "sent"]
    assert state.status == "completed"
    assert len(answers) == 1
    assert store.log(handle.id) == state.log
    assert sorted(e.seq for e in state.log) == list(range(1, len(state.log) + 1))
