"""The workflow on the time-skipping server when channels misbehave, and with the real
database activities on a SQLite file."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from activities.accounts import AccountCheck, AccountCheckInput
from activities.records import StoreActivities
from sequencer.campaign import parse_campaign
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE, TRANSIENT_ERROR_TYPE
from sequencer.models import (
    EnrollmentInput,
    EnrollmentResult,
    LateFailure,
    Lead,
    RecordInput,
    StepInput,
    StepOutcome,
    TaskOutcome,
    workflow_id_for,
)
from sequencer.storage import Store
from sequencer.temporal import lead_worker
from workflows.lead_sequence import LeadSequenceWorkflow

LEAD = Lead(
    email="ann@example.com",
    first_name="Ann",
    linkedin_url="https://www.linkedin.com/in/ann-x",
    phone="+33612345678",
)
EMAIL = {"type": "email", "subject": "Hi {{first_name}}", "body": "Hello", "wait_after": "1d"}
CAMPAIGN = parse_campaign(
    {
        "name": "Faults",
        "sender": {"email": "rep@acme.test"},
        "steps": [
            EMAIL,
            {"type": "linkedin_visit", "wait_after": "1d"},
            {**EMAIL, "wait_after": "0s"},
        ],
    }
)


class FlakyChannels:
    """Channel activities whose email fails as configured; LinkedIn always works."""

    def __init__(self, email_error: str | None, failures: int = 10**6) -> None:
        self.email_error = email_error
        self.failures = failures
        self.email_attempts = 0
        self.checks = 0
        self.recorded: list[RecordInput] = []

    @activity.defn(name="send_email")
    async def send_email(self, input: StepInput) -> StepOutcome:
        self.email_attempts += 1
        if self.email_error and self.email_attempts <= self.failures:
            non_retryable = self.email_error == ACCOUNT_INTERRUPTED_ERROR_TYPE
            raise ApplicationError("injected", type=self.email_error, non_retryable=non_retryable)
        return StepOutcome(status="sent", detail="ok")

    @activity.defn(name="linkedin_step")
    async def linkedin_step(self, input: StepInput) -> StepOutcome:
        return StepOutcome(status="sent")

    @activity.defn(name="create_task")
    async def create_task(self, input: StepInput) -> StepOutcome:
        return StepOutcome(status="waiting")

    @activity.defn(name="record_activity")
    async def record_activity(self, record: RecordInput) -> int:
        self.recorded.append(record)
        return len(record.entries)

    @activity.defn(name="check_account")
    async def check_account(self, input: AccountCheckInput) -> AccountCheck:
        """The account's health check: it works again once the injected failures are spent."""
        self.checks += 1
        return AccountCheck(ok=self.email_attempts >= self.failures, detail="checked")


async def run(env, channels, campaign=CAMPAIGN, activities=None) -> EnrollmentResult:
    task_queue = f"faults-{uuid.uuid4()}"
    async with lead_worker(
        env.client,
        task_queue,
        activities
        or [
            channels.send_email,
            channels.linkedin_step,
            channels.create_task,
            channels.record_activity,
            channels.check_account,
        ],
        end_accounts=True,
    ):
        return await env.client.execute_workflow(
            LeadSequenceWorkflow.run,
            EnrollmentInput(campaign=campaign, lead=LEAD),
            id=f"faults-{uuid.uuid4()}",
            task_queue=task_queue,
        )


def statuses(result: EnrollmentResult) -> list[tuple[str, str | None]]:
    return [(s.status.value, s.reason) for s in result.steps]


async def test_transient_errors_exhaust_retries(time_skipping_env):
    channels = FlakyChannels(TRANSIENT_ERROR_TYPE)
    result = await run(time_skipping_env, channels)
    assert channels.email_attempts == 8
    assert statuses(result) == [
        ("failed", "retries_exhausted"),
        ("sent", None),
        ("skipped", "step 1 failed"),
    ]
    assert result.status == "completed"
    assert result.unsubscribed is False


async def test_transient_error_then_success(time_skipping_env):
    channels = FlakyChannels(TRANSIENT_ERROR_TYPE, failures=2)
    result = await run(time_skipping_env, channels)
    assert channels.email_attempts == 4  # step 1 on its third attempt, then step 3
    assert [s for s, _ in statuses(result)] == ["sent", "sent", "sent"]


