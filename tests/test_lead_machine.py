"""The pure lead machine: timing and failure rules, without any server."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from sequencer.channels import EnrollmentStatus, StepStatus, StepType
from sequencer.schedule import SendingSchedule
from workflows.lead_machine import (
    Applied,
    AwaitInvitation,
    AwaitTask,
    Execute,
    Finished,
    Ignored,
    LeadSequence,
    PlannedStep,
    Sleep,
)
from workflows.sender_account import EPOCH, Slot, SlotBook

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)

# A mixed campaign: baseline times when every step succeeds are 0, 1d, 3d, 4d, 7d, 8d.
MIXED = [
    (StepType.EMAIL, DAY),
    (StepType.LINKEDIN_VISIT, 2 * DAY),
    (StepType.EMAIL, DAY),
    (StepType.LINKEDIN_MESSAGE, 3 * DAY),
    (StepType.CALL, DAY),
    (StepType.EMAIL, timedelta(0)),
]


def machine(plan=MIXED) -> LeadSequence:
    sequence = LeadSequence(
        [PlannedStep(number, kind, wait) for number, (kind, wait) in enumerate(plan, start=1)]
    )
    sequence.begin(T0)
    return sequence


def drive(sequence: LeadSequence, failures: dict[int, StepStatus], now: datetime = T0) -> datetime:
    """Run the machine to its end: steps succeed unless listed, tasks are done when due."""
    for _ in range(100):
        action = sequence.next_action(now)
        if isinstance(action, Finished):
            return now
        if isinstance(action, Sleep):
            now = action.until
        elif isinstance(action, AwaitTask):
            sequence.task_outcome(action.step, "done", now)
        elif isinstance(action, Execute):
            status = failures.get(action.step)
            if status is None:
                kind = sequence.step(action.step).type
                is_task = kind in (StepType.CALL, StepType.MANUAL_TASK)
                status = StepStatus.WAITING if is_task else StepStatus.SENT
            sequence.record_outcome(action.step, status, now, reason="test")
    raise AssertionError("the machine did not finish in 100 actions")


def table(sequence: LeadSequence) -> list[tuple[int, str, timedelta | None]]:
    return [(s.step, s.status.value, s.at - T0 if s.at else None) for s in sequence.steps]


# Failing position, failure status, then the expected (step, status, at) rows and end status.
FAILURE_AT_EACH_POSITION = [
    pytest.param(
        1,
        StepStatus.BOUNCED,
        [
            (1, "bounced", 0),
            (2, "sent", 0),
            (3, "skipped", 0),
            (4, "sent", 2),
            (5, "sent", 5),
            (6, "skipped", 0),
        ],
        EnrollmentStatus.COMPLETED,
        id="step-1-email-bounces",
    ),
    pytest.param(
        1,
        StepStatus.FAILED,
        [
            (1, "failed", 0),
            (2, "sent", 0),
            (3, "skipped", 0),
            (4, "sent", 2),
            (5, "sent", 5),
            (6, "skipped", 0),
        ],
        EnrollmentStatus.COMPLETED,
        id="step-1-email-fails",
    ),
    pytest.param(
        2,
        StepStatus.FAILED,
        [
            (1, "sent", 0),
            (2, "failed", 1),
            (3, "sent", 1),
            (4, "skipped", 1),
            (5, "sent", 2),
            (6, "sent", 3),
        ],
        EnrollmentStatus.COMPLETED,
        id="step-2-visit-fails",
    ),
    pytest.param(
        3,
        StepStatus.BOUNCED,
        [
            (1, "sent", 0),
            (2, "sent", 1),
            (3, "bounced", 3),
            (4, "sent", 3),
            (5, "sent", 6),
            (6, "skipped", 3),
        ],
        EnrollmentStatus.COMPLETED,
        id="step-3-email-bounces",
    ),
    pytest.param(
        4,
        StepStatus.FAILED,
        [
            (1, "sent", 0),
            (2, "sent", 1),
            (3, "sent", 3),
            (4, "failed", 4),
            (5, "sent", 4),
            (6, "sent", 5),
        ],
        EnrollmentStatus.COMPLETED,
        id="step-4-message-fails",
    ),
    pytest.param(
        5,
        StepStatus.FAILED,
        [
            (1, "sent", 0),
            (2, "sent", 1),
            (3, "sent", 3),
            (4, "sent", 4),
            (5, "failed", 7),
            (6, "sent", 7),
        ],
        EnrollmentStatus.COMPLETED,
        id="step-5-call-fails",
    ),
    pytest.param(
        6,
        StepStatus.BOUNCED,
        [
            (1, "sent", 0),
            (2, "sent", 1),
            (3, "sent", 3),
            (4, "sent", 4),
            (5, "sent", 7),
            (6, "bounced", 8),
        ],
        EnrollmentStatus.STOPPED,
        id="last-step-bounces",
    ),
]


@pytest.mark.parametrize("position, failure, expected, end", FAILURE_AT_EACH_POSITION)
def test_failure_at_each_position(position, failure, expected, end):
    sequence = machine()
    drive(sequence, {position: failure})
    assert table(sequence) == [(n, status, days * DAY) for n, status, days in expected]
    assert sequence.status == end
    assert sequence.unsubscribed is (failure == StepStatus.BOUNCED)


def test_all_steps_sent_baseline():
    sequence = machine()
    drive(sequence, {})
    assert [row[2] for row in table(sequence)] == [d * DAY for d in (0, 1, 3, 4, 7, 8)]
    assert sequence.status == EnrollmentStatus.COMPLETED


def test_skipped_step_names_its_cause():
    sequence = machine()
    drive(sequence, {1: StepStatus.BOUNCED})
    assert sequence.step(3).reason == "step 1 bounced"
    assert sequence.step(6).reason == "step 1 bounced"


def test_late_bounce_cuts_wait_short():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    assert sequence.next_action(T0) == Sleep(T0 + DAY, 2)
    result = sequence.late_failure(1, "bounce", T0 + timedelta(hours=5), bounced=True)
    assert not isinstance(result, Ignored)
    assert sequence.next_action(T0 + timedelta(hours=5)) == Execute(2)
    assert sequence.step(3).status == StepStatus.SKIPPED


def test_duplicate_late_bounce_ignored():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    sequence.late_failure(1, "bounce", T0 + DAY / 2, bounced=True)
    entries = len(sequence.log)
    result = sequence.late_failure(1, "bounce", T0 + DAY / 2, bounced=True)
    assert isinstance(result, Ignored)
    assert "already bounced" in result.message
    assert len(sequence.log) == entries


@pytest.mark.parametrize(
    "step, bounced, message",
    [
        (2, False, "not sent"),
        (9, False, "does not exist"),
        (2, True, "only email steps can bounce"),
    ],
)
def test_late_failure_that_does_not_apply(step, bounced, message):
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    result = sequence.late_failure(step, "bounce", T0, bounced=bounced)
    assert isinstance(result, Ignored)
    assert message in result.message


def test_late_failure_after_end_keeps_status():
    sequence = machine([(StepType.EMAIL, DAY), (StepType.EMAIL, timedelta(0))])
    end = drive(sequence, {})
    assert sequence.status == EnrollmentStatus.COMPLETED
    sequence.late_failure(1, "bounce", end + DAY, bounced=True)
    assert sequence.status == EnrollmentStatus.COMPLETED
    assert sequence.step(1).status == StepStatus.BOUNCED
    assert sequence.unsubscribed is True


def test_reply_skips_everything_left():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    sequence.replied(T0 + DAY / 2, channel="email")
    assert sequence.status == EnrollmentStatus.REPLIED
    assert {s.status for s in sequence.steps[1:]} == {StepStatus.SKIPPED}
    assert {s.reason for s in sequence.steps[1:]} == {"replied"}
    assert isinstance(sequence.next_action(T0 + DAY), Finished)


def test_auto_reply_does_not_stop():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    result = sequence.replied(T0 + DAY / 2, auto_reply=True)
    assert isinstance(result, Ignored)
    assert sequence.status == EnrollmentStatus.RUNNING
    assert sequence.next_action(T0 + DAY / 2) == Sleep(T0 + DAY, 2)


def test_out_of_office_postpones_next_step():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    back = T0 + 5 * DAY

    result = sequence.replied(T0 + DAY / 2, auto_reply=True, back_at=back)

    assert isinstance(result, Applied)
    assert sequence.status == EnrollmentStatus.RUNNING
    assert sequence.next_action(T0 + DAY) == Sleep(back, 2)
    postponed = [entry for entry in sequence.log if entry.status == "postponed"]
    assert [(entry.step, entry.reason) for entry in postponed] == [(2, "out of office")]


def test_out_of_office_never_advances_step():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)

    result = sequence.replied(T0 + DAY / 2, auto_reply=True, back_at=T0 + DAY / 2)

    assert isinstance(result, Ignored)
    assert sequence.next_action(T0 + DAY / 2) == Sleep(T0 + DAY, 2)


def test_out_of_office_during_pause_ignored():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    sequence.hold(T0 + DAY / 4, "operator pause")

    result = sequence.replied(T0 + DAY / 2, auto_reply=True, back_at=T0 + 5 * DAY)

    assert isinstance(result, Ignored)
    assert not [entry for entry in sequence.log if entry.status == "postponed"]


def test_out_of_office_after_end_ignored():
    sequence = machine([(StepType.EMAIL, timedelta(0))])
    sequence.record_outcome(1, StepStatus.SENT, T0)
    assert sequence.has_ended

    result = sequence.replied(T0 + DAY, auto_reply=True, back_at=T0 + 5 * DAY)

    assert isinstance(result, Ignored)


def test_out_of_office_moves_into_schedule():
    weekdays = SendingSchedule(timezone="UTC", days="mon-fri", start="09:00", end="17:00")
    plan = [PlannedStep(number, kind, wait) for number, (kind, wait) in enumerate(MIXED, start=1)]
    sequence = LeadSequence(plan, schedule=weekdays)
    monday = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    sequence.begin(monday)
    sequence.record_outcome(1, StepStatus.SENT, monday)
    saturday = datetime(2026, 3, 7, 9, 0, tzinfo=UTC)

    sequence.replied(monday + DAY / 4, auto_reply=True, back_at=saturday)

    assert sequence.next_due == datetime(2026, 3, 9, 9, 0, tzinfo=UTC)


def test_task_wait_counts_from_completion():
    sequence = machine([(StepType.MANUAL_TASK, DAY), (StepType.EMAIL, timedelta(0))])
    sequence.record_outcome(1, StepStatus.WAITING, T0)
    assert sequence.next_action(T0 + 3 * DAY) == AwaitTask(1)
    sequence.task_outcome(1, "done", T0 + 3 * DAY)
    assert sequence.next_action(T0 + 3 * DAY) == Sleep(T0 + 4 * DAY, 2)


def test_task_outcome_for_other_step_ignored():
    sequence = machine([(StepType.MANUAL_TASK, DAY), (StepType.EMAIL, timedelta(0))])
    sequence.record_outcome(1, StepStatus.WAITING, T0)
    result = sequence.task_outcome(2, "done", T0)
    assert isinstance(result, Ignored)
    assert sequence.step(1).status == StepStatus.WAITING


def test_pause_freezes_remaining_wait():
    sequence = machine()
    sequence.record_outcome(1, StepStatus.SENT, T0)
    sequence.hold(T0 + timedelta(hours=6), "operator")
    sequence.release(T0 + 5 * DAY)
    assert sequence.next_action(T0 + 5 * DAY) == Sleep(T0 + 5 * DAY + timedelta(hours=18), 2)


def test_machine_never_imports_temporalio():
    code = "import sys, workflows.lead_machine; print('temporalio' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "False"


# Interruptions: invitations, pauses, schedules, starting again

INVITE_PLAN = [
    (StepType.LINKEDIN_INVITE, DAY),
    (StepType.LINKEDIN_MESSAGE, DAY),
    (StepType.EMAIL, timedelta(0)),
]


def invited(timeout: timedelta = 14 * DAY) -> LeadSequence:
    sequence = LeadSequence(
        [PlannedStep(n, kind, wait) for n, (kind, wait) in enumerate(INVITE_PLAN, start=1)],
        invite_timeout=timeout,
    )
    sequence.begin(T0)
    assert sequence.start_step(1, T0)
    sequence.record_outcome(1, StepStatus.SENT, T0)
    assert not sequence.start_step(2, T0 + DAY)
    assert sequence.step(2).status == StepStatus.WAITING
    return sequence


def test_acceptance_at_deadline_counts():
    sequence = invited(timeout=2 * DAY)
    deadline = T0 + 2 * DAY
    assert isinstance(sequence.next_action(deadline - timedelta(seconds=1)), AwaitInvitation)
    # Both arrive at the deadline; the workflow applies the event first.
    assert isinstance(sequence.invitation_answered(True, deadline), Applied)
    assert sequence.next_action(deadline) == Execute(2)
    assert sequence.start_step(2, deadline)
    sequence.record_outcome(2, StepStatus.SENT, deadline)
    assert sequence.next_action(deadline) == Sleep(deadline + DAY, 3)


def test_acceptance_after_the_timeout_is_refused():
    sequence = invited(timeout=2 * DAY)
    late = T0 + 2 * DAY + timedelta(seconds=1)
    # The timer fired first: the message fails, and a late acceptance changes nothing.
    assert sequence.next_action(late) == Execute(2)
    assert not sequence.start_step(2, late)
    assert sequence.step(2).reason == "invite_not_accepted"
    assert isinstance(sequence.invitation_answered(True, late), Ignored)
    assert sequence.step(3).status == StepStatus.PENDING
    assert sequence.next_action(late) == Execute(3)


def test_failed_invite_skips_waiting_message():
    sequence = invited()
    sequence.late_failure(1, "provider_rejected", T0 + 2 * DAY)
    assert sequence.step(2).status == StepStatus.SKIPPED
    assert sequence.next_action(T0 + 2 * DAY) == Execute(3)


def test_operator_pause_outranks_an_account_pause():
    sequence = machine([(StepType.EMAIL, DAY), (StepType.EMAIL, timedelta(0))])
    sequence.hold(T0, "inbox disconnected", "account")
    assert sequence.check_resume() is not None
    sequence.hold(T0 + DAY, "holiday", "operator")
    assert sequence.paused_by == "operator"
    assert sequence.check_resume() is None
    assert sequence.check_pause() == "the enrollment is already paused by an operator"
    sequence.release(T0 + 2 * DAY)
    assert sequence.next_action(T0 + 2 * DAY) == Execute(1)


def test_removal_skips_what_is_left_and_ends():
    sequence = machine([(StepType.EMAIL, DAY), (StepType.EMAIL, timedelta(0))])
    sequence.record_outcome(1, StepStatus.SENT, T0)
    assert isinstance(sequence.remove_lead(T0 + DAY / 2), Applied)
    assert sequence.status == EnrollmentStatus.REMOVED
    assert sequence.step(2).reason == "removed"
    assert isinstance(sequence.remove_lead(T0 + DAY), Ignored)
    assert sequence.check_pause() == "the enrollment has already ended as removed"


def test_schedule_across_dst_change():
    schedule = SendingSchedule(timezone="Europe/Paris", days="mon-fri", start="09:00", end="17:00")
    plan = [PlannedStep(n, StepType.EMAIL, 13 * timedelta(hours=1)) for n in range(1, 9)]
    sequence = LeadSequence(plan, schedule=schedule)
    # Friday 27 March 2026, 16:30 in Paris; the clocks move forward on Sunday 29 March.
    now = datetime(2026, 3, 27, 15, 30, tzinfo=UTC)
    sequence.begin(now)
    sends = []
    while not sequence.has_ended:
        action = sequence.next_action(now)
        if isinstance(action, Sleep):
            now = action.until
            continue
        assert isinstance(action, Execute)
        assert sequence.start_step(action.step, now)
        sends.append(now)
        sequence.record_outcome(action.step, StepStatus.SENT, now)
    assert all(schedule.allows(at) for at in sends)
    assert sends == sorted(set(sends))
    # Monday 30 March opens at 09:00 CEST, 07:00 UTC: one hour earlier in UTC than before.
    assert sends[1] == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)


def test_begin_again_from_first_unexecuted():
    sequence = machine([(StepType.EMAIL, DAY)] * 3)
    sequence.record_outcome(1, StepStatus.BOUNCED, T0, "bounce")
    assert sequence.status == EnrollmentStatus.STOPPED
    again = LeadSequence(sequence.plan)
    again.seq_offset = len(sequence.log)
    first = again.begin_again(sequence.steps, T0, T0 + 5 * DAY)
    assert first == 2
    assert [s.status for s in again.steps] == [
        StepStatus.BOUNCED,
        StepStatus.PENDING,
        StepStatus.PENDING,
    ]
    assert again.next_action(T0 + 5 * DAY) == Execute(2)
    assert again.log[0].seq == len(sequence.log) + 1


def test_slot_book_keeps_every_window_within_the_cap():
    book = SlotBook([])
    times = []
    for number in range(30):
        now = T0 + number * timedelta(hours=1)
        at, _ = book.next_free(now, "email", 7, timedelta(minutes=5))
        book.book(Slot(at=at, kind="email", workflow_id=f"w{number}", step=1))
        times.append(at)
    times.sort()
    assert all(b - a >= timedelta(minutes=5) for a, b in zip(times, times[1:], strict=False))
    assert max(sum(1 for t in times if s <= t < s + DAY) for s in times) <= 7


def _naive_next_free(slots, now, kind, cap, spacing):
    """The booking rules written the slow, obvious way: a scan of every slot."""
    window, margin, tiny = timedelta(hours=24), timedelta(minutes=1), timedelta(microseconds=1)
    at, reason = now, None
    while True:
        clash = next(
            (s.at for s in sorted(slots, key=lambda s: s.at) if abs(s.at - at) < spacing), None
        )
        if clash is not None:
            at, reason = clash + spacing, reason or "spacing"
            continue
        same = sorted(s.at for s in slots if s.kind == kind)
        starts = [at - window + tiny, *same, *(t - window + tiny for t in same)]
        busiest = max(
            sum(1 for t in same if w <= t < w + window) for w in starts if at - window < w <= at
        )
        if cap is not None and busiest >= cap:
            at, reason = min(t + window + margin for t in same if t + window + margin > at), "cap"
            continue
        return at, reason


def test_slot_book_matches_plain_scan():
    """Random bookings, releases, prunes and packs (as at continue-as-new) give the same
    slots as the obvious scan over every booked send."""
    generator = random.Random(7)
    book = SlotBook([])
    reference: list[Slot] = []
    now = T0
    for number in range(400):
        now += timedelta(minutes=generator.choice([0, 1, 7, 30, 180, 600]))
        kind = generator.choice(["email", "linkedin_visit", "linkedin_invite"])
        cap = generator.choice([None, 3, 5, 20])
        spacing = timedelta(minutes=generator.choice([0, 2, 10]))
        expected = _naive_next_free(reference, now, kind, cap, spacing)
        assert book.next_free(now, kind, cap, spacing) == expected, number
        slot = Slot(at=expected[0], kind=kind, workflow_id=f"w{number}", step=1)
        book.book(slot)
        reference.append(slot)
        if number % 9 == 0:
            victim = generator.choice(reference)
            freed = book.release(victim.workflow_id, victim.step, now)
            assert freed == (victim.at > now)
            if freed:
                reference.remove(victim)
        if number % 50 == 49:
            book.prune(now)
            reference = [s for s in reference if s.at > now - timedelta(hours=24)]
            state_slots = book.slots
            sent = book.pack(now)
            book = SlotBook(state_slots, sent)
            reference = [
                s if s.at > now else Slot(at=s.at, kind=s.kind, workflow_id="", step=0)
                for s in reference
            ]
        assert book.count_since(now - timedelta(hours=24), now) == {
            k: n
            for k in ("email", "linkedin_visit", "linkedin_invite")
            if (n := sum(1 for s in reference if s.kind == k and now - DAY < s.at <= now))
        }
        assert book.newest() == max((s.at for s in reference), default=None)
        assert book.booked_after(now) == sum(1 for s in reference if s.at > now)


def test_slot_book_keeps_packed_sends_as_times():
    """A run started with 40,000 packed sends builds no `Slot` for them, and packs them again."""
    micro = timedelta(microseconds=1)
    sent = {
        "email": [(T0 - timedelta(seconds=n) - EPOCH) // micro for n in range(20_000)],
        "linkedin_visit": [
            (T0 - timedelta(seconds=n, microseconds=5) - EPOCH) // micro for n in range(20_000)
        ],
    }
    expected = {kind: sorted(times) for kind, times in sent.items()}
    slots: list[Slot] = []

    book = SlotBook(slots, sent)

    assert slots == []
    assert sent == {}
    assert book.count_since(T0 - DAY, T0) == {"email": 20_000, "linkedin_visit": 20_000}
    assert book.newest() == T0
    # Spacing counts the packed sends: the next free time is a minute after the newest.
    assert book.next_free(T0, "email", None, timedelta(minutes=1)) == (
        T0 + timedelta(minutes=1),
        "spacing",
    )
    assert book.pack(T0) == expected
