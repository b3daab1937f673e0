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
- 3: with a sending schedule, a step that falls due outside the window runs at the next
  opening. Waits count in calendar time; only the moment of execution moves.
- 8: an interrupted sender account (disconnected, or its daily cap reached) pauses the
  enrollment with its remaining wait frozen; the workflow resumes it.
- 9: a `linkedin_message` step that falls due while the lead's invitation is pending waits for
  the response. Declined, or not accepted within `invite_timeout` of the invitation, fails it
  with `invite_not_accepted`. An acceptance at the deadline's very instant still counts.
- 10: calls and manual tasks wait for a person's outcome, and the next wait counts from it.
- 11: a reply (not an auto-reply) skips everything left and ends the enrollment as `replied`.
- 12: an operator pauses, resumes or removes the enrollment. The `check_*` methods say why an
  operator action does not apply, so that the workflow can refuse it before it is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol

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
from sequencer.durations import format_duration
from sequencer.models import (
    LogEntry,
    MachineSnapshot,
    RecordInput,
    StepFinish,
    StepOutcome,
    StepState,
)

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


DEFAULT_INVITE_TIMEOUT = timedelta(days=14)

# The origin of a pause. An operator's pause outranks the others: only an operator resumes it.
PausedBy = Literal["operator", "account", "cap"]
# The event a waiting step waits for.
WaitingFor = Literal["task", "invitation"]
# The lead's LinkedIn invitation, from the last `linkedin_invite` step sent.
InvitationState = Literal["none", "pending", "accepted", "declined"]


class Schedule(Protocol):
    """A sending window, as `sequencer.schedule.SendingSchedule` implements it."""

    def allows(self, instant: datetime) -> bool: ...

    def next_opening(self, instant: datetime) -> datetime: ...


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
class AwaitInvitation:
    step: int
    deadline: datetime


@dataclass(frozen=True)
class AwaitResume:
    reason: str | None


@dataclass(frozen=True)
class Finished:
    status: EnrollmentStatus