async def test_account_interruption_pauses_then_retries(time_skipping_env):
    channels = FlakyChannels(ACCOUNT_INTERRUPTED_ERROR_TYPE, failures=1)
    result = await run(time_skipping_env, channels)
    assert [s for s, _ in statuses(result)] == ["sent", "sent", "sent"]
    assert result.status == "completed"
    events = [e.status for r in channels.recorded for e in r.entries if e.kind == "event"]
    assert events.index("paused") < events.index("resumed")
    step_1 = result.steps[0]
    assert channels.checks == 1
    # The account's health check found it working 15 minutes later, so the step ran again
    # then, and the lead was never failed for it.
    # Durations measured in workflow time include the few milliseconds each activity takes.
    assert timedelta(minutes=15) <= step_1.at - result.enrolled_at < timedelta(minutes=16)


async def test_task_step_with_database(time_skipping_env, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'sequencer.db'}")
    channels = FlakyChannels(None)
    records = StoreActivities(store)
    campaign = parse_campaign(
        {
            "name": "Tasks",
            "sender": {"email": "rep@acme.test"},
            "steps": [
                {"type": "call", "wait_after": "2d", "instructions": "Call {{first_name}}"},
                {**EMAIL, "wait_after": "0s"},
            ],
        }
    )
    store.save_campaign(campaign)
    workflow_id = workflow_id_for(campaign.id, LEAD.key)
    store.add_enrollment(workflow_id, campaign.id, LEAD)

    task_queue = f"faults-{uuid.uuid4()}"
    async with lead_worker(
        time_skipping_env.client,
        task_queue,
        [
            channels.send_email,
            channels.linkedin_step,
            records.create_task,
            records.record_activity,
        ],
        end_accounts=True,
    ):
        handle: WorkflowHandle = await time_skipping_env.client.start_workflow(
            LeadSequenceWorkflow.run,
            EnrollmentInput(campaign=campaign, lead=LEAD),
            id=workflow_id,
            task_queue=task_queue,
        )

        tasks = []
        for _ in range(50):
            tasks = store.list_tasks("open", campaign.id)
            if tasks:
                break
            await time_skipping_env.sleep(1)
        assert [t.instructions for t in tasks] == ["Call Ann"]

        await time_skipping_env.sleep(timedelta(hours=3))
        await handle.signal("report_task", TaskOutcome(step=1, outcome="done"))
        result = await handle.result()

    assert [s.status.value for s in result.steps] == ["sent", "sent"]
    # The email waited the call's 2d counted from the call's completion, 3 hours after it opened.
    waited = result.steps[1].at - result.steps[0].at
    assert timedelta(days=2) <= waited < timedelta(days=2, minutes=1)
    assert [s.status.value for s in store.step_states(workflow_id, campaign)] == ["sent", "sent"]
    assert store.list_enrollments(campaign.id)[0].status == "completed"
    store.close()


async def test_failure_update_reports_result(time_skipping_env):
    channels = FlakyChannels(None)
    campaign = parse_campaign(
        {
            "name": "Update",
            "sender": {"email": "rep@acme.test"},
            "steps": [EMAIL, {"type": "linkedin_visit"}],
        }
    )
    task_queue = f"faults-{uuid.uuid4()}"
    async with lead_worker(
        time_skipping_env.client,
        task_queue,
        [
            channels.send_email,
            channels.linkedin_step,
            channels.create_task,
            channels.record_activity,
        ],
        end_accounts=True,
    ):
        handle = await time_skipping_env.client.start_workflow(
            LeadSequenceWorkflow.run,
            EnrollmentInput(campaign=campaign, lead=LEAD),
            id=f"faults-{uuid.uuid4()}",
            task_queue=task_queue,
        )
        for _ in range(50):
            state = await handle.query("activity", result_type=EnrollmentResult)
            if state.steps[0].status.value == "sent":
                break
            await time_skipping_env.sleep(0.1)

        with pytest.raises(WorkflowUpdateFailedError) as rejected:
            await handle.execute_update(
                "apply_failure", LateFailure(step=2, reason="bounce", bounced=True), result_type=str
            )
        assert "only email steps can bounce" in str(rejected.value.cause)

        message = await handle.execute_update(
            "apply_failure", LateFailure(step=1, reason="bounce", bounced=True), result_type=str
        )
        assert message == "step 1 marked bounced"

        with pytest.raises(WorkflowUpdateFailedError) as duplicate:
            await handle.execute_update(
                "apply_failure", LateFailure(step=1, reason="bounce", bounced=True), result_type=str
            )
        assert "already bounced" in str(duplicate.value.cause)

        result = await handle.result()
    assert [s.status.value for s in result.steps] == ["bounced", "sent"]
    assert result.unsubscribed is True
    history = await handle.fetch_history()
    updates = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    # Rejected updates leave no trace in the history.
    assert len(updates) == 1
