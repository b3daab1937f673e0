"""Activities that book a lead's sending slots and talk to its sender account's workflow.

With a database (`store`), a slot is booked there, in one transaction that locks the account:
no Temporal update, no history event on the account's side. The account's workflow still
keeps its status (rule 8). The database mirrors it. A booking on an account marked
disconnected goes to the workflow, which remembers the lead and resumes it on reconnection.

Without a database (a what-if run), the account's workflow books the slots with its `reserve`
update.

A workflow cannot send an update to another workflow, and a signal needs the other workflow
to exist. These activities send the update through update-with-start, so the account's
workflow starts when its first lead needs it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from temporalio import activity
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from sequencer.channels import StepStatus
from sequencer.models import (
    AccountProblem,
    AccountRef,
    BookedStep,
    BookedStepResult,
    SlotGrant,
    SlotRequest,
)
from workflows.lead_machine import finish_step
from workflows.sender_account import (
    AccountState,
    SenderAccountWorkflow,
    account_workflow_id,
    accounts_queue,
)

if TYPE_CHECKING:
    from sequencer.storage import Store

T = TypeVar("T")


# The server accepts a few updates in flight per workflow at a time (10 by default) and rejects
# the others as RESOURCE_EXHAUSTED. Hundreds of leads that start together all book slots on one
# account. So a rejected booking is sent again after a short random pause, for this long. Then
# the activity fails and Temporal's retry policy, with its longer backoff, takes over.
BUSY_RETRY_FOR = 20.0
BUSY_PAUSE = (0.05, 0.5)
# Updates one worker sends to one account's workflow at a time. Updates beyond the server's
# limit are rejected, and a burst of concurrent ones makes the server discard the account's
# workflow tasks again and again, so that a queue on the worker's side books faster.
UPDATES_IN_FLIGHT = 4
# How often a booking that waits for its turn heartbeats.
HEARTBEAT_INTERVAL = 5.0


async def _while_busy(call: Callable[[], Awaitable[T]]) -> T:
    """Run `call`, again after a short random pause while the server rejects it as busy."""
    deadline = time.monotonic() + BUSY_RETRY_FOR
    while True:
        try:
            return await _heartbeating(call())
        except RPCError as error:
            if error.status != RPCStatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        activity.heartbeat()
        await asyncio.sleep(random.uniform(*BUSY_PAUSE))


def start_account(account: AccountRef, task_queue: str) -> WithStartWorkflowOperation:
    """Return the start of the account's workflow for update-with-start, which joins the
    workflow when it is running already. `task_queue` is the queue of the account's leads."""
    return WithStartWorkflowOperation(
        SenderAccountWorkflow.run,
        AccountState(account=account),
        id=account_workflow_id(account.id, task_queue),
        task_queue=accounts_queue(task_queue),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary=f"Sender account {account.id}",
    )


def booking_time() -> datetime:
    """Return now for a booking: the later of this machine's clock and the server's time when
    it scheduled the activity, since a time-skipping test server runs ahead of the clock."""
    return max(datetime.now(UTC), activity.info().current_attempt_scheduled_time)


async def _heartbeating(awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, heartbeating every HEARTBEAT_INTERVAL meanwhile.

    An update waits until the account's workflow has handled it, and that workflow's tasks
    queue behind those of every lead on the task queue. With 10,000 leads starting at once,
    the wait passed the 20 s heartbeat timeout of an email step, so the booking was cancelled
    and retried again and again.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_INTERVAL)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        task.cancel()