Action = Execute | Sleep | AwaitTask | AwaitInvitation | AwaitResume | Finished


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

    def __init__(
        self,
        plan: list[PlannedStep],
        schedule: Schedule | None = None,
        invite_timeout: timedelta = DEFAULT_INVITE_TIMEOUT,
    ) -> None:
        if not plan:
            raise ValueError("a campaign needs at least one step")
        self.plan = plan
        self.schedule = schedule
        self.invite_timeout = invite_timeout
        self.steps = [
            StepState(step=p.number, type=p.type.value, channel=p.channel.value) for p in plan
        ]
        self.enrolled_at: datetime | None = None
        self.next_due: datetime | None = None
        self.waiting_step: int | None = None
        self.waiting_for: WaitingFor | None = None
        self.invitation: InvitationState = "none"
        self.invited_at: datetime | None = None
        self.unsubscribed = False
        self.pause_reason: str | None = None
        self.paused_by: PausedBy | None = None
        self.paused_remaining: timedelta | None = None
        self.log: list[LogEntry] = []
        # Log sequence numbers continue those of an earlier run of the same enrollment.
        self.seq_offset = 0
        # False when replaying a history recorded before invitations were waited for.
        self.gate_invitations = True
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

    def snapshot(self) -> MachineSnapshot:
        """Return the state of a running enrollment, for the next run of its workflow."""
        if self.has_ended:
            raise ValueError("an ended enrollment has no next run")
        if self._flushed != len(self.log):
            raise ValueError("write the new log entries before taking a snapshot")
        return self._snapshot([entry.model_copy() for entry in self.log], self.seq_offset)

    def handover(self) -> tuple[MachineSnapshot, list[LogEntry]]:
        """Return the state of a running enrollment for applying a step's outcome elsewhere,
        and the log entries not written yet.

        The snapshot carries no log: its entries are numbered after the log's, as here.
        """
        snapshot = self._snapshot([], self.seq_offset + len(self.log))
        return snapshot, [entry.model_copy() for entry in self.log[self._flushed :]]

    def _snapshot(self, log: list[LogEntry], seq_offset: int) -> MachineSnapshot:
        return MachineSnapshot(
            state=self.state,
            steps=[step.model_copy() for step in self.steps],
            enrolled_at=self.enrolled_at,
            next_due=self.next_due,
            waiting_step=self.waiting_step,
            waiting_for=self.waiting_for,
            invitation=self.invitation,
            invited_at=self.invited_at,
            unsubscribed=self.unsubscribed,
            pause_reason=self.pause_reason,
            paused_by=self.paused_by,
            paused_remaining=self.paused_remaining,
            log=log,
            seq_offset=seq_offset,
            gate_invitations=self.gate_invitations,
        )

    def carry_on(self, snapshot: MachineSnapshot) -> None:
        """Take over the state a previous run of this enrollment handed over."""
        self.steps = [step.model_copy() for step in snapshot.steps]
        self.enrolled_at = snapshot.enrolled_at
        self.next_due = snapshot.next_due
        self.waiting_step = snapshot.waiting_step
        self.waiting_for = snapshot.waiting_for
        self.invitation = snapshot.invitation
        self.invited_at = snapshot.invited_at
        self.unsubscribed = snapshot.unsubscribed
        self.pause_reason = snapshot.pause_reason
        self.paused_by = snapshot.paused_by
        self.paused_remaining = snapshot.paused_remaining
        self.log = [entry.model_copy() for entry in snapshot.log]
        self._flushed = len(self.log)
        self.seq_offset = snapshot.seq_offset
        self.gate_invitations = snapshot.gate_invitations
        self.machine.set_state(snapshot.state)

    def begin_again(
        self, steps: list[StepState], enrolled_at: datetime | None, now: datetime
    ) -> int:
        """Start again an enrollment that ended, from its first step never executed (rule 12).

        Executed steps keep their status; skipped and pending ones are pending again. Returns
        the number of the step that runs next.

        NOTE: the invitation's state is not carried over, so a LinkedIn message of the new
        run is sent without waiting for an acceptance.
        """
        executed = (StepStatus.SENT, StepStatus.FAILED, StepStatus.BOUNCED)
        self.steps = [
            step.model_copy()
            if step.status in executed
            else StepState(step=step.step, type=step.type, channel=step.channel)
            for step in steps
        ]
        first = self.next_pending()
        if first is None:
            raise ValueError("every step of this enrollment was executed: nothing to resume")
        self.start()
        self.enrolled_at = enrolled_at or now
        self.next_due = self._schedule(now, now)
        self._event(now, "resumed", detail=f"from step {first.step}")
        return first.step

    # Reading the state

    @property
    def status(self) -> EnrollmentStatus:
        if self.state == "enrolled":
            return EnrollmentStatus.RUNNING
        return EnrollmentStatus(self.state)

    @property
    def has_ended(self) -> bool:
        return self.state in FINAL_STATUSES

    @property
    def invite_deadline(self) -> datetime | None:
        if self.invited_at is None:
            return None
        return self.invited_at + self.invite_timeout

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

    def unwritten(self) -> list[LogEntry]:
        """Return the log entries added since the last `new_entries`, without taking them."""
        return self.log[self._flushed :]

    def next_action(self, now: datetime) -> Action:
        """Decide what the workflow does next: execute, sleep, wait, or stop."""
        if self.has_ended:
            return Finished(self.status)
        if self.state == "paused":
            return AwaitResume(self.pause_reason)
        if self.waiting_for == "task" and self.waiting_step is not None:
            return AwaitTask(self.waiting_step)
        if self.waiting_for == "invitation" and self.waiting_step is not None:
            deadline = self.invite_deadline
            if self.invitation == "pending" and deadline is not None and now < deadline:
                return AwaitInvitation(self.waiting_step, deadline)
            number = self.waiting_step
        else:
            step = self.next_pending()
            if step is None or self.next_due is None:
                raise RuntimeError("a running enrollment must have a next step")
            if now < self.next_due:
                return Sleep(self.next_due, step.step)
            number = step.step
        opening = self._opening(now)
        if opening > now:
            return Sleep(opening, number)
        return Execute(number)

    # Lifecycle

    def begin(self, now: datetime) -> None:
        """Enroll the lead: step 1 is due at once (rule 1)."""
        self.start()
        self.enrolled_at = now
        self.next_due = self._schedule(now, now)
        self._event(now, "enrolled")

    def start_step(self, number: int, now: datetime) -> bool:
        """Decide whether the channel runs a step that is due; return False when it must not.

        A `linkedin_message` step needs an accepted invitation (rule 9): while the invitation
        is pending the step waits, and once it is declined or too old the step fails.
        """
        step = self.step(number)
        if (
            not self.gate_invitations
            or step.type != StepType.LINKEDIN_MESSAGE.value
            or self.invitation in ("none", "accepted")
        ):
            return True
        deadline = self.invite_deadline
        if self.invitation == "declined":
            self._fail(step, StepStatus.FAILED, now, Reason.INVITE_NOT_ACCEPTED, "declined")
            return False
        if deadline is not None and now >= deadline:
            detail = f"not accepted within {_days(self.invite_timeout)}"
            self._fail(step, StepStatus.FAILED, now, Reason.INVITE_NOT_ACCEPTED, detail)
            return False
        if step.status == StepStatus.PENDING:
            self._set_status(step, StepStatus.WAITING, now, "invitation_pending", None)
            self.waiting_step = number
            self.waiting_for = "invitation"
        return False

    def record_outcome(
        self,
        number: int,
        status: StepStatus,
        now: datetime,
        reason: str | None = None,
        detail: str | None = None,
        invitation: str | None = None,
    ) -> None:
        """Apply the result of executing a step (the outcome a channel activity returned).

        `invitation` is "accepted" for an invitation to a lead who is already a connection.
        """
        step = self.step(number)
        if self.has_ended:
            # Removed while the step ran: the outcome is recorded, and nothing follows it.
            if status in STEP_MOVES[step.status]:
                self._set_status(step, status, now, reason, detail)
            return
        if status == StepStatus.SENT:
            self._set_status(step, StepStatus.SENT, now, reason, detail)
            if step.type == StepType.LINKEDIN_INVITE.value:
                self.invitation = "accepted" if invitation == "accepted" else "pending"
                self.invited_at = now
            self._after_executed(number, now)
        elif status == StepStatus.WAITING:
            self._set_status(step, StepStatus.WAITING, now, reason, detail)
            self.waiting_step = number
            self.waiting_for = "task"
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

    def invitation_answered(
        self, accepted: bool, now: datetime, detail: str | None = None
    ) -> EventResult:
        """Apply the lead's response to the LinkedIn invitation (rule 9)."""
        problem = self.check_invitation()
        if problem:
            return Ignored(problem)
        deadline = self.invite_deadline
        waiting = self.waiting_for == "invitation" and self.waiting_step is not None
        if accepted and deadline is not None and now > deadline:
            # Too late: the message step fails when it falls due (or failed already).
            return Ignored(self._too_late(deadline))
        self.invitation = "accepted" if accepted else "declined"
        self._event(now, "invite_accepted" if accepted else "invite_declined", detail=detail)
        if waiting:
            self._continue_waiting_message(now)
        return Applied(f"invitation {'accepted' if accepted else 'declined'}")

    def check_invitation(self, now: datetime | None = None, accepted: bool = True) -> str | None:
        """Return why an invitation response does not apply, or None when it does."""
        if self.invitation == "none":
            return "no LinkedIn invitation was sent to this lead"
        if self.invitation != "pending":
            return f"the invitation is already {self.invitation}"
        deadline = self.invite_deadline
        if accepted and now is not None and deadline is not None and now > deadline:
            return self._too_late(deadline)
        return None

    def _too_late(self, deadline: datetime) -> str:
        return (
            f"the invitation timed out at {deadline.strftime('%Y-%m-%d %H:%M UTC')}, "
            f"{_days(self.invite_timeout)} after it was sent: its messages fail"
        )

    def _continue_waiting_message(self, now: datetime) -> None:
        number = self.waiting_step
        assert number is not None
        if self.invitation == "accepted":
            # The message is sent now (within the sending schedule) by `next_action`.
            self.next_due = self._schedule(now, now)
            return
        self.start_step(number, now)

    def task_outcome(
        self, number: int, outcome: str, now: datetime, reason: str | None = None
    ) -> EventResult:
        """Apply a person's outcome for a call or manual task (rule 10)."""
        if self.has_ended:
            return Ignored(f"the enrollment has already ended as {self.status}")
        if self.waiting_step != number or self.waiting_for != "task":
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
            self._clear_waiting()
            self._continue_or_end(now, failed=False)
        else:
            return Ignored(f"unknown task outcome {outcome!r}: use done, failed or skipped")
        return Applied(f"step {number} {outcome}")

    def replied(
        self,
        now: datetime,
        channel: str | None = None,
        auto_reply: bool = False,
        back_at: datetime | None = None,
    ) -> EventResult:
        """Apply a reply: everything left is skipped and the enrollment ends (rule 11).

        An auto-reply changes no step, except that an out-of-office reply stating the lead's
        return (`back_at`) moves a next step due earlier to that time.
        """
        if auto_reply:
            self._event(now, "auto_reply", detail=channel)
            if back_at is not None and not self.has_ended:
                return self._postpone(back_at, now)
            return Ignored("an auto-reply is recorded but does not stop the sequence")
        if self.has_ended:
            self._event(now, "reply_after_end", detail=channel)
            return Ignored(f"the enrollment had already ended as {self.status}")
        self.reply()
        self._end_remaining(now, Reason.REPLIED)
        self._event(now, "replied", detail=channel)
        self._event(now, "ended", reason=EnrollmentStatus.REPLIED.value)
        return Applied("the lead replied")

    def _postpone(self, until: datetime, now: datetime) -> EventResult:
        """Move the next step to `until` when it waits on a timer that ends earlier."""
        step = self.next_pending()
        if (
            self.state == "paused"
            or self.waiting_step is not None
            or step is None
            or self.next_due is None
        ):
            return Ignored("an auto-reply is recorded; no step waits on a timer to move")
        if until <= self.next_due:
            return Ignored(
                f"an auto-reply is recorded; step {step.step} is due after the lead's return"
            )
        self.next_due = self._schedule(until, now)
        when = self.next_due.strftime("%Y-%m-%d %H:%M UTC")
        self._event(
            now, "postponed", step=step.step, reason="out of office", detail=f"until {when}"
        )
        return Applied(f"step {step.step} moved to {when}, when the lead is back")

    # Pauses (rules 8 and 12)

    def hold(
        self, now: datetime, reason: str, by: PausedBy = "operator", detail: str | None = None
    ) -> None:
        """Pause the enrollment with its remaining wait frozen.

        An operator may pause an enrollment that an account problem paused already: it then
        stays paused until the operator resumes it.
        """
        if self.state == "paused":
            if by != "operator" or self.paused_by == "operator":
                raise MachineError(f"the enrollment is already paused ({self.pause_reason})")
            self.paused_by = by
            self.pause_reason = reason
            self._event(now, "paused", reason=reason, detail=detail or by)
            return
        if self.state != "running":
            raise MachineError(f"cannot pause an enrollment that is {self.status}")
        self.pause()
        self.pause_reason = reason
        self.paused_by = by
        self.paused_remaining = max(self.next_due - now, timedelta(0)) if self.next_due else None
        self._event(now, "paused", reason=reason, detail=detail or by)

    def release(self, now: datetime, detail: str | None = None) -> None:
        """Resume a paused enrollment with the wait it had left."""
        self.resume()
        if self.paused_remaining is not None:
            self.next_due = self._schedule(now + self.paused_remaining, now)
        self.paused_remaining = None
        self.pause_reason = None
        self.paused_by = None
        self._event(now, "resumed", detail=detail)

    def check_pause(self) -> str | None:
        if self.has_ended:
            return f"the enrollment has already ended as {self.status}"
        if self.state == "paused" and self.paused_by == "operator":
            return "the enrollment is already paused by an operator"
        return None

    def check_resume(self) -> str | None:
        if self.has_ended:
            return f"the enrollment has already ended as {self.status}"
        if self.state != "paused":
            return "the enrollment is not paused"
        if self.paused_by == "cap":
            return (
                f"the enrollment waits for a sending slot ({self.pause_reason}); it resumes by "
                "itself at its slot, or reassign it to another sender"
            )
        if self.paused_by != "operator":
            return (
                f"the enrollment is paused because {self.pause_reason}; it resumes by itself "
                "once the account works again, or reassign it to another sender"
            )
        return None

    def check_remove(self) -> str | None:
        if self.has_ended:
            return f"the enrollment has already ended as {self.status}"
        return None

    def remove_lead(self, now: datetime, detail: str | None = None) -> EventResult:
        """End the enrollment as `removed`: every step not executed yet is skipped."""
        problem = self.check_remove()
        if problem:
            return Ignored(problem)
        self.remove()
        self._end_remaining(now, "removed")
        self.paused_remaining = None
        self._event(now, "ended", reason=EnrollmentStatus.REMOVED.value, detail=detail)
        return Applied("the lead was removed from the campaign")

    def note(self, now: datetime, name: str, detail: str | None = None) -> None:
        """Record an event that changes no step, such as a reassignment."""
        self._event(now, name, detail=detail)

    def delay_start(self, until: datetime, now: datetime, reason: str) -> None:
        """Hold step 1 back until `until`, such as the campaign's next free start of the day."""
        self._event(
            now, "waiting", reason=reason, detail=f"until {until.strftime('%Y-%m-%d %H:%M UTC')}"
        )
        self.next_due = self._schedule(until, now)

    def mark_unsubscribed(self, now: datetime, reason: str) -> EventResult:
        if self.unsubscribed:
            return Ignored("the address is already unsubscribed")
        self.unsubscribed = True
        self._event(now, "unsubscribed", reason=reason)
        return Applied("unsubscribed")

    def mark_resubscribed(self, now: datetime) -> EventResult:
        if not self.unsubscribed:
            return Ignored("the address is not unsubscribed")
        self.unsubscribed = False
        self._event(now, "resubscribed")
        return Applied("re-subscribed")

    # Decisions

    def _after_executed(self, number: int, now: datetime) -> None:
        """Schedule the next step `wait_after` of the executed step later (rule 2)."""
        if self.waiting_step == number:
            self._clear_waiting()
        self._set_due(self._schedule(now + self.plan[number - 1].wait_after, now), now)
        self._continue_or_end(now, failed=False, keep_due=True)

    def _fail(
        self, step: StepState, status: StepStatus, now: datetime, reason: str, detail: str | None
    ) -> None:
        """Apply the failed-step rule (rule 4), and unsubscribe on a bounce (rule 5)."""
        self._set_status(step, status, now, reason, detail)
        if self.waiting_step == step.step:
            self._clear_waiting()
        if status == StepStatus.BOUNCED:
            self._unsubscribe(now, step.step)
        cause = f"step {step.step} {status}"
        for other in self.steps:
            if other.channel != step.channel:
                continue
            if other.status == StepStatus.PENDING or (
                other.status == StepStatus.WAITING and self.waiting_for == "invitation"
            ):
                self._set_status(other, StepStatus.SKIPPED, now, cause, reason)
                if self.waiting_step == other.step:
                    self._clear_waiting()
        if step.type == StepType.LINKEDIN_INVITE.value:
            self.invitation = "none"
        self._continue_or_end(now, failed=True)

    def _skip_channel(
        self, step: StepState, now: datetime, reason: str, detail: str | None
    ) -> None:
        """Skip a step the channel cannot carry out, such as an email to an unsubscribed address,
        and the channel's remaining steps with it. It is not a failure of the lead."""
        self._set_status(step, StepStatus.SKIPPED, now, reason, detail)
        if self.waiting_step == step.step:
            self._clear_waiting()
        for other in self.steps:
            if other.channel == step.channel and other.status == StepStatus.PENDING:
                self._set_status(
                    other, StepStatus.SKIPPED, now, reason, f"step {step.step} skipped"
                )
        self._continue_or_end(now, failed=True)

    def _continue_or_end(self, now: datetime, failed: bool, keep_due: bool = False) -> None:
        """End the enrollment when no step is left, else make the next step due.

        After a failure or a skip the next step is due at once, because the waits that led up
        to it are dropped (rule 4). A step still waiting keeps its place.
        """
        if self.waiting_step is not None:
            return
        if self.next_pending() is None:
            self.next_due = None
            self.paused_remaining = None
            status = EnrollmentStatus.STOPPED if failed else EnrollmentStatus.COMPLETED
            if status == EnrollmentStatus.STOPPED:
                self.stop()
            else:
                self.complete()
            self._event(now, "ended", reason=status.value)
            return
        if not keep_due:
            self._set_due(self._schedule(now, now), now)

    def _set_due(self, due: datetime, now: datetime) -> None:
        self.next_due = due
        if self.state == "paused":
            self.paused_remaining = max(due - now, timedelta(0))

    def _clear_waiting(self) -> None:
        self.waiting_step = None
        self.waiting_for = None

    def _end_remaining(self, now: datetime, reason: str) -> None:
        for step in self.steps:
            if step.status in (StepStatus.PENDING, StepStatus.WAITING):
                self._set_status(step, StepStatus.SKIPPED, now, reason, None)
        self._clear_waiting()
        self.next_due = None

    def _schedule(self, due: datetime, now: datetime) -> datetime:
        """Move a due time into the sending window (rule 3), and log a `waiting` event if moved."""
        if self.schedule is None:
            return due
        opening = self.schedule.next_opening(due)
        if opening > due:
            self._event(
                now,
                "waiting",
                reason="outside the sending schedule",
                detail=f"until {opening.strftime('%Y-%m-%d %H:%M UTC')}",
            )
        return opening

    def _opening(self, now: datetime) -> datetime:
        return self.schedule.next_opening(now) if self.schedule else now

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
                seq=self.seq_offset + len(self.log) + 1,
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
                seq=self.seq_offset + len(self.log) + 1,
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


