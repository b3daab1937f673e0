"""LeadSequenceWorkflow: one durable workflow per enrollment, driving the lead machine.

The workflow is glue. Signal handlers only queue what the world reports. The main loop applies
queued events to the machine, gets the next action from it, and carries that action out: a
channel activity, a durable timer that any event cuts short, or a wait for a person.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime, time, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from sequencer.campaign import Sender
    from sequencer.channels import Channel, EnrollmentStatus, Reason, StepStatus
    from sequencer.durations import format_duration
    from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE
    from sequencer.models import (
        QUEUED_CHANNELS,
        SEARCH_ATTRIBUTE_ACCOUNT,
        SEARCH_ATTRIBUTE_CAMPAIGN,
        SEARCH_ATTRIBUTE_STAGE,
        SEARCH_ATTRIBUTE_STATUS,
        WORKFLOW_TYPE,
        AccountProblem,
        AccountReconnected,
        AccountRef,
        BookedStep,
        BookedStepResult,
        CarriedState,
        EnrollmentInput,
        EnrollmentResult,
        InvitationAnswer,
        LateFailure,
        LogEntry,
        OperatorAction,
        PlanStep,
        Reassignment,
        RecordInput,
        Reply,
        SlotGrant,
        SlotRequest,
        StepFinish,
        StepInput,
        StepOutcome,
        SubscriptionChange,
        TaskOutcome,
        channel_queue,
    )
    from sequencer.schedule import local_instant
    from workflows.lead_machine import (
        Applied,
        AwaitInvitation,
        AwaitResume,
        AwaitTask,
        EventResult,
        Execute,
        Finished,
        Ignored,
        LeadSequence,
        Sleep,
        plan_from_steps,
    )
    from workflows.sender_account import account_workflow_id

Event = (
    LateFailure
    | Reply
    | TaskOutcome
    | InvitationAnswer
    | OperatorAction
    | SubscriptionChange
    | Reassignment
    | AccountReconnected
)

CAMPAIGN_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_CAMPAIGN)
STATUS_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_STATUS)
STAGE_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_STAGE)
ACCOUNT_KEY = SearchAttributeKey.for_keyword(SEARCH_ATTRIBUTE_ACCOUNT)

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
EMAIL_HEARTBEAT_TIMEOUT = timedelta(seconds=20)
# Database writes are retried until the database is back, however long it is down, so that
# no lead fails on an outage. A write still retrying shows in the Temporal UI as a pending
# activity with its attempt count and last error.
RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)
# Patch id for recording an event's log entries before the next step runs.
RECORD_EVENTS_FIRST = "record-events-first"
# Histories from before this patch retried an interrupted account every ACCOUNT_RETRY_INTERVAL.
# With it, a lead books a slot on its sender account before each send, pauses while the account
# is disconnected or its cap is reached, and waits for LinkedIn invitations to be accepted.
INTERRUPTIONS = "interruptions"
# Histories from before this patch set no SequencerAccount search attribute.
ACCOUNT_ATTRIBUTE = "account-search-attribute"
# Histories from before this patch never continued as new.
CONTINUE_AS_NEW = "continue-as-new"
# This patch replaces the four above, because each patch call costs a marker and a search
# attribute update in the history. Histories from before it call the four.
CURRENT = "sequencer-1"
# New runs call this one patch, which replaces CURRENT and adds two changes. First, the lead
# writes its log and its search attributes when it comes to rest (a wait, a task, a pause,
# the end) or when an event from the world changed it, not after every step. Its first search
# attributes are the ones it was started with. Second, a step that sends through an account
# books its slot and runs in one activity (`book_and_run_step`) instead of two.
SEQUENCER_2 = "sequencer-2"
# New runs call this one patch, which replaces SEQUENCER_2 and every patch before it, and
# runs the email and LinkedIn activities on their channels' task queues (`channel_queue`),
# so that separate workers can run them. Runs with SEQUENCER_2 keep them on the lead's queue.
LATEST = "sequencer-3"
# New runs carry this in their input (EnrollmentInput.release) and call no patch. It has what
# LATEST has, with four changes. The input sets whether the channels' task queues are used
# (EnrollmentInput.channel_queues). A lead that no longer needs a slot it booked frees it with
# the `release_slot` activity, since the slot may be booked in the database rather than by the
# account workflow. The activity of the last step may write the lead's end (StepFinish). And a
# step books its slot even when the lead has one, so that a disconnected account rejects it.
RELEASE = "sequencer-4"
# How long the booking of a slot and the step that follows it may take in all: a booking can
# queue on the worker behind others for the same account.
BOOKED_STEP_TIMEOUT = timedelta(minutes=12)
ACCOUNT_RETRY_INTERVAL = timedelta(minutes=15)
SLOT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=30,
)
# A step postponed by an out-of-office reply runs at this hour of the lead's return day, in the
# lead's timezone (else the campaign schedule's, else UTC), or at the next opening of the
# sending schedule after it.
BACK_AT_HOUR = 9
# A booked slot not used within this long (the lead was paused meanwhile) is booked again.
STALE_SLOT = timedelta(minutes=5)
# Step types whose sends count against a sender account's limits.
SLOT_KINDS = {"email", "linkedin_visit", "linkedin_invite", "linkedin_message"}


@workflow.defn(name=WORKFLOW_TYPE)
class LeadSequenceWorkflow:
    @workflow.init
    def __init__(self, input: EnrollmentInput) -> None:
        self._input = input
        campaign = input.campaign
        schedule = getattr(campaign, "schedule", None)
        if schedule is not None and input.lead.timezone:
            try:
                schedule = schedule.in_timezone(input.lead.timezone)
            except ValueError as error:
                # The import checks timezones, so only a lead built some other way gets here.
                workflow.logger.warning(
                    "Lead %s keeps the campaign's timezone: %s", workflow.info().workflow_id, error
                )
        self._machine = LeadSequence(
            plan_from_steps(campaign.steps),
            schedule=schedule,
            invite_timeout=campaign.invite_timeout,
        )
        self._sender: Sender | None = campaign.sender
        self._linkedin = campaign.linkedin
        # Events waiting for the main loop, each with a number so that an update can wait for
        # the result of its own event.
        self._inbox: list[tuple[int, Event]] = []
        self._received = 0
        self._results: dict[int, str] = {}
        self._awaited: set[int] = set()
        # Update results, held back until the event's log entries are written, so that a
        # caller who reads the activity log next finds the change.
        self._answers: dict[int, str] = {}
        self._search_attributes: tuple[str, str, str | None] | None = None
        self._account_attribute = False
        self._may_continue = False
        self._records_first: bool | None = None
        # Whether the log and search attributes are written only at rest, and a step books its
        # slot in the activity that runs it (SEQUENCER_2 and LATEST).
        self._at_rest_only = False
        # Whether email and LinkedIn activities run on their channels' task queues (LATEST).
        self._channel_queues = False
        # Whether a slot the lead will not use is freed with the `release_slot` activity
        # (RELEASE), rather than with the account workflow's `forget` signal.
        self._release_slots = False
        self._resume_at = None
        self._ignored: list[str] = []
        self._interruptions = False
        # The sending slot booked for a step, and the account a paused lead waits for.
        # (step, account id, slot time, why it is later than asked)
        self._slot: tuple[int, str, datetime, str | None] | None = None
        self._account_wait: str | None = None
        self._signals: list[asyncio.Task[None]] = []

    @workflow.run
    async def run(self, input: EnrollmentInput) -> EnrollmentResult:
        machine = self._machine
        if input.release == RELEASE:
            self._interruptions = self._account_attribute = self._may_continue = True
            self._records_first = self._at_rest_only = True
            self._channel_queues = input.channel_queues
            self._search_attributes = self._attributes_at_start()
            self._release_slots = True
        elif input.release is not None:
            # Started by a newer release: fail the workflow task until an upgraded worker
            # takes the lead, rather than run it as an older one would.
            raise RuntimeError(
                f"this worker runs lead workflows up to release {RELEASE}, and this lead was "
                f"started for release {input.release}: upgrade the worker"
            )
        elif workflow.patched(LATEST):
            self._interruptions = self._account_attribute = self._may_continue = True
            self._records_first = self._at_rest_only = self._channel_queues = True
            self._search_attributes = self._attributes_at_start()
        elif workflow.patched(SEQUENCER_2):
            self._interruptions = self._account_attribute = self._may_continue = True
            self._records_first = self._at_rest_only = True
            self._search_attributes = self._attributes_at_start()
        elif workflow.patched(CURRENT):
            self._interruptions = self._account_attribute = self._may_continue = True
            self._records_first = True
        else:
            self._interruptions = workflow.patched(INTERRUPTIONS)
            self._account_attribute = workflow.patched(ACCOUNT_ATTRIBUTE)
            self._may_continue = workflow.patched(CONTINUE_AS_NEW)
        machine.gate_invitations = self._interruptions
        if input.carried is not None:
            self._carry_on(input.carried)
        elif input.resume_steps is not None:
            machine.seq_offset = input.log_offset
            first = machine.begin_again(
                input.resume_steps, input.resume_enrolled_at, workflow.now()
            )
            workflow.logger.info("Resumed %s from step %d", workflow.info().workflow_id, first)
        else:
            machine.begin(workflow.now())
            await self._start_budget()
        await self._record(at_rest=False)

        while not machine.has_ended:
            # Record what an event changed before acting on it, so that an update's caller sees
            # the change in the database. Histories from before this change acted first.
            if self._apply_inbox() and self._record_events_first():
                await self._record()
            if self._continue_due():
                await self._continue_as_new()
            action = machine.next_action(workflow.now())
            if isinstance(action, Finished):
                break
            if isinstance(action, Execute):
                await self._execute(action.step)
            elif isinstance(action, Sleep):
                await self._sleep_until(action)
            elif isinstance(action, AwaitTask):
                self._publish(f"step {action.step}: waiting for a person")
                await self._come_to_rest()
                await workflow.wait_condition(self._woken)
            elif isinstance(action, AwaitInvitation):
                await self._await_invitation(action)
            elif isinstance(action, AwaitResume):
                await self._await_resume()
            await self._record(at_rest=False)

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
        self._forget_account()
        await asyncio.gather(*self._signals)
        return EnrollmentResult(
            status=machine.status.value,
            unsubscribed=machine.unsubscribed,
            steps=[step.model_copy() for step in machine.steps],
            enrolled_at=machine.enrolled_at,
            ignored=list(self._ignored),
        )

    # What the world reports. Handlers queue; the main loop applies, so transitions happen in
    # one place and in order. Updates are checked by a validator first: a refused update
    # leaves no trace in the history, so a duplicate or mistaken request costs nothing.

    @workflow.signal
    def report_failure(self, failure: LateFailure) -> None:
        self._receive(failure)

    @workflow.signal
    def report_reply(self, reply: Reply) -> None:
        self._receive(reply)

    @workflow.signal
    def report_task(self, outcome: TaskOutcome) -> None:
        self._receive(outcome)

    @workflow.signal
    def account_reconnected(self, account_id: str) -> None:
        """Sent by the sender account's workflow once the account works again."""
        self._receive(AccountReconnected(account_id=account_id))

    @workflow.update
    async def apply_failure(self, failure: LateFailure) -> str:
        """Apply a late failure and return what it did, once the main loop has applied it."""
        return await self._apply_and_answer(failure)

    @apply_failure.validator
    def _validate_failure(self, failure: LateFailure) -> None:
        self._reject(self._machine.check_late_failure(failure.step, failure.bounced))

    @workflow.update
    async def answer_invitation(self, answer: InvitationAnswer) -> str:
        """Apply the lead's acceptance or refusal of the LinkedIn invitation (rule 9)."""
        return await self._apply_and_answer(answer)

    @answer_invitation.validator
    def _validate_invitation(self, answer: InvitationAnswer) -> None:
        self._reject(self._machine.check_invitation(workflow.now(), answer.accepted))

    @workflow.update
    async def control(self, action: OperatorAction) -> str:
        """Pause, resume or remove the enrollment (rule 12)."""
        return await self._apply_and_answer(action)

    @control.validator
    def _validate_control(self, action: OperatorAction) -> None:
        self._reject(self._check_control(action))

    @workflow.update
    async def change_subscription(self, change: SubscriptionChange) -> str:
        """Record that the lead's address was unsubscribed or re-subscribed."""
        return await self._apply_and_answer(change)

    @change_subscription.validator
    def _validate_subscription(self, change: SubscriptionChange) -> None:
        if change.unsubscribed == self._machine.unsubscribed:
            state = "unsubscribed" if change.unsubscribed else "subscribed"
            self._reject(f"the address is already {state}")

    @workflow.update
    async def reassign(self, reassignment: Reassignment) -> str:
        """Move the enrollment to another sender account; a lead paused by its account resumes."""
        return await self._apply_and_answer(reassignment)

    @reassign.validator
    def _validate_reassign(self, reassignment: Reassignment) -> None:
        self._reject(self._check_reassign(reassignment))

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

    def _receive(self, event: Event) -> int:
        self._received += 1
        self._inbox.append((self._received, event))
        return self._received

    async def _apply_and_answer(self, event: Event) -> str:
        number = self._receive(event)
        self._awaited.add(number)
        await workflow.wait_condition(lambda: number in self._results)
        return self._results.pop(number)

    @staticmethod
    def _reject(problem: str | None) -> None:
        if problem:
            raise ValueError(problem)

    def _check_control(self, action: OperatorAction) -> str | None:
        machine = self._machine
        if action.action == "pause":
            return machine.check_pause()
        if action.action == "resume":
            return machine.check_resume()
        return machine.check_remove()

    def _check_reassign(self, reassignment: Reassignment) -> str | None:
        if self._machine.has_ended:
            return f"the enrollment has already ended as {self._machine.status}"
        if reassignment.sender is None and reassignment.linkedin_account is None:
            return "name the sender to move to: an email sender, a LinkedIn account, or both"
        if reassignment.sender is not None and self._sender is not None:
            if reassignment.sender.email == self._sender.email:
                return f"the lead already sends from {self._sender.email}"
        if reassignment.linkedin_account == self._linkedin.account:
            return f"the lead already uses the LinkedIn account {self._linkedin.account}"
        return None

    # Phases

    def _apply_inbox(self, controls_only: bool = False) -> bool:
        """Apply queued events to the machine; return whether there were any.

        While a step runs only pauses and resumes are applied: they change no step.
        """
        applied = False
        now = workflow.now()
        for item in list(self._inbox):
            number, event = item
            if controls_only and not (
                isinstance(event, OperatorAction) and event.action in ("pause", "resume")
            ):
                continue
            self._inbox.remove(item)
            applied = True
            result = self._apply(event, now)
            if number in self._awaited:
                self._awaited.discard(number)
                self._answers[number] = result.message
            if isinstance(result, Ignored) and not isinstance(event, AccountReconnected):
                self._ignored.append(f"{_describe(event)}: {result.message}")
                workflow.logger.warning(
                    "Ignored %s for %s: %s",
                    type(event).__name__,
                    workflow.info().workflow_id,
                    result.message,
                )
        return applied

    def _apply(self, event: Event, now) -> EventResult:
        machine = self._machine
        if isinstance(event, LateFailure):
            return machine.late_failure(
                event.step, event.reason, now, bounced=event.bounced, detail=event.detail
            )
        if isinstance(event, Reply):
            back_at = self._back_at(event.back_on) if event.back_on else None
            return machine.replied(now, event.channel, event.auto_reply, back_at)
        if isinstance(event, TaskOutcome):
            return machine.task_outcome(event.step, event.outcome, now, event.reason)
        if isinstance(event, InvitationAnswer):
            return machine.invitation_answered(event.accepted, now, event.detail)
        if isinstance(event, SubscriptionChange):
            if event.unsubscribed:
                return machine.mark_unsubscribed(now, event.reason or "operator")
            return machine.mark_resubscribed(now)
        if isinstance(event, OperatorAction):
            return self._apply_control(event, now)
        if isinstance(event, Reassignment):
            return self._apply_reassignment(event, now)
        # AccountReconnected
        if machine.paused_by == "account" and self._account_wait == event.account_id:
            self._account_wait = None
            machine.release(now, f"{event.account_id} reconnected")
            return Applied("resumed")
        return Ignored(f"not waiting for {event.account_id}")

    def _back_at(self, day: date) -> datetime:
        """Return BACK_AT_HOUR on `day` in the lead's timezone, as a UTC instant."""
        schedule = getattr(self._input.campaign, "schedule", None)
        timezone = self._input.lead.timezone or (schedule.timezone if schedule else None)
        return local_instant(day, time(BACK_AT_HOUR), timezone)

    def _apply_control(self, action: OperatorAction, now) -> EventResult:
        machine = self._machine
        problem = self._check_control(action)
        if problem:
            return Ignored(problem)
        if action.action == "pause":
            machine.hold(now, action.note or "paused by an operator", "operator")
            return Applied("paused; the remaining wait is frozen until it is resumed")
        if action.action == "resume":
            machine.release(now, action.note or "resumed by an operator")
            return Applied("resumed")
        self._forget_account()
        return machine.remove_lead(now, action.note)

    def _apply_reassignment(self, reassignment: Reassignment, now) -> EventResult:
        machine = self._machine
        problem = self._check_reassign(reassignment)
        if problem:
            return Ignored(problem)
        waited_for_slot = self._slot is not None
        self._forget_account()
        moved = []
        if reassignment.sender is not None:
            self._sender = reassignment.sender
            moved.append(reassignment.sender.email)
        if reassignment.linkedin_account is not None:
            self._linkedin = self._linkedin.model_copy(
                update={"account": reassignment.linkedin_account}
            )
            moved.append(f"LinkedIn account {reassignment.linkedin_account}")
        machine.note(now, "reassigned", detail=", ".join(moved))
        if machine.state == "paused" and machine.paused_by in ("account", "cap"):
            self._resume_at = None
            machine.release(now, "reassigned")
        if waited_for_slot and machine.waiting_step is None and machine.next_due:
            # The slot belonged to the old account, so the step books one on the new one at once.
            machine.next_due = min(machine.next_due, now)
            if machine.state == "paused":
                machine.paused_remaining = timedelta(0)
        return Applied("moved to " + " and ".join(moved))

    async def _start_budget(self) -> None:
        """Hold step 1 back while the campaign has started its daily number of new leads."""
        campaign = self._input.campaign
        if not self._interruptions or campaign.max_new_leads_per_day is None:
            return
        account = AccountRef(id=f"campaign:{campaign.id}", channel="campaign", check_interval=None)
        grant = await self._book(
            self._slot_request(account, 0, "start", campaign.max_new_leads_per_day, None)
        )
        if grant.granted and grant.at is not None and grant.at > workflow.now():
            self._machine.delay_start(
                grant.at,
                workflow.now(),
                f"the campaign starts at most {campaign.max_new_leads_per_day} new leads a day",
            )

    async def _execute(self, number: int) -> None:
        campaign = self._input.campaign
        step = campaign.steps[number - 1]
        machine = self._machine
        now = workflow.now()
        if not machine.start_step(number, now):
            return
        account = self._account_for(step.type) if self._interruptions else None
        booking: SlotRequest | None = None
        if account is not None:
            # Runs of RELEASE book even when they hold a slot: the booking gives back the same
            # slot, and refuses it when the account was disconnected since, so that no step
            # sends through a disconnected account.
            valid_slot = self._valid_booking(number, account)
            if self._release_slots and self._signals:
                # A slot given back (on a pause, say) is freed before the lead books again,
                # or the freeing could delete the new booking.
                await asyncio.gather(*self._signals)
                self._signals.clear()
            if self._release_slots or (self._at_rest_only and valid_slot is None):
                booking = self._slot_request(account, number, step.type, *self._limits(step.type))
            elif not await self._take_slot(number, step.type, account):
                return
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
            sender=self._sender,
            earlier_email_steps=earlier,
        )
        self._publish(f"step {number}: running {step.type}")
        # Email sends heartbeat while they run, so an attempt on a worker that died is retried
        # after this long instead of the whole start-to-close timeout.
        heartbeat = EMAIL_HEARTBEAT_TIMEOUT if step.channel == Channel.EMAIL else None
        summary = f"step {number} of {len(campaign.steps)}: {step.type}"
        recorded: BookedStepResult | None = None
        try:
            if booking is not None and account is not None:
                finish = self._finish_for(number)
                result = await self._run_activity(
                    "book_and_run_step",
                    BookedStep(
                        activity=ACTIVITY_FOR_CHANNEL[step.channel],
                        slot=booking,
                        step=step_input,
                        finish=finish,
                    ),
                    BookedStepResult,
                    timeout=BOOKED_STEP_TIMEOUT,
                    heartbeat=heartbeat,
                    summary=f"{summary}, once a slot on {account.id} is free",
                    task_queue=self._queue_for(step.channel),
                    # The activity numbers the entries it may write after the log as it is
                    # now, so nothing may add to the log before it ends: an operator's pause
                    # waits until then, which for the last step changes nothing.
                    watch_controls=finish is None,
                )
                if result.outcome is not None:
                    outcome = result.outcome
                    if result.recorded_at is not None:
                        recorded = result
                elif not self._take_grant(number, step.type, account, result.grant):
                    return
                else:
                    # The slot came free between the booking and now: run the step.
                    booking = None
            if booking is None:
                outcome = await self._run_activity(
                    ACTIVITY_FOR_CHANNEL[step.channel],
                    step_input,
                    StepOutcome,
                    timeout=timedelta(minutes=2),
                    heartbeat=heartbeat,
                    summary=summary,
                    task_queue=self._queue_for(step.channel),
                )
        except ActivityError as error:
            cause = error.cause
            if isinstance(cause, ApplicationError) and cause.type == ACCOUNT_INTERRUPTED_ERROR_TYPE:
                await self._account_interrupted(account, cause.message)
                return
            outcome = StepOutcome(
                status=StepStatus.FAILED,
                reason=Reason.RETRIES_EXHAUSTED,
                detail=str(cause.message if isinstance(cause, ApplicationError) else cause),
            )
        self._slot = None
        machine.record_outcome(
            number,
            outcome.status,
            recorded.recorded_at if recorded and recorded.recorded_at else workflow.now(),
            outcome.reason,
            outcome.detail,
            invitation=outcome.invitation,
        )
        if recorded is not None:
            self._take_written(recorded.recorded)

    def _take_written(self, written: list[LogEntry]) -> None:
        """Count as written the entries a step's activity wrote with the lead's end, when they
        are the entries of the log. Otherwise the log is written again at rest, which keeps
        the entries already in the database."""
        machine = self._machine
        if machine.unwritten() == written:
            machine.new_entries()
        else:
            workflow.logger.warning(
                "Lead %s: the entries its last step wrote differ from its log; writing the log",
                workflow.info().workflow_id,
            )

    async def _run_activity(
        self,
        name: str,
        argument: object,
        result_type: type,
        *,
        timeout: timedelta,
        heartbeat: timedelta | None,
        summary: str,
        task_queue: str | None,
        watch_controls: bool = True,
    ):
        """Run a step's activity, on `task_queue` (None: the lead's own). An operator's pause
        arriving meanwhile is applied at once, unless `watch_controls` is false; the step
        finishes, and the wait after it is frozen."""
        handle = workflow.start_activity(
            name,
            argument,
            result_type=result_type,
            task_queue=task_queue,
            start_to_close_timeout=timeout,
            heartbeat_timeout=heartbeat,
            retry_policy=CHANNEL_RETRY,
            summary=summary,
        )
        if self._interruptions and watch_controls:
            while not handle.done():
                await workflow.wait_condition(lambda: handle.done() or self._has_control())
                if self._apply_inbox(controls_only=True):
                    await self._record()
        return await handle

    def _queue_for(self, channel: Channel) -> str | None:
        """Return the task queue of the channel's activities, or None for the lead's own."""
        if not self._channel_queues or channel.value not in QUEUED_CHANNELS:
            return None
        return channel_queue(workflow.info().task_queue, channel.value)

    def _has_control(self) -> bool:
        return any(
            isinstance(event, OperatorAction) and event.action in ("pause", "resume")
            for _, event in self._inbox
        )

    def _account_for(self, step_type: str) -> AccountRef | None:
        return _account_ref(step_type, self._sender, self._linkedin)

    def _limits(self, step_type: str) -> tuple[int | None, timedelta]:
        if step_type == "email" and self._sender is not None:
            return self._sender.daily_limit, self._sender.min_spacing
        if step_type == "linkedin_invite":
            return self._linkedin.daily_invites, self._linkedin.min_spacing
        return None, self._linkedin.min_spacing

    async def _take_slot(self, number: int, step_type: str, account: AccountRef) -> bool:
        """Book a sending slot for the step; return True when the step may run now.

        A slot later than now makes the step due then: a pause when the daily cap is the
        reason, a plain wait for the spacing between two sends.
        """
        booked = self._valid_booking(number, account)
        if booked is None:
            cap, spacing = self._limits(step_type)
            grant = await self._book(self._slot_request(account, number, step_type, cap, spacing))
            return self._take_grant(number, step_type, account, grant)
        return self._wait_for_slot(step_type, account, booked)

    def _valid_booking(
        self, number: int, account: AccountRef
    ) -> tuple[int, str, datetime, str | None] | None:
        """Return the slot booked for this step on this account, unless it went stale."""
        booked = self._slot
        if booked is None or booked[0] != number or booked[1] != account.id:
            return None
        if booked[2] < workflow.now() - STALE_SLOT:
            return None
        return booked

    def _take_grant(
        self, number: int, step_type: str, account: AccountRef, grant: SlotGrant
    ) -> bool:
        """Keep the slot an account granted; return True when the step may run now."""
        if not grant.granted:
            detail = grant.detail
            self._machine.hold(
                workflow.now(), f"{account.id} is disconnected", "account", detail=detail
            )
            self._account_wait = account.id
            return False
        reason = grant.reason
        previous = self._slot
        same_slot = previous is not None and previous[:3] == (number, account.id, grant.at)
        if reason is None and same_slot:
            # A booking that returns the lead's existing slot carries no reason, so keep the
            # reason of the first booking (a cap pause stays a pause).
            reason = previous[3]
        booked = (number, account.id, grant.at, reason)
        self._slot = booked
        return self._wait_for_slot(step_type, account, booked)

    def _wait_for_slot(
        self, step_type: str, account: AccountRef, booked: tuple[int, str, datetime, str | None]
    ) -> bool:
        """Return True when the booked slot has come; else make the step due then."""
        machine = self._machine
        now = workflow.now()
        if booked[2] <= now:
            return True
        if booked[3] == "cap":
            # Held back by the daily limit: a pause that ends at the slot, which is the wait.
            machine.next_due = booked[2]
            at = booked[2].strftime("%Y-%m-%d %H:%M UTC")
            machine.hold(
                now,
                f"daily limit of {account.id} reached",
                "cap",
                detail=f"{_sends(step_type, self._limits(step_type)[0])}; next slot at {at}",
            )
            machine.paused_remaining = timedelta(0)
            self._resume_at = booked[2]
        else:
            machine.next_due = booked[2]
        return False

    @staticmethod
    def _slot_request(
        account: AccountRef, number: int, kind: str, cap: int | None, spacing: timedelta | None
    ) -> SlotRequest:
        return SlotRequest(
            account=account,
            workflow_id=workflow.info().workflow_id,
            step=number,
            kind=kind,
            cap=cap,
            spacing=spacing or timedelta(0),
            lead_queue=workflow.info().task_queue,
        )

    async def _book(self, request: SlotRequest) -> SlotGrant:
        return await workflow.execute_activity(
            "reserve_slot",
            request,
            result_type=SlotGrant,
            # A booking may queue on the worker behind others for the same account: it
            # heartbeats while it waits, so a dead worker is still noticed within the
            # heartbeat timeout.
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=SLOT_RETRY,
            summary=f"book a slot for one {request.kind.replace('_', ' ')} on {request.account.id}",
        )

    async def _account_interrupted(self, account: AccountRef | None, message: str) -> None:
        """Pause on this step because the sender account cannot send (rule 8)."""
        machine = self._machine
        now = workflow.now()
        self._slot = None
        if account is None:
            # Histories from before account workflows: try again after a fixed interval.
            machine.hold(now, f"account interrupted: {message}", "account")
            self._resume_at = now + ACCOUNT_RETRY_INTERVAL
            return
        await workflow.execute_activity(
            "report_account_problem",
            AccountProblem(
                account=account, workflow_id=workflow.info().workflow_id, detail=message
            ),
            result_type=str,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=SLOT_RETRY,
            summary=f"mark {account.id} disconnected",
        )
        self._account_wait = account.id
        now = workflow.now()
        if machine.state == "paused":
            return  # paused by an operator meanwhile; the step runs again on resume
        machine.hold(now, f"{account.id} is disconnected", "account", detail=message)

    def _forget_account(self) -> None:
        """Tell the account this lead waited for, or held a slot on, that it no longer does."""
        waiting, booked_slot = self._account_wait, self._slot
        self._account_wait = None
        self._slot = None
        if not self._interruptions:
            return
        accounts = {waiting} if waiting else set()
        if booked_slot is not None and not self._release_slots:
            accounts.add(booked_slot[1])
        elif booked_slot is not None and booked_slot[2] > workflow.now():
            step, account_id = booked_slot[0], booked_slot[1]
            self._signals.append(asyncio.create_task(self._release_slot(step, account_id)))
        task_queue = workflow.info().task_queue
        for account_id in sorted(accounts):
            handle = workflow.get_external_workflow_handle(
                account_workflow_id(account_id, task_queue)
            )
            self._signals.append(asyncio.create_task(_signal_quietly(handle, "forget")))

    async def _release_slot(self, step: int, account_id: str) -> None:
        """Free the slot booked for `step` on the account, wherever it was booked."""
        channel = account_id.partition(":")[0]
        await workflow.execute_activity(
            "release_slot",
            SlotRequest(
                account=AccountRef(id=account_id, channel=channel, check_interval=None),
                workflow_id=workflow.info().workflow_id,
                step=step,
                kind="release",
                lead_queue=workflow.info().task_queue,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RECORD_RETRY,
            summary=f"free the slot of step {step} on {account_id}",
        )

    async def _sleep_until(self, action: Sleep) -> None:
        step = self._input.campaign.steps[action.step - 1]
        delay = action.until - workflow.now()
        summary = f"wait {format_duration(delay)} before step {action.step} ({step.type})"
        self._publish(summary)
        await self._come_to_rest()
        try:
            await workflow.wait_condition(self._woken, timeout=delay, timeout_summary=summary)
        except TimeoutError:
            pass

    async def _await_invitation(self, action: AwaitInvitation) -> None:
        delay = action.deadline - workflow.now()
        summary = f"step {action.step}: wait up to {format_duration(delay)} for the invitation"
        self._publish(summary)
        await self._come_to_rest()
        try:
            await workflow.wait_condition(self._woken, timeout=delay, timeout_summary=summary)
        except TimeoutError:
            pass

    async def _await_resume(self) -> None:
        machine = self._machine
        self._publish(f"paused: {machine.pause_reason}")
        await self._come_to_rest()
        resume_at = self._resume_at if machine.paused_by in ("account", "cap") else None
        if resume_at is None or (self._interruptions and machine.paused_by == "account"):
            await workflow.wait_condition(self._woken)
            return
        delay = max(resume_at - workflow.now(), timedelta(0))
        summary = (
            f"next free slot in {format_duration(delay)}"
            if machine.paused_by == "cap"
            else f"retry the sender account in {format_duration(delay)}"
        )
        try:
            await workflow.wait_condition(self._woken, timeout=delay, timeout_summary=summary)
        except TimeoutError:
            self._resume_at = None
            machine.release(
                workflow.now(),
                "the daily limit has room again" if machine.paused_by == "cap" else None,
            )

    def _record_events_first(self) -> bool:
        """Return whether an event's log entries are written before the next step runs."""
        if self._records_first is None:
            # Asked only once an event arrives, as histories from before CURRENT expect.
            self._records_first = workflow.patched(RECORD_EVENTS_FIRST)
        return self._records_first

    def _woken(self) -> bool:
        """Tell a wait to end: an event arrived, or it is time to continue as new."""
        return bool(self._inbox) or self._continue_due()

    def _continue_due(self) -> bool:
        """Return whether the history is long enough to continue as new, and nothing is in
        flight: no event waiting for the main loop and no handler running."""
        if not self._may_continue or self._inbox or not workflow.all_handlers_finished():
            return False
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._input.continue_as_new_after
        )

    async def _continue_as_new(self) -> None:
        """Hand the enrollment's state to a new run of this workflow, with an empty history.

        Returns without continuing when an event arrived while the log was written: the main
        loop applies it first, and continues at the next quiet moment.
        """
        await self._record()
        await asyncio.gather(*self._signals)
        self._signals.clear()
        if not self._continue_due():
            return
        previous = self._input.carried
        carried = CarriedState(
            machine=self._machine.snapshot(),
            sender=self._sender,
            linkedin=self._linkedin,
            slot=self._slot,
            account_wait=self._account_wait,
            resume_at=self._resume_at,
            ignored=list(self._ignored),
            runs=previous.runs + 1 if previous is not None else 1,
        )
        workflow.logger.info(
            "Lead %s continues as new after %d history events (run %d)",
            workflow.info().workflow_id,
            workflow.info().get_current_history_length(),
            carried.runs + 1,
        )
        workflow.continue_as_new(
            self._input.model_copy(
                update={"carried": carried, "resume_steps": None, "resume_enrolled_at": None}
            )
        )

    def _carry_on(self, carried: CarriedState) -> None:
        """Take over the state of the run that continued as new into this one."""
        self._machine.carry_on(carried.machine)
        self._sender = carried.sender
        self._linkedin = carried.linkedin
        self._slot = carried.slot
        self._account_wait = carried.account_wait
        self._resume_at = carried.resume_at
        self._ignored = list(carried.ignored)

    async def _come_to_rest(self) -> None:
        """Write what the steps since the last rest changed, before the lead waits."""
        if self._at_rest_only:
            await self._record()

    def _attributes_at_start(self) -> tuple[str, str, str | None] | None:
        """Return the status, stage and account search attributes the run was started with."""
        attributes = workflow.info().typed_search_attributes
        status, stage = attributes.get(STATUS_KEY), attributes.get(STAGE_KEY)
        if attributes.get(CAMPAIGN_KEY) != self._input.campaign.id or not status or not stage:
            return None
        return status, stage, attributes.get(ACCOUNT_KEY)

    async def _record(self, at_rest: bool = True) -> None:
        """Write new log entries to the database and keep the search attributes current.

        With `at_rest` false the lead is about to go on with its next step. Runs with
        SEQUENCER_2 or LATEST then write nothing, unless an update's caller waits for its result.
        """
        if not at_rest and self._at_rest_only and not self._answers:
            return
        machine = self._machine
        entries: list[LogEntry] = machine.new_entries()
        stage = self._stage()
        if entries:
            await workflow.execute_activity(
                "record_activity",
                self._record_input(entries),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RECORD_RETRY,
                summary=f"record {len(entries)} activity log "
                + ("entry" if len(entries) == 1 else "entries"),
            )
        account = self._account_in_use() if self._account_attribute else None
        current = (machine.status.value, stage, account)
        if current != self._search_attributes:
            self._search_attributes = current
            updates = [
                CAMPAIGN_KEY.value_set(self._input.campaign.id),
                STATUS_KEY.value_set(machine.status.value),
                STAGE_KEY.value_set(stage),
            ]
            if self._account_attribute:
                updates.append(
                    ACCOUNT_KEY.value_set(account) if account else ACCOUNT_KEY.value_unset()
                )
            workflow.upsert_search_attributes(updates)
        self._results.update(self._answers)
        self._answers.clear()

    def _record_input(self, entries: list[LogEntry]) -> RecordInput:
        """Return the write of `entries` with the lead's current status."""
        campaign, machine = self._input.campaign, self._machine
        bounced = any(
            e.kind == "event" and e.status == "unsubscribed" and e.reason == "bounce"
            for e in entries
        )
        return RecordInput(
            workflow_id=workflow.info().workflow_id,
            campaign_id=campaign.id,
            campaign_name=campaign.name,
            lead_key=self._input.lead.key,
            status=machine.status.value,
            unsubscribed=machine.unsubscribed,
            entries=entries,
            unsubscribe_address=self._input.lead.email if bounced else None,
        )

    def _finish_for(self, number: int) -> StepFinish | None:
        """Return what the activity of step `number` needs to write the lead's end, when the
        step is the last one left (RELEASE); else None."""
        machine = self._machine
        if not self._release_slots or machine.waiting_step not in (None, number):
            return None
        if any(s.status == StepStatus.PENDING and s.step != number for s in machine.steps):
            return None
        snapshot, unwritten = machine.handover()
        return StepFinish(
            steps=[PlanStep(type=p.type.value, wait_after=p.wait_after) for p in machine.plan],
            schedule=machine.schedule,
            invite_timeout=machine.invite_timeout,
            machine=snapshot,
            record=self._record_input(unwritten),
        )

    def _account_in_use(self) -> str | None:
        """Return the account a paused lead waits on, else the one its next step sends from."""
        machine = self._machine
        if machine.has_ended:
            return None
        if self._account_wait is not None:
            return self._account_wait
        number = machine.waiting_step
        step = machine.step(number) if number is not None else machine.next_pending()
        account = self._account_for(step.type) if step is not None else None
        return account.id if account is not None else None

    def _stage(self) -> str:
        machine = self._machine
        if machine.has_ended:
            return "ended"
        if machine.waiting_step is not None:
            step = machine.step(machine.waiting_step)
            return f"step-{step.step}-{step.type}-waiting"
        if machine.state == "paused":
            return f"paused-{machine.paused_by or 'operator'}"
        step = machine.next_pending()
        return f"step-{step.step}-{step.type}" if step else "ended"

    def _publish(self, headline: str) -> None:
        """Show the lead's progress in the Temporal UI (current details, markdown)."""
        machine = self._machine
        rows = "\n".join(
            f"| {s.step} | {s.type} | {s.status} | {s.reason or ''} |" for s in machine.steps
        )
        paused = f" ({machine.pause_reason})" if machine.state == "paused" else ""
        workflow.set_current_details(
            f"**{headline}**\n\nStatus: {machine.status.value}{paused}"
            + (", unsubscribed" if machine.unsubscribed else "")
            + f"\n\n| step | type | status | reason |\n|---|---|---|---|\n{rows}"
        )


