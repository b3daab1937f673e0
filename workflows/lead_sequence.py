"""LeadSequenceWorkflow: one durable workflow per enrollment, driving the lead machine.

The workflow is glue. Signal handlers only queue what the world reports. The main loop applies
queued events to the machine, gets the next action from it, and carries that action out: a
channel activity, a durable timer that any event cuts short, or a wait for a person.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributePair
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from sequencer.channels import Channel, EnrollmentStatus, Reason, StepStatus
    from sequencer.durations import format_duration
    from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE
    from sequencer.models import (
        SEARCH_ATTRIBUTE_CAMPAIGN,
        SEARCH_ATTRIBUTE_STAGE,
        SEARCH_ATTRIBUTE_STATUS,
        WORKFLOW_TYPE,
        EnrollmentInput,
        EnrollmentResult,
        LateFailure,
        LogEntry,
        RecordInput,
        Reply,
        StepInput,
        StepOutcome,
        TaskOutcome,
    )
    from workflows.lead_machine import (
        AwaitResume,
        AwaitTask,
        Execute,
        Finished,
        Ignored,
        LeadSequence,
        Sleep,
        plan_from_steps,
    )

CAMPAIGN_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_CAMPAIGN)
STATUS_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_STATUS)
STAGE_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_STAGE)

# Activity names by channel. A new channel adds one line here and one activity module.
ACTIVITY_FOR_CHANNEL = {
    Channel.EMAIL: "send_email",
    Channel.LINKEDIN: "linkedin_step",
    Channel.PHONE: "create_task",
    Channel.MANUAL: "create_task",
}

# Transient errors (SMTP 4xx, HTTP 429 and 5xx, network errors) are retried with backoff:
# 5s, 10s, 20s... capped at 5 minutes, 8 attempts in all (about 12 minutes). After that the
# step fails with reason retries_exhausted.
CHANNEL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    maximum_attempts=8,
    non_retryable_error_types=[ACCOUNT_INTERRUPTED_ERROR_TYPE],
)
RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=20,
)
# Patch id for recording an event's log entries before the next step runs.
RECORD_EVENTS_FIRST = "record-events-first"
# An interrupted sender account pauses the enrollment; the step is tried again after this long.
ACCOUNT_RETRY_INTERVAL = timedelta(minutes=15)


@workflow.defn(name=WORKFLOW_TYPE)
class LeadSequenceWorkflow:
    @workflow.init
    def __init__(self, input: EnrollmentInput) -> None:
        self._input = input
        self._machine = LeadSequence(plan_from_steps(input.campaign.steps))
        # Events waiting for the main loop, each with a number so that an update can wait for
        # the result of its own event.
        self._inbox: list[tuple[int, LateFailure | Reply | TaskOutcome]] = []
        self._received = 0
        self._results: dict[int, str] = {}
        self._awaited: set[int] = set()
        # Update results, held back until the event's log entries are written, so that a
        # caller who reads the activity log next finds the change.
        self._answers: dict[int, str] = {}
        self._search_attributes: tuple[str, str] | None = None
        self._resume_at = None
        self._ignored: list[str] = []

    @workflow.run
    async def run(self, input: EnrollmentInput) -> EnrollmentResult:
        machine = self._machine
        machine.begin(workflow.now())
        await self._record()

        while not machine.has_ended:
            # Record what an event changed before acting on it, so that an update's caller sees
            # the change in the database. Histories from before this change acted first.
            if self._apply_inbox() and workflow.patched(RECORD_EVENTS_FIRST):
                await self._record()
            action = machine.next_action(workflow.now())
            if isinstance(action, Finished):
                break
            if isinstance(action, Execute):
                await self._execute(action.step)
            elif isinstance(action, Sleep):
                await self._sleep_until(action)
            elif isinstance(action, AwaitTask):
                self._publish(f"step {action.step}: waiting for a person")
                await workflow.wait_condition(lambda: bool(self._inbox))
            elif isinstance(action, AwaitResume):
                await self._await_resume()
            await self._record()

        # Events that arrived while the last step ran are applied after the end: a late bounce
        # is still recorded and still unsubscribes. An update handler waits for the loop to
        # apply its event, so drain the inbox until no handler is left running.
        while True:
            self._apply_inbox()
            await self._record()
            await workflow.wait_condition(
                lambda: bool(self._inbox) or workflow.all_handlers_finished()
            )
            if not self._inbox:
                break
        return EnrollmentResult(
            status=machine.status.value,
            unsubscribed=machine.unsubscribed,
            steps=[step.model_copy() for step in machine.steps],
            enrolled_at=machine.enrolled_at,
            ignored=list(self._ignored),
        )

    # What the world reports. Handlers queue; the main loop applies, so transitions happen in
    # one place and in order.

    @workflow.signal
    def report_failure(self, failure: LateFailure) -> None:
        self._receive(failure)

    @workflow.signal
    def report_reply(self, reply: Reply) -> None:
        self._receive(reply)

    @workflow.signal
    def report_task(self, outcome: TaskOutcome) -> None:
        self._receive(outcome)

    @workflow.update
    async def apply_failure(self, failure: LateFailure) -> str:
        """Apply a late failure and return what it did, once the main loop has applied it."""
        number = self._receive(failure)
        self._awaited.add(number)
        await workflow.wait_condition(lambda: number in self._results)
        return self._results.pop(number)

    @apply_failure.validator
    def _validate_failure(self, failure: LateFailure) -> None:
        # A rejected update leaves no trace in the history, so a duplicate or mistaken report
        # costs nothing. The check runs again when the event is applied.
        problem = self._machine.check_late_failure(failure.step, failure.bounced)
        if problem:
            raise ValueError(problem)

    def _receive(self, event: LateFailure | Reply | TaskOutcome) -> int:
        self._received += 1
        self._inbox.append((self._received, event))
        return self._received

    @workflow.query
    def activity(self) -> EnrollmentResult:
        return EnrollmentResult(
            status=self._machine.status.value,
            unsubscribed=self._machine.unsubscribed,
            steps=[step.model_copy() for step in self._machine.steps],
            enrolled_at=self._machine.enrolled_at,
            log=list(self._machine.log),
            ignored=list(self._ignored),
        )

    # Phases

    def _apply_inbox(self) -> bool:
        """Apply queued events to the machine; return whether there were any."""
        applied = bool(self._inbox)
        now = workflow.now()
        while self._inbox:
            number, event = self._inbox.pop(0)
            if isinstance(event, LateFailure):
                result = self._machine.late_failure(
                    event.step, event.reason, now, bounced=event.bounced, detail=event.detail
                )
            elif isinstance(event, Reply):
                result = self._machine.replied(now, event.channel, event.auto_reply)
            else:
                result = self._machine.task_outcome(event.step, event.outcome, now, event.reason)
            if number in self._awaited:
                self._awaited.discard(number)
                self._answers[number] = result.message
            if isinstance(result, Ignored):
                self._ignored.append(f"{_describe(event)}: {result.message}")
                workflow.logger.warning(
                    "Ignored %s for %s: %s",
                    type(event).__name__,
                    workflow.info().workflow_id,
                    result.message,
                )
        return applied

    async def _execute(self, number: int) -> None:
        campaign = self._input.campaign
        step = campaign.steps[number - 1]
        machine = self._machine
        earlier = [
            s.step
            for s in machine.steps
            if s.channel == Channel.EMAIL and s.status == StepStatus.SENT
        ]
        step_input = StepInput(
            campaign_id=campaign.id,
            workflow_id=workflow.info().workflow_id,
            step_number=number,
            step=step,
            lead=self._input.lead,
            sender=campaign.sender,
            earlier_email_steps=earlier,
        )
        self._publish(f"step {number}: running {step.type}")
        try:
            outcome = await workflow.execute_activity(
                ACTIVITY_FOR_CHANNEL[step.channel],
                step_input,
                result_type=StepOutcome,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=CHANNEL_RETRY,
                summary=f"step {number} of {len(campaign.steps)}: {step.type}",
            )
        except ActivityError as error:
            cause = error.cause
            if isinstance(cause, ApplicationError) and cause.type == ACCOUNT_INTERRUPTED_ERROR_TYPE:
                # Not the lead's fault: pause on this step and try it again later.
                machine.hold(workflow.now(), f"account interrupted: {cause.message}")
                self._resume_at = workflow.now() + ACCOUNT_RETRY_INTERVAL
                return
            outcome = StepOutcome(
                status=StepStatus.FAILED,
                reason=Reason.RETRIES_EXHAUSTED,
                detail=str(cause.message if isinstance(cause, ApplicationError) else cause),
            )
        machine.record_outcome(
            number, outcome.status, workflow.now(), outcome.reason, outcome.detail
        )

    async def _sleep_until(self, action: Sleep) -> None:
        step = self._input.campaign.steps[action.step - 1]
        delay = action.until - workflow.now()
        summary = f"wait {format_duration(delay)} before step {action.step} ({step.type})"
        self._publish(summary)
        try:
            await workflow.wait_condition(
                lambda: bool(self._inbox), timeout=delay, timeout_summary=summary
            )
        except TimeoutError:
            pass

    async def _await_resume(self) -> None:
        # NOTE: an interrupted account is retried on a fixed interval for now. Reconnecting an
        # account, reassigning the lead and operator resume are not wired to this wait yet.
        self._publish(f"paused: {self._machine.pause_reason}")
        if self._resume_at is None:
            await workflow.wait_condition(lambda: bool(self._inbox))
            return
        delay = max(self._resume_at - workflow.now(), timedelta(0))
        try:
            await workflow.wait_condition(
                lambda: bool(self._inbox),
                timeout=delay,
                timeout_summary=f"retry the sender account in {format_duration(delay)}",
            )
        except TimeoutError:
            self._resume_at = None
            self._machine.release(workflow.now())

    async def _record(self) -> None:
        """Write new log entries to the database and keep the search attributes current."""
        machine = self._machine
        entries: list[LogEntry] = machine.new_entries()
        stage = self._stage()
        if entries:
            campaign = self._input.campaign
            bounced = any(e.kind == "event" and e.status == "unsubscribed" for e in entries)
            await workflow.execute_activity(
                "record_activity",
                RecordInput(
                    workflow_id=workflow.info().workflow_id,
                    campaign_id=campaign.id,
                    campaign_name=campaign.name,
                    lead_key=self._input.lead.key,
                    status=machine.status.value,
                    unsubscribed=machine.unsubscribed,
                    entries=entries,
                    unsubscribe_address=self._input.lead.email if bounced else None,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RECORD_RETRY,
                summary=f"record {len(entries)} activity entries",
            )
        current = (machine.status.value, stage)
        if current != self._search_attributes:
            self._search_attributes = current
            workflow.upsert_search_attributes(
                [
                    SearchAttributePair(CAMPAIGN_KEY, self._input.campaign.id),
                    SearchAttributePair(STATUS_KEY, machine.status.value),
                    SearchAttributePair(STAGE_KEY, stage),
                ]
            )
        self._results.update(self._answers)
        self._answers.clear()

    def _stage(self) -> str:
        machine = self._machine
        if machine.has_ended:
            return "ended"
        if machine.waiting_step is not None:
            step = machine.step(machine.waiting_step)
            return f"step-{step.step}-{step.type}-waiting"
        if machine.state == "paused":
            return "paused"
        step = machine.next_pending()
        return f"step-{step.step}-{step.type}" if step else "ended"

    def _publish(self, headline: str) -> None:
        """Show the lead's progress in the Temporal UI (current details, markdown)."""
        machine = self._machine
        rows = "\n".join(
            f"| {s.step} | {s.type} | {s.status} | {s.reason or ''} |" for s in machine.steps
        )
        workflow.set_current_details(
            f"**{headline}**\n\nStatus: {machine.status.value}"
            + (", unsubscribed" if machine.unsubscribed else "")
            + f"\n\n| step | type | status | reason |\n|---|---|---|---|\n{rows}"
        )


def _describe(event: LateFailure | Reply | TaskOutcome) -> str:
    if isinstance(event, LateFailure):
        return f"{'bounce' if event.bounced else 'failure'} of step {event.step}"
    if isinstance(event, Reply):
        return "auto-reply" if event.auto_reply else "reply"
    return f"task {event.outcome} for step {event.step}"


__all__ = ["LeadSequenceWorkflow", "EnrollmentStatus"]
