"""The lifecycle of one enrollment: which step runs when, and what a failure does to the rest.

This module decides everything and does nothing: it never imports `temporalio`, never reads
the clock (every method takes `now`), and never sends, sleeps or logs. The workflow gets the
next action from it, carries that action out, and feeds the result back.

The enrollment lifecycle is the `transitions` table below. Step statuses change through
`_set_status`, which accepts only the moves in `STEP_MOVES`.

Rules implemented (the numbers of the sequencing rules):
- 1, 2: step 1 is due at enrollment. The next step is due `wait_after` of the last *executed*
  step later. Failed and skipped steps contribute no wait.
- 4 to 7: a failed or bounced step skips every remaining step of its channel and makes the next
  remaining step due at once. A bounce also unsubscribes. With nothing left, the enrollment is
  `stopped`. A failure reported late is applied when it arrives, or only recorded once the
  enrollment has ended.
- 10: calls and manual tasks wait for a person's outcome, and the next wait counts from it.
- 11: a reply (not an auto-reply) skips everything left and ends the enrollment as `replied`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from transitions import Machine, MachineError

from sequencer.channels import (
    CHANNEL_OF,
    FINAL_STATUSES,
    TASK_STEP_TYPES,
    Channel,
    EnrollmentStatus,
    Reason,
    StepStatus,
    StepType,
)
from sequencer.models import LogEntry, StepState

# Enrollment lifecycle: trigger, source state(s), destination state.
TRANSITIONS = [
    {"trigger": "start", "source": "enrolled", "dest": "running"},
    {"trigger": "pause", "source": "running", "dest": "paused"},
    {"trigger": "resume", "source": "paused", "dest": "running"},
    {"trigger": "complete", "source": ["running", "paused"], "dest": "completed"},
    {"trigger": "stop", "source": ["running", "paused"], "dest": "stopped"},
    {"trigger": "reply", "source": ["running", "paused"], "dest": "replied"},
    {"trigger": "remove", "source": ["enrolled", "running", "paused"], "dest": "removed"},
]
STATES = ["enrolled", *(status.value for status in EnrollmentStatus)]

# Step status moves. A sent step can still fail later: a bounce or a provider's report.
STEP_MOVES: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset(
        {
            StepStatus.WAITING,
            StepStatus.SENT,
            StepStatus.FAILED,
            StepStatus.BOUNCED,
            StepStatus.SKIPPED,
        }
    ),
    StepStatus.WAITING: frozenset({StepStatus.SENT, StepStatus.FAILED, StepStatus.SKIPPED}),
    StepStatus.SENT: frozenset({StepStatus.FAILED, StepStatus.BOUNCED}),
    StepStatus.FAILED: frozenset(),
    StepStatus.BOUNCED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
}


@dataclass(frozen=True)
class PlannedStep:
    """One step of the campaign as the machine needs it: no templates, no addresses."""

    number: int
    type: StepType
    wait_after: timedelta

    @property
    def channel(self) -> Channel:
        return CHANNEL_OF[self.type]


# Actions: the next thing the workflow does.
@dataclass(frozen=True)
class Execute:
    step: int


@dataclass(frozen=True)
class Sleep:
    until: datetime
    step: int


@dataclass(frozen=True)
class AwaitTask:
    step: int


@dataclass(frozen=True)
class AwaitResume:
    reason: str | None


@dataclass(frozen=True)
class Finished:
    status: EnrollmentStatus


Action = Execute | Sleep | AwaitTask | AwaitResume | Finished


@dataclass(frozen=True)
class Ignored:
    """The result of an event that does not apply in the current state: returned, not raised."""

    message: str


@dataclass(frozen=True)
class Applied:
    message: str


EventResult = Applied | Ignored


class InvalidStepMove(RuntimeError):
    """A programming error: a step status change that `STEP_MOVES` does not allow."""


class LeadSequence:
    """The state of one enrollment. `state` is the enrollment status, set by `transitions`."""

    state: str

    def __init__(self, plan: list[PlannedStep]) -> None:
        if not plan:
            raise ValueError("a campaign needs at least one step")
        self.plan = plan
        self.steps = [
            StepState(step=p.number, type=p.type.value, channel=p.channel.value) for p in plan
        ]
        self.enrolled_at: datetime | None = None
        self.next_due: datetime | None = None
        self.waiting_step: int | None = None
        self.unsubscribed = False
        self.pause_reason: str | None = None
        self.paused_remaining: timedelta | None = None
        self.log: list[LogEntry] = []
        self._flushed = 0
        self.machine = Machine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial="enrolled",
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )

    @classmethod
    def restore(
        cls,
        plan: list[PlannedStep],
        steps: list[StepState],
        status: EnrollmentStatus,
        unsubscribed: bool,
        enrolled_at: datetime | None,
    ) -> LeadSequence:
        """Rebuild an enrollment from its saved steps, to apply an event after its workflow ended.

        Only ended enrollments are restored this way: a running one lives in its workflow.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"only an ended enrollment can be restored, not a {status} one")
        sequence = cls(plan)
        sequence.steps = [step.model_copy() for step in steps]
        sequence.unsubscribed = unsubscribed
        sequence.enrolled_at = enrolled_at
        sequence.machine.set_state(status.value)
        return sequence

    # Reading the state

    @property
    def status(self) -> EnrollmentStatus:
        if self.state == "enrolled":
            return EnrollmentStatus.RUNNING
        return EnrollmentStatus(self.state)

    @property
    def has_ended(self) -> bool:
        return self.state in FINAL_STATUSES

    def step(self, number: int) -> StepState:
        if not 1 <= number <= len(self.steps):
            raise KeyError(number)
        return self.steps[number - 1]

    def next_pending(self) -> StepState | None:
        return next((s for s in self.steps if s.status == StepStatus.PENDING), None)

    def new_entries(self) -> list[LogEntry]:
        """Return the log entries added since the last call, for writing to the database."""
        entries = self.log[self._flushed :]
        self._flushed = len(self.log)
        return entries

    def next_action(self, now: datetime) -> Action:
        """Decide what the workflow does next: execute, sleep, wait for a person, or stop."""
        if self.has_ended:
            return Finished(self.status)
        if self.state == "paused":
            return AwaitResume(self.pause_reason)
        if self.waiting_step is not None:
            return AwaitTask(self.waiting_step)
        step = self.next_pending()
        if step is None or self.next_due is None:
            raise RuntimeError("a running enrollment must have a next step")
        if now >= self.next_due:
            return Execute(step.step)
        return Sleep(self.next_due, step.step)

    # Lifecycle

    def begin(self, now: datetime) -> None:
        """Enroll the lead: step 1 is due at once (rule 1)."""
        self.start()
        self.enrolled_at = now
        self.next_due = self._schedule(now)
        self._event(now, "enrolled")

    def record_outcome(
        self,
        number: int,
        status: StepStatus,
        now: datetime,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Apply the result of executing a step (the outcome a channel activity returned)."""
        step = self.step(number)
        if status == StepStatus.SENT:
            self._set_status(step, StepStatus.SENT, now, reason, detail)
            self._after_executed(number, now)
        elif status == StepStatus.WAITING:
            self._set_status(step, StepStatus.WAITING, now, reason, detail)
            self.waiting_step = number
        elif status in (StepStatus.FAILED, StepStatus.BOUNCED):
            self._fail(step, status, now, reason or "failed", detail)
        elif status == StepStatus.SKIPPED:
            self._skip_channel(step, now, reason or "skipped", detail)
        else:
            raise InvalidStepMove(f"step {number}: an activity cannot return {status}")

    def late_failure(
        self,
        number: int,
        reason: str,
        now: datetime,
        bounced: bool = False,
        detail: str | None = None,
    ) -> EventResult:
        """Apply a failure reported after the step ran (rule 7)."""
        problem = self.check_late_failure(number, bounced)
        if problem:
            return Ignored(problem)

        step = self.step(number)
        status = StepStatus.BOUNCED if bounced else StepStatus.FAILED
        if self.has_ended:
            self._set_status(step, status, now, reason, detail)
            if bounced:
                self._unsubscribe(now, number)
            self._event(now, "late_failure_after_end", step=number, reason=reason)
            return Applied(
                f"step {number} marked {status}; the enrollment had already ended as "
                f"{self.status} and stays so"
            )
        self._fail(step, status, now, reason, detail)
        return Applied(f"step {number} marked {status}")

    def check_late_failure(self, number: int, bounced: bool) -> str | None:
        """Return why a late failure of this step does not apply, or None when it does."""
        if not 1 <= number <= len(self.steps):
            return f"step {number} does not exist: the campaign has {len(self.steps)} steps"
        step = self.step(number)
        if bounced and step.channel != Channel.EMAIL:
            return f"step {number} is a {step.type} step: only email steps can bounce"
        if step.status in (StepStatus.FAILED, StepStatus.BOUNCED):
            return f"step {number} is already {step.status}: the failure was recorded before"
        if step.status not in (StepStatus.SENT, StepStatus.WAITING):
            return f"step {number} is {step.status}, not sent: there is nothing to fail"
        return None

    def task_outcome(
        self, number: int, outcome: str, now: datetime, reason: str | None = None
    ) -> EventResult:
        """Apply a person's outcome for a call or manual task (rule 10)."""
        if self.has_ended:
            return Ignored(f"the enrollment has already ended as {self.status}")
        if self.waiting_step != number:
            if 1 <= number <= len(self.steps):
                current = self.step(number).status
                return Ignored(f"step {number} is {current}, not waiting for a person")
            return Ignored(
                f"step {number} does not exist: the campaign has {len(self.steps)} steps"
            )
        step = self.step(number)
        if outcome == "done":
            self._set_status(step, StepStatus.SENT, now, None, reason)
            self._after_executed(number, now)
        elif outcome == "failed":
            self._fail(step, StepStatus.FAILED, now, reason or "task_failed", None)
        elif outcome == "skipped":
            self._set_status(step, StepStatus.SKIPPED, now, Reason.TASK_SKIPPED, reason)
            self.waiting_step = None
            self._continue_or_end(now, failed=False)
        else:
            return Ignored(f"unknown task outcome {outcome!r}: use done, failed or skipped")
        return Applied(f"step {number} {outcome}")

    def replied(
        self, now: datetime, channel: str | None = None, auto_reply: bool = False
    ) -> EventResult:
        """Apply a reply: everything left is skipped and the enrollment ends (rule 11)."""
        if auto_reply:
            self._event(now, "auto_reply", detail=channel)
            return Ignored("an auto-reply is recorded but does not stop the sequence")
        if self.has_ended:
            self._event(now, "reply_after_end", detail=channel)
            return Ignored(f"the enrollment had already ended as {self.status}")
        self.reply()
        for step in self.steps:
            if step.status in (StepStatus.PENDING, StepStatus.WAITING):
                self._set_status(step, StepStatus.SKIPPED, now, Reason.REPLIED, None)
        self.waiting_step = None
        self.next_due = None
        self._event(now, "replied", detail=channel)
        self._event(now, "ended", reason=EnrollmentStatus.REPLIED.value)
        return Applied("the lead replied")

    def hold(self, now: datetime, reason: str) -> None:
        """Pause the enrollment with its remaining wait frozen."""
        if self.state != "running":
            raise MachineError(f"cannot pause an enrollment that is {self.status}")
        self.pause()
        self.pause_reason = reason
        self.paused_remaining = max(self.next_due - now, timedelta(0)) if self.next_due else None
        self._event(now, "paused", reason=reason)

    def release(self, now: datetime) -> None:
        """Resume a paused enrollment with the wait it had left."""
        self.resume()
        if self.paused_remaining is not None:
            self.next_due = now + self.paused_remaining
        self.paused_remaining = None
        self.pause_reason = None
        self._event(now, "resumed")

    # Decisions

    def _after_executed(self, number: int, now: datetime) -> None:
        """Schedule the next step `wait_after` of the executed step later (rule 2)."""
        self.waiting_step = None if self.waiting_step == number else self.waiting_step
        self.next_due = self._schedule(now + self.plan[number - 1].wait_after)
        self._continue_or_end(now, failed=False, keep_due=True)

    def _fail(
        self, step: StepState, status: StepStatus, now: datetime, reason: str, detail: str | None
    ) -> None:
        """Apply the failed-step rule (rule 4), and unsubscribe on a bounce (rule 5)."""
        self._set_status(step, status, now, reason, detail)
        if self.waiting_step == step.step:
            self.waiting_step = None
        if status == StepStatus.BOUNCED:
            self._unsubscribe(now, step.step)
        cause = f"step {step.step} {status}"
        for other in self.steps:
            if other.channel == step.channel and other.status == StepStatus.PENDING:
                self._set_status(other, StepStatus.SKIPPED, now, cause, reason)
        self._continue_or_end(now, failed=True)

    def _skip_channel(
        self, step: StepState, now: datetime, reason: str, detail: str | None
    ) -> None:
        """Skip a step the channel cannot carry out, such as an email to an unsubscribed address,
        and the channel's remaining steps with it. It is not a failure of the lead."""
        self._set_status(step, StepStatus.SKIPPED, now, reason, detail)
        for other in self.steps:
            if other.channel == step.channel and other.status == StepStatus.PENDING:
                self._set_status(
                    other, StepStatus.SKIPPED, now, reason, f"step {step.step} skipped"
                )
        self._continue_or_end(now, failed=True)

    def _continue_or_end(self, now: datetime, failed: bool, keep_due: bool = False) -> None:
        """End the enrollment when no step is left, else make the next step due.

        After a failure or a skip the next step is due at once, because the waits that led up
        to it are dropped (rule 4). A step still waiting for a person keeps its place.
        """
        if self.waiting_step is not None:
            return
        if self.next_pending() is None:
            self.next_due = None
            status = EnrollmentStatus.STOPPED if failed else EnrollmentStatus.COMPLETED
            if status == EnrollmentStatus.STOPPED:
                self.stop()
            else:
                self.complete()
            self._event(now, "ended", reason=status.value)
            return
        if not keep_due:
            self.next_due = self._schedule(now)
            if self.state == "paused":
                self.paused_remaining = timedelta(0)

    def _schedule(self, due: datetime) -> datetime:
        # NOTE: sending schedules (a weekly window in the lead's timezone) are not applied yet:
        # a step runs at the moment it falls due.
        return due

    # Recording

    def _set_status(
        self,
        step: StepState,
        status: StepStatus,
        now: datetime,
        reason: str | None,
        detail: str | None,
    ) -> None:
        if status not in STEP_MOVES[step.status]:
            raise InvalidStepMove(f"step {step.step} cannot move from {step.status} to {status}")
        step.status = status
        step.at = now
        step.reason = reason
        step.detail = detail
        self.log.append(
            LogEntry(
                seq=len(self.log) + 1,
                at=now,
                kind="step",
                status=status.value,
                step=step.step,
                step_type=step.type,
                channel=step.channel,
                reason=reason,
                detail=detail,
            )
        )

    def _unsubscribe(self, now: datetime, number: int) -> None:
        if not self.unsubscribed:
            self.unsubscribed = True
            self._event(now, "unsubscribed", step=number, reason="bounce")

    def _event(
        self,
        now: datetime,
        name: str,
        step: int | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        planned = self.plan[step - 1] if step else None
        self.log.append(
            LogEntry(
                seq=len(self.log) + 1,
                at=now,
                kind="event",
                status=name,
                step=step,
                step_type=planned.type.value if planned else None,
                channel=planned.channel.value if planned else None,
                reason=reason,
                detail=detail,
            )
        )


def plan_from_steps(steps: list) -> list[PlannedStep]:
    """Build the machine's plan from campaign steps (any objects with `type` and `wait_after`)."""
    return [
        PlannedStep(number=index, type=StepType(step.type), wait_after=step.wait_after)
        for index, step in enumerate(steps, start=1)
    ]


def is_task_step(step_type: str) -> bool:
    return StepType(step_type) in TASK_STEP_TYPES
