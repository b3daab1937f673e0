"""SenderAccountWorkflow: one long-lived workflow per sender account, the keeper of its limits.

Every lead workflow that is about to send through an account first requests a slot from it with
the `reserve` update (sent through update-with-start by the `reserve_slot` activity, so the
account's workflow starts on first use). A workflow handles its updates one at a time, so two
leads never get the same slot, whichever worker or campaign they come from.

The account workflow also keeps the account's status (rule 8). A lead that finds the account
unusable reports it with `report_problem`, and the account is then disconnected. Every lead that
requests a slot gets a refusal and is remembered. All of them get the `account_reconnected`
signal once an operator reconnects the account or the periodic health check finds it working.

`SlotBook` is the booking arithmetic, kept free of Temporal so that it is tested on its own.
"""

from __future__ import annotations

import asyncio
import bisect
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from sequencer.durations import format_duration
    from sequencer.models import (
        TASK_QUEUE,
        AccountProblem,
        AccountRef,
        AccountStatus,
        SlotGrant,
        SlotRequest,
    )

ACCOUNT_WORKFLOW_TYPE = "SenderAccountWorkflow"
WINDOW = timedelta(hours=24)
# Continue as new well before the history limit of 2,000 updates.
UPDATES_PER_RUN = 500
# An account with no send booked and no lead waiting ends after this long. The next lead that
# needs it starts it again.
IDLE_LIFETIME = timedelta(hours=25)
CHECK_RETRY = RetryPolicy(maximum_attempts=1)
# A send held back by a cap goes out this long after the 24 hours have passed, so that the
# few seconds an earlier send took cannot put both in one window.
CAP_MARGIN = timedelta(minutes=1)


def account_workflow_id(account_id: str, task_queue: str = TASK_QUEUE) -> str:
    """Return the workflow id of a sender account.

    Accounts belong to a task queue: the production queue uses the plain id, and any other
    queue (a what-if run, a test) gets accounts of its own.
    """
    base = f"account-{account_id.replace(':', '-')}"
    return base if task_queue == TASK_QUEUE else f"{task_queue}/{base}"


def cap_detail(account_id: str, cap: int | None, kind: str) -> str:
    """Explain a send held back by the account's cap of `kind` sends in 24 hours."""
    return f"{account_id} reached its limit of {cap} {kind} sends in 24 hours"


def accounts_queue(task_queue: str) -> str:
    """Return the task queue of the account workflows that the leads of `task_queue` use."""
    return f"{task_queue}-accounts"


class Slot(BaseModel):
    at: datetime
    kind: str
    workflow_id: str
    step: int


class AccountState(BaseModel):
    """Everything the account carries across continue-as-new."""

    account: AccountRef
    connected: bool = True
    reason: str | None = None
    since: datetime | None = None
    slots: list[Slot] = Field(default_factory=list)
    # Sends of the last 24 hours that no longer need their lead and step, by kind, as
    # microseconds since the Unix epoch. As a list of Slot objects, those of a busy account
    # would outgrow the 2 MB that Temporal accepts as a workflow's input.
    sent: dict[str, list[int]] = Field(default_factory=dict)
    waiters: list[str] = Field(default_factory=list)
    last_check: str | None = None
    # An operator's disconnect is not undone by the health check, only by a reconnect.
    by_operator: bool = False
    # Updates handled before the run continues as new, carried so tests can lower it.
    updates_per_run: int = UPDATES_PER_RUN


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _at(slot: Slot) -> datetime:
    return slot.at


