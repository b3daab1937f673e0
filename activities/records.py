"""Activities that write to the database: the activity log and the tasks for people."""

from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.email import LedgerEntry
from sequencer.channels import Reason, StepStatus, StepType
from sequencer.models import RecordInput, StepInput, StepOutcome, TaskInput
from sequencer.storage import Store
from sequencer.templates import MissingVariableError, render

logger = logging.getLogger(__name__)


class StoreActivities:
    def __init__(self, store: Store) -> None:
        self._store = store

    @activity.defn(name="record_activity")
    async def record_activity(self, record: RecordInput) -> int:
        """Write an enrollment's new log entries; retried writes add nothing twice."""
        try:
            return await self._store.writes.run(self._store.record_in, record)
        except OperationalError as error:
            # A locked or unreachable database: one line per attempt instead of a traceback.
            logger.warning(
                "database unavailable, Temporal retries the write: workflow %s: %s",
                record.workflow_id,
                error.orig if error.orig is not None else error,
            )
            raise ApplicationError(
                f"database unavailable: {error.orig if error.orig is not None else error}",
                category=ApplicationErrorCategory.BENIGN,
            ) from error

    @activity.defn(name="create_task")
    async def create_task(self, input: StepInput) -> StepOutcome:
        """Create the task of a call or manual step; the step then waits for its outcome."""
        step = input.step
        if step.type == StepType.CALL and not input.lead.phone:
            return StepOutcome(
                status=StepStatus.FAILED,
                reason=Reason.NO_PHONE_NUMBER,
                detail="the lead has no phone number",
            )
        try:
            instructions = render(step.instructions, input.lead.template_variables())
        except MissingVariableError as error:
            return StepOutcome(
                status=StepStatus.FAILED,
                reason=Reason.MISSING_VARIABLE,
                detail=f"{error} in instructions",
            )
        task = await self._store.writes.run(
            self._store.create_task_in,
            TaskInput(
                workflow_id=input.workflow_id,
                campaign_id=input.campaign_id,
                lead_key=input.lead.key,
                step_number=input.step_number,
                step_type=step.type,
                instructions=instructions,
            ),
        )
        logger.info(
            "Task %s created for %s step %s (%s)",
            task.id,
            input.workflow_id,
            input.step_number,
            step.type,
        )
        return StepOutcome(status=StepStatus.WAITING, detail=f"task {task.id}")


class StoreSendLedger:
    """The email channel's send ledger, kept in the database's `email_sends` table."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def claim(self, key: str, workflow_id: str, step: int, attempt: str) -> LedgerEntry:
        row = await self._store.writes.run(
            self._store.claim_send_in, key, workflow_id, step, attempt
        )
        return LedgerEntry(state=row.state, attempt=row.attempt, detail=row.detail)

    async def move(
        self, key: str, attempt: str, before: str, after: str, detail: str | None = None
    ) -> bool:
        return await self._store.writes.run(
            self._store.move_send_in, key, attempt, before, after, detail
        )

    async def release(self, key: str, attempt: str) -> None:
        await self._store.writes.run(self._store.release_send_in, key, attempt)