class AccountSlotActivities:
    """`check_interval` is how often a disconnected account is checked (None: never).

    `channels` are the channel activities that `book_and_run_step` can run, by activity name.
    `store` is the database that books the slots; None leaves them to the account workflows.
    """

    def __init__(
        self,
        client: Client,
        check_interval: timedelta | None,
        channels: Mapping[str, Callable[..., Awaitable[Any]]] | None = None,
        store: Store | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._check_interval = check_interval
        self._channels = dict(channels or {})
        # Ids of the account workflows this worker's leads used, for `end_accounts`.
        self.used: set[str] = set()
        self._gates: dict[str, asyncio.Semaphore] = {}

    @asynccontextmanager
    async def _gate(self, account: AccountRef) -> AsyncIterator[None]:
        """Wait for a place among the updates in flight to `account`, heartbeating meanwhile."""
        gate = self._gates.get(account.id)
        if gate is None:
            gate = self._gates[account.id] = asyncio.Semaphore(UPDATES_IN_FLIGHT)
        while True:
            try:
                await asyncio.wait_for(gate.acquire(), HEARTBEAT_INTERVAL)
                break
            except TimeoutError:
                activity.heartbeat()
        try:
            yield
        finally:
            gate.release()

    async def end_accounts(self) -> None:
        """End the account workflows this worker's leads used, and wait until they have ended.

        Only for a worker whose task queue is thrown away afterwards (a what-if run, a test),
        and only while the worker still runs: in production an account outlives every worker.
        """
        for workflow_id in sorted(self.used):
            handle = self._client.get_workflow_handle(workflow_id)
            try:
                await handle.signal(SenderAccountWorkflow.close)
                # Polled rather than awaited: a result wait on the time-skipping server
                # can fail on a workflow started by update-with-start.
                for _ in range(200):
                    description = await handle.describe()
                    if description.status != WorkflowExecutionStatus.RUNNING:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError(f"the account workflow {workflow_id} did not end when asked")
            except RPCError as error:
                if error.status != RPCStatusCode.NOT_FOUND:
                    raise
        self.used.clear()

    def _start(
        self, account: AccountRef, task_queue: str | None = None
    ) -> WithStartWorkflowOperation:
        """Describe how to start the account's workflow if it is not running yet.

        `task_queue` defaults to the calling activity's queue.
        """
        task_queue = task_queue or activity.info().task_queue
        if account.channel != "campaign":
            account = account.model_copy(update={"check_interval": self._check_interval})
        self.used.add(account_workflow_id(account.id, task_queue))
        return start_account(account, task_queue)

    async def update_account(
        self, account: AccountRef, task_queue: str, name: str, argument: object
    ) -> str:
        """Send an operator's update (reconnect, disconnect) to an account; start it if needed."""
        answer = await self._client.execute_update_with_start_workflow(
            name,
            argument,
            start_workflow_operation=self._start(account, task_queue),
            result_type=str,
        )
        if self._store is not None and name in ("reconnect", "disconnect"):
            reconnected = name == "reconnect"
            await asyncio.to_thread(
                self._store.set_account_connected,
                account,
                reconnected,
                None if reconnected else argument,
            )
        return answer

    @activity.defn(name="reserve_slot")
    async def reserve_slot(self, request: SlotRequest) -> SlotGrant:
        """Book a sending slot on the lead's sender account."""
        return await self._reserve(request, booking_time())

    async def _reserve(self, request: SlotRequest, now: datetime) -> SlotGrant:
        store = self._store
        if store is None:
            return await self._update(request.account, SenderAccountWorkflow.reserve, request)
        # An account marked disconnected that its workflow finds connected again is marked
        # so, and then booked. Its status may change again meanwhile, a few times at most.
        for _ in range(3):
            grant = await store.writes.run(store.book_slot_in, request, now)
            if grant is not None:
                return grant
            answer = await self._update(request.account, SenderAccountWorkflow.enlist, request)
            if not answer.granted:
                return answer
            await asyncio.to_thread(store.set_account_connected, request.account, True)
        raise ApplicationError(
            f"the status of {request.account.id} kept changing during the booking; "
            "the booking is tried again"
        )

    async def _update(self, account: AccountRef, update: Any, argument: Any) -> Any:
        """Send an update to the account's workflow, starting it if needed. An update that the
        server turns away as busy is sent again after a short pause."""
        queue = getattr(argument, "lead_queue", None)
        async with self._gate(account):
            return await _while_busy(
                lambda: self._client.execute_update_with_start_workflow(
                    update, argument, start_workflow_operation=self._start(account, queue)
                )
            )

    @activity.defn(name="release_slot")
    async def release_slot(self, request: SlotRequest) -> None:
        """Free the slots a lead booked on an account and will not use (still ahead of now)."""
        if self._store is not None:
            await asyncio.to_thread(
                self._store.release_slots, request.workflow_id, booking_time(), request.account.id
            )
            return
        handle = self._client.get_workflow_handle(
            account_workflow_id(
                request.account.id, request.lead_queue or activity.info().task_queue
            )
        )
        try:
            await handle.signal(SenderAccountWorkflow.forget, request.workflow_id)
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise

    @activity.defn(name="book_and_run_step")
    async def book_and_run_step(self, booked: BookedStep) -> BookedStepResult:
        """Book the step's slot and, when the slot is free now, run the step's channel activity.

        One activity instead of two saves a workflow task and an activity per send. A slot
        that is later (spacing, a daily cap) or refused (a disconnected account) is returned
        without running anything: the lead waits or pauses, then runs the channel activity.
        A retry books the same slot again, since a booking is keyed by lead and step.
        """
        channel = self._channels.get(booked.activity)
        if channel is None:
            raise ApplicationError(
                f"this worker has no {booked.activity} activity to run step "
                f"{booked.step.step_number}; register it with the worker's activities",
                non_retryable=True,
            )
        now = booking_time()
        grant = await self._reserve(booked.slot, now)
        if not grant.granted or grant.at is None or grant.at > now:
            return BookedStepResult(grant=grant)
        result = BookedStepResult(grant=grant, outcome=await channel(booked.step))
        if booked.finish is not None and self._store is not None:
            await self._write_end(booked, result)
        return result

    async def _write_end(self, booked: BookedStep, result: BookedStepResult) -> None:
        """Write the lead's end when its last step was sent, and record that in `result`.

        A failed write is left to the workflow, which writes at rest and retries until the
        database is back: the step must not run again for it.
        """
        assert booked.finish is not None
        assert result.outcome is not None
        assert self._store is not None
        if result.outcome.status != StepStatus.SENT:
            return
        at = booking_time()
        record = finish_step(booked.finish, booked.step.step_number, result.outcome, at)
        if record is None:
            return
        try:
            await self._store.writes.run(self._store.record_in, record)
        except Exception as error:  # noqa: BLE001 - the workflow writes the same entries later
            activity.logger.warning(
                "Step %d of %s was sent; its log is left to the workflow: %s",
                booked.step.step_number,
                booked.step.workflow_id,
                error,
            )
            return
        result.recorded_at = at
        result.recorded = record.entries

    @activity.defn(name="report_account_problem")
    async def report_account_problem(self, problem: AccountProblem) -> str:
        """Mark the sender account disconnected and register the lead to resume with it."""
        answer = await self._update(problem.account, SenderAccountWorkflow.report_problem, problem)
        if self._store is not None:
            await asyncio.to_thread(
                self._store.set_account_connected, problem.account, False, problem.detail
            )
        return answer