def _days(delta: timedelta) -> str:
    """Write a duration for people: `14 days`, `1 day`, `36h`, `30s`."""
    days = delta / timedelta(days=1)
    if days == int(days):
        return f"{int(days)} day" + ("" if days == 1 else "s")
    return format_duration(delta)


def plan_from_steps(steps: list) -> list[PlannedStep]:
    """Build the machine's plan from campaign steps (any objects with `type` and `wait_after`)."""
    return [
        PlannedStep(number=index, type=StepType(step.type), wait_after=step.wait_after)
        for index, step in enumerate(steps, start=1)
    ]


def finish_step(
    finish: StepFinish, number: int, outcome: StepOutcome, now: datetime
) -> RecordInput | None:
    """Apply a step's outcome to the machine that `finish` describes, and return what to write
    when the enrollment ends with it. That is the entries not written yet, those of the outcome
    and of the end, and the final status. Return None when it does not end: the workflow writes
    later."""
    machine = LeadSequence(
        plan_from_steps(finish.steps),
        schedule=finish.schedule,
        invite_timeout=finish.invite_timeout,
    )
    machine.carry_on(finish.machine)
    machine.record_outcome(
        number, outcome.status, now, outcome.reason, outcome.detail, invitation=outcome.invitation
    )
    if not machine.has_ended:
        return None
    return finish.record.model_copy(
        update={
            "entries": [*finish.record.entries, *machine.new_entries()],
            "status": machine.status.value,
            "unsubscribed": machine.unsubscribed,
        }
    )


def is_task_step(step_type: str) -> bool:
    return StepType(step_type) in TASK_STEP_TYPES