def _account_ref(step_type: str, sender: Sender | None, linkedin) -> AccountRef | None:
    """Return the account a step of this type sends through, or None when it sends nothing."""
    if step_type not in SLOT_KINDS:
        return None
    if step_type == "email":
        if sender is None:
            return None
        return AccountRef(id=sender.account_id, channel="email", sender=sender)
    return AccountRef(id=linkedin.account_id, channel="linkedin")


def start_search_attributes(campaign, first_step: int) -> tuple[str, str, str | None]:
    """Return the status, stage and account search attributes of a run that starts at
    `first_step`: the values the workflow itself would set, so that it need not set them."""
    step = campaign.steps[first_step - 1]
    account = _account_ref(step.type, campaign.sender, campaign.linkedin)
    return (
        EnrollmentStatus.RUNNING.value,
        f"step-{first_step}-{step.type}",
        account.id if account is not None else None,
    )


def _sends(step_type: str, cap: int | None) -> str:
    kind = "email" if step_type == "email" else step_type.removeprefix("linkedin_")
    return f"limit of {cap} {kind}{'' if cap == 1 else 's'} in any 24 hours"


async def _signal_quietly(handle: workflow.ExternalWorkflowHandle, name: str) -> None:
    try:
        await handle.signal(name, workflow.info().workflow_id)
    except Exception:  # noqa: BLE001 - the account's workflow may have ended: nothing to free
        pass


def _describe(event: Event) -> str:
    if isinstance(event, LateFailure):
        return f"{'bounce' if event.bounced else 'failure'} of step {event.step}"
    if isinstance(event, Reply):
        return "auto-reply" if event.auto_reply else "reply"
    if isinstance(event, TaskOutcome):
        return f"task {event.outcome} for step {event.step}"
    if isinstance(event, InvitationAnswer):
        return "invitation " + ("accepted" if event.accepted else "declined")
    if isinstance(event, OperatorAction):
        return event.action
    if isinstance(event, SubscriptionChange):
        return "unsubscribe" if event.unsubscribed else "re-subscribe"
    if isinstance(event, Reassignment):
        return "reassignment"
    return f"{event.account_id} reconnected"


__all__ = ["LeadSequenceWorkflow", "EnrollmentStatus", "start_search_attributes"]