class SlotBook:
    """Sends booked on one account: a cap per kind over any 24 hours, and a spacing.

    The slots are kept in time order, with an index by lead and step and the times of each
    kind apart, so that a booking costs a few bisections rather than scans of every slot.
    An account can have tens of thousands of slots, and one workflow task handles the
    bookings of a burst of leads.

    Sends packed at continue-as-new (`sent`) come back as times only, by kind and all kinds
    together, not as `Slot` objects. Building 40,000 of those took half of the first task of
    a run, and on a busy worker that task passed the 2 seconds after which the SDK fails it.
    """

    def __init__(self, slots: list[Slot], sent: dict[str, list[int]] | None = None) -> None:
        self.slots = slots
        slots.sort(key=_at)
        self._index = {(s.workflow_id, s.step): s for s in slots if s.workflow_id}
        # Packed sends: their times by kind, and all of them in time order for the spacing.
        self._packed: dict[str, list[datetime]] = {
            kind: sorted(EPOCH + timedelta(microseconds=t) for t in times)
            for kind, times in (sent or {}).items()
            if times
        }
        self._past = sorted(t for times in self._packed.values() for t in times)
        if sent:
            sent.clear()
        self._times: dict[str, list[datetime]] = {
            kind: list(times) for kind, times in self._packed.items()
        }
        for slot in slots:
            bisect.insort_right(self._times.setdefault(slot.kind, []), slot.at)

    def find(self, workflow_id: str, step: int) -> Slot | None:
        return self._index.get((workflow_id, step))

    def next_free(
        self, now: datetime, kind: str, cap: int | None, spacing: timedelta
    ) -> tuple[datetime, str | None]:
        """Return the earliest time from `now` with room for one more send, and why it is later.

        Room means: no booked send of any kind closer than `spacing`, and no 24-hour window
        holding the new send would hold more than `cap` sends of `kind`.
        """
        at = now
        reason: str | None = None
        times = self._times.get(kind, [])
        for _ in range(100_000):
            clash = self._clash(at, spacing)
            if clash is not None:
                at = clash + spacing
                reason = reason or "spacing"
                continue
            if cap is not None and self._cap_reached(at, times, cap):
                # The earliest time at which a send of this kind leaves the window.
                at = times[bisect.bisect_right(times, at - WINDOW - CAP_MARGIN)] + WINDOW
                at += CAP_MARGIN
                reason = "cap"
                continue
            return at, reason
        raise RuntimeError("no free slot found: the account's bookings are inconsistent")

    def _clash(self, at: datetime, spacing: timedelta) -> datetime | None:
        """Return the earliest booked or packed send closer to `at` than `spacing`, if any."""
        if spacing <= timedelta(0):
            return None
        clashes = []
        first = bisect.bisect_right(self.slots, at - spacing, key=_at)
        if first < len(self.slots) and self.slots[first].at - at < spacing:
            clashes.append(self.slots[first].at)
        first = bisect.bisect_right(self._past, at - spacing)
        if first < len(self._past) and self._past[first] - at < spacing:
            clashes.append(self._past[first])
        return min(clashes, default=None)

    @staticmethod
    def _cap_reached(at: datetime, times: list[datetime], cap: int) -> bool:
        """Return whether some 24-hour window [w, w + 24h) around `at` contains `cap` or more
        of `times` (sorted)."""
        low = bisect.bisect_right(times, at - WINDOW)
        high = bisect.bisect_left(times, at + WINDOW)
        if high - low < cap:
            return False  # fewer sends within 24 hours of `at` than the cap: room everywhere
        near = times[low:high]
        tiny = timedelta(microseconds=1)
        starts = {at - WINDOW + tiny} | {t for t in near if t <= at}
        starts |= {t - WINDOW + tiny for t in near if t - WINDOW + tiny <= at}
        # Counted by bisection in the sorted times: a burst of bookings over thousands of
        # slots made counting each window by a scan too slow for one workflow activation.
        busiest = max(
            (
                bisect.bisect_left(near, w + WINDOW) - bisect.bisect_left(near, w)
                for w in starts
                if at - WINDOW < w
            ),
            default=0,
        )
        return busiest >= cap

    def book(self, slot: Slot) -> None:
        bisect.insort_right(self.slots, slot, key=_at)
        if slot.workflow_id:
            self._index[(slot.workflow_id, slot.step)] = slot
        bisect.insort_right(self._times.setdefault(slot.kind, []), slot.at)

    def release(self, workflow_id: str, step: int, now: datetime) -> bool:
        """Free a slot that a lead will not use. Only a slot still in the future is freed."""
        slot = self.find(workflow_id, step)
        if slot is None or slot.at <= now:
            return False
        position = bisect.bisect_left(self.slots, slot.at, key=_at)
        while self.slots[position] is not slot:
            position += 1
        del self.slots[position]
        del self._index[(workflow_id, step)]
        self._times[slot.kind].remove(slot.at)
        return True

    def prune(self, now: datetime) -> None:
        """Forget sends that no 24-hour window from now can hold."""
        cutoff = bisect.bisect_right(self.slots, now - WINDOW, key=_at)
        for slot in self.slots[:cutoff]:
            self._index.pop((slot.workflow_id, slot.step), None)
        del self.slots[:cutoff]
        for times in (*self._times.values(), *self._packed.values(), self._past):
            del times[: bisect.bisect_right(times, now - WINDOW)]

    def pack(self, now: datetime) -> dict[str, list[int]]:
        """Keep only the slots still ahead with their lead, and return the others by kind in
        the form of `AccountState.sent`. A lead asking again for a slot it already used then
        gets a new one, which only makes the cap count one send too many."""
        ahead = bisect.bisect_right(self.slots, now, key=_at)
        for slot in self.slots[:ahead]:
            bisect.insort_right(self._packed.setdefault(slot.kind, []), slot.at)
            bisect.insort_right(self._past, slot.at)
            self._index.pop((slot.workflow_id, slot.step), None)
        del self.slots[:ahead]
        micro = timedelta(microseconds=1)
        return {
            kind: [(t - EPOCH) // micro for t in times]
            for kind, times in self._packed.items()
            if times
        }

    def count_since(self, since: datetime, until: datetime) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind, times in self._times.items():
            count = bisect.bisect_right(times, until) - bisect.bisect_right(times, since)
            if count:
                counts[kind] = count
        return counts

    def newest(self) -> datetime | None:
        newest = []
        if self.slots:
            newest.append(self.slots[-1].at)
        if self._past:
            newest.append(self._past[-1])
        return max(newest, default=None)

    def booked_after(self, now: datetime) -> int:
        booked = len(self.slots) - bisect.bisect_right(self.slots, now, key=_at)
        return booked + len(self._past) - bisect.bisect_right(self._past, now)

    def of_lead(self, workflow_id: str) -> list[Slot]:
        return [s for s in self.slots if s.workflow_id == workflow_id]


@workflow.defn(name=ACCOUNT_WORKFLOW_TYPE)
class SenderAccountWorkflow:
    @workflow.init
    def __init__(self, state: AccountState) -> None:
        self._state = state
        self._book = SlotBook(state.slots, state.sent)
        self._updates = 0
        self._notify: list[str] = []
        self._closing = False

    @workflow.run
    async def run(self, state: AccountState) -> None:
        while True:
            self._publish()
            if self._closing:
                await workflow.wait_condition(workflow.all_handlers_finished)
                return
            if self._notify:
                await self._notify_waiters()
                continue
            if self._should_continue_as_new():
                await workflow.wait_condition(workflow.all_handlers_finished)
                self._book.prune(workflow.now())
                self._state.sent = self._book.pack(workflow.now())
                workflow.continue_as_new(self._state)
            if not self._state.connected:
                if self._state.account.check_interval and not self._state.by_operator:
                    await self._wait_or_check(self._state.account.check_interval)
                else:
                    # No health check: only an operator's reconnect ends the outage.
                    await workflow.wait_condition(
                        lambda: (
                            self._state.connected or self._closing or self._should_continue_as_new()
                        )
                    )
                continue
            if self._idle():
                try:
                    await workflow.wait_condition(
                        lambda: self._busy_since_idle() or self._closing,
                        timeout=IDLE_LIFETIME,
                        timeout_summary="end once idle",
                    )
                except TimeoutError:
                    if self._idle() and workflow.all_handlers_finished():
                        return
                continue
            # Busy: wake up on an event, or when the newest send leaves the 24-hour window.
            newest = self._book.newest() or workflow.now()
            try:
                await workflow.wait_condition(
                    lambda: (
                        bool(self._notify)
                        or self._closing
                        or self._should_continue_as_new()
                        or not self._state.connected
                    ),
                    timeout=max(newest + WINDOW - workflow.now(), timedelta(seconds=1)),
                    timeout_summary="the last send leaves the 24-hour window",
                )
            except TimeoutError:
                pass

    # Leads ask for slots and report problems

    @workflow.update
    def reserve(self, request: SlotRequest) -> SlotGrant:
        """Book the next free slot for one step of one lead; the same request gets the same slot."""
        self._touch()
        now = workflow.now()
        state = self._state
        if not state.connected:
            self._wait_for_account(request.workflow_id)
            return SlotGrant(granted=False, reason="disconnected", detail=state.reason)
        existing = self._book.find(request.workflow_id, request.step)
        if existing is not None:
            return SlotGrant(granted=True, at=max(existing.at, now))
        self._book.prune(now)
        at, reason = self._book.next_free(now, request.kind, request.cap, request.spacing)
        self._book.book(
            Slot(at=at, kind=request.kind, workflow_id=request.workflow_id, step=request.step)
        )
        detail = None
        if reason == "cap":
            detail = cap_detail(state.account.id, request.cap, request.kind)
        return SlotGrant(granted=True, at=at, reason=reason, detail=detail)

    @workflow.update
    def enlist(self, request: SlotRequest) -> SlotGrant:
        """Refuse a lead while the account is disconnected, and remember it; else grant without
        booking. For a lead whose slot is booked in the database, which marks the account
        disconnected."""
        self._touch()
        if not self._state.connected:
            self._wait_for_account(request.workflow_id)
            return SlotGrant(granted=False, reason="disconnected", detail=self._state.reason)
        return SlotGrant(granted=True)

    @workflow.update
    def report_problem(self, problem: AccountProblem) -> str:
        """Mark the account disconnected because a step could not use it."""
        self._touch()
        if problem.workflow_id:
            self._wait_for_account(problem.workflow_id)
        if not self._state.connected:
            return f"{self._state.account.id} is already disconnected"
        self._disconnect(problem.detail)
        return f"{self._state.account.id} is now disconnected"

    @workflow.signal
    def release(self, workflow_id: str, step: int) -> None:
        """A lead gives back a slot it will not use (it replied, was paused or reassigned)."""
        self._book.release(workflow_id, step, workflow.now())

    @workflow.signal
    def close(self) -> None:
        """End the account's workflow, for a task queue that is thrown away (a what-if run)."""
        self._closing = True

    @workflow.signal
    def forget(self, workflow_id: str) -> None:
        """Drop a lead that no longer waits for this account (it was reassigned or removed)."""
        if workflow_id in self._state.waiters:
            self._state.waiters.remove(workflow_id)
        for slot in self._book.of_lead(workflow_id):
            self._book.release(workflow_id, slot.step, workflow.now())

    # Operators

    @workflow.update
    def reconnect(self, detail: str | None) -> str:
        self._touch()
        self._connect(detail or "reconnected by an operator")
        waiting = len(self._notify)
        return (
            f"{self._state.account.id} is connected again; "
            f"{waiting} paused lead{'s' if waiting != 1 else ''} will resume"
        )

    @reconnect.validator
    def _validate_reconnect(self, detail: str | None) -> None:
        if self._state.connected:
            raise ValueError(f"{self._state.account.id} is already connected")

    @workflow.update
    def disconnect(self, detail: str | None) -> str:
        self._touch()
        self._disconnect(detail or "disconnected by an operator")
        self._state.by_operator = True
        return f"{self._state.account.id} is now disconnected"

    @disconnect.validator
    def _validate_disconnect(self, detail: str | None) -> None:
        if not self._state.connected:
            raise ValueError(
                f"{self._state.account.id} is already disconnected ({self._state.reason})"
            )

    @workflow.query
    def status(self) -> AccountStatus:
        now = workflow.now()
        state = self._state
        return AccountStatus(
            id=state.account.id,
            channel=state.account.channel,
            connected=state.connected,
            reason=state.reason,
            since=state.since,
            waiting_leads=len(state.waiters),
            sends_last_24h=self._book.count_since(now - WINDOW, now),
            booked_ahead=self._book.booked_after(now),
            last_check=state.last_check,
        )

    # Inner workings

    def _wait_for_account(self, workflow_id: str) -> None:
        if workflow_id not in self._state.waiters:
            self._state.waiters.append(workflow_id)

    def _disconnect(self, reason: str) -> None:
        state = self._state
        state.connected = False
        state.reason = reason
        state.since = workflow.now()
        workflow.logger.warning("Account %s disconnected: %s", state.account.id, reason)

    def _connect(self, detail: str) -> None:
        state = self._state
        state.connected = True
        state.by_operator = False
        state.reason = None
        state.since = workflow.now()
        state.last_check = detail
        self._notify.extend(state.waiters)
        state.waiters.clear()
        workflow.logger.info("Account %s connected: %s", state.account.id, detail)

    async def _wait_or_check(self, interval: timedelta) -> None:
        try:
            await workflow.wait_condition(
                lambda: self._state.connected or self._closing or self._should_continue_as_new(),
                timeout=interval,
                timeout_summary=f"check the account again in {format_duration(interval)}",
            )
            return
        except TimeoutError:
            pass
        try:
            result = await workflow.execute_activity(
                "check_account",
                {"channel": self._state.account.channel, "sender": self._state.account.sender},
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=CHECK_RETRY,
                summary=f"check {self._state.account.id}",
            )
        except Exception as error:  # noqa: BLE001 - a failed check is retried at the next interval
            self._state.last_check = f"the check itself failed: {error}"
            return
        if self._state.connected:
            return
        ok = bool(result.get("ok")) if isinstance(result, dict) else bool(result.ok)
        detail = result.get("detail") if isinstance(result, dict) else result.detail
        self._state.last_check = detail
        if ok:
            self._connect(f"health check: {detail}")

    async def _notify_waiters(self) -> None:
        waiters, self._notify = self._notify, []
        account_id = self._state.account.id

        async def tell(workflow_id: str) -> None:
            handle = workflow.get_external_workflow_handle(workflow_id)
            try:
                await handle.signal("account_reconnected", account_id)
            except ApplicationError:
                pass  # the lead has ended: nothing to resume
            except Exception as error:  # noqa: BLE001 - one lead must not block the others
                workflow.logger.warning(
                    "Cannot signal lead %s that %s reconnected: %s", workflow_id, account_id, error
                )

        await asyncio.gather(*(tell(w) for w in waiters))

    def _touch(self) -> None:
        self._updates += 1

    def _idle(self) -> bool:
        now = workflow.now()
        return (
            self._state.connected
            and not self._state.waiters
            and not self._notify
            and (self._book.newest() or EPOCH) <= now - WINDOW
        )

    def _busy_since_idle(self) -> bool:
        return not self._idle() or self._should_continue_as_new()

    def _should_continue_as_new(self) -> bool:
        return (
            self._updates >= self._state.updates_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    def _publish(self) -> None:
        state = self._state
        status = "connected" if state.connected else f"disconnected: {state.reason}"
        now = workflow.now()
        sent = self._book.count_since(now - WINDOW, now)
        workflow.set_current_details(
            f"**{state.account.id}**: {status}\n\n"
            f"Leads waiting for it: {len(state.waiters)}\n\n"
            "Sends in the last 24 hours: "
            + (", ".join(f"{k} {v}" for k, v in sorted(sent.items())) or "none")
        )
