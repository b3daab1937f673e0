"""Operations on campaigns, leads, events and tasks, shared by the CLI and the HTTP API.

Each operation validates first and changes nothing when it does not apply; errors are
`ServiceError`s whose message names the value and what to do next.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from sequencer.campaign import Campaign, load_campaign
from sequencer.channels import Channel, EnrollmentStatus, StepStatus
from sequencer.config import Settings, read_stack_file
from sequencer.leads import ImportReport, read_leads
from sequencer.models import (
    TASK_QUEUE,
    EnrollmentInput,
    LateFailure,
    Lead,
    LogEntry,
    Reply,
    StepState,
    TaskOutcome,
    workflow_id_for,
)
from sequencer.storage import CampaignStats, EnrollmentRow, NotFoundError, Store, TaskRow
from sequencer.temporal import connect
from workflows.lead_machine import LeadSequence, plan_from_steps
from workflows.lead_sequence import CAMPAIGN_KEY, STAGE_KEY, STATUS_KEY, LeadSequenceWorkflow

logger = logging.getLogger(__name__)

# Enrollment starts in flight at once: enough to import thousands of leads in minutes without
# exceeding the server's per-namespace request limits.
START_CONCURRENCY = 16
TASK_OUTCOMES = ("done", "failed", "skipped")


class ServiceError(Exception):
    """An operation that cannot be carried out. The message gives the reason and the next step."""


@dataclass
class LaunchReport:
    campaign: Campaign
    import_report: ImportReport
    enrolled: list[str] = field(default_factory=list)
    already_enrolled: list[str] = field(default_factory=list)


@dataclass
class ActivityReport:
    campaign: Campaign
    enrollment: EnrollmentRow
    steps: list[StepState]
    log: list[LogEntry]
    workflow_url: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign.name,
            "campaign_id": self.campaign.id,
            "lead": self.enrollment.lead_key,
            "workflow_id": self.enrollment.workflow_id,
            "workflow_url": self.workflow_url,
            "status": self.enrollment.status,
            "unsubscribed": self.enrollment.unsubscribed,
            "steps": [json.loads(step.model_dump_json()) for step in self.steps],
            "log": [json.loads(entry.model_dump_json()) for entry in self.log],
        }


class Sequencer:
    """Entry point for every operation: one per process, with lazily built clients."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.database_url)
        self._client = client

    async def client(self) -> Client:
        if self._client is None:
            try:
                self._client = await connect(
                    self.settings.temporal_address, self.settings.temporal_namespace
                )
            except RuntimeError as error:
                raise ServiceError(
                    f"cannot reach the Temporal server at {self.settings.temporal_address} "
                    f"({error}); start the local stack with `sequencer up` or set TEMPORAL_ADDRESS"
                ) from None
        return self._client

    def close(self) -> None:
        self.store.close()

    # Campaigns and leads

    async def launch(
        self,
        campaign_path: str | Path,
        leads_path: str | Path,
        progress: Callable[[int, int], None] | None = None,
        campaign_id: str | None = None,
        smtp_url: str | None = None,
    ) -> LaunchReport:
        """Import leads and enroll each valid one; leads already enrolled are left alone.

        `campaign_id` and `smtp_url` override the file's, as the demo does for its local stack.
        """
        campaign = load_campaign(campaign_path)
        if campaign_id:
            campaign = campaign.model_copy(update={"id": campaign_id})
        if smtp_url and campaign.sender:
            sender = campaign.sender.model_copy(update={"smtp_url": smtp_url})
            campaign = campaign.model_copy(update={"sender": sender})
        report = read_leads(Path(leads_path), campaign)
        self._check_same_steps(campaign)
        client = await self.client()
        self.store.save_campaign(campaign)

        result = LaunchReport(campaign=campaign, import_report=report)
        leads = [imported.lead for imported in report.leads]
        done = 0
        semaphore = asyncio.Semaphore(START_CONCURRENCY)

        async def enroll(lead: Lead) -> None:
            nonlocal done
            async with semaphore:
                started = await self._start(client, campaign, lead)
            (result.enrolled if started else result.already_enrolled).append(lead.key)
            done += 1
            if progress:
                progress(done, len(leads))

        await asyncio.gather(*(enroll(lead) for lead in leads))
        logger.info(
            "Launched campaign %s: %d enrolled, %d already enrolled, %d rows rejected",
            campaign.id,
            len(result.enrolled),
            len(result.already_enrolled),
            len(report.rejected),
        )
        return result

    def _check_same_steps(self, campaign: Campaign) -> None:
        try:
            existing = self.store.get_campaign(campaign.id)
        except NotFoundError:
            return
        if existing.steps != campaign.steps:
            raise ServiceError(
                f"campaign {campaign.id!r} is already launched with different steps; running "
                "leads keep the steps they started with, so give the changed campaign a new "
                "name (or an `id:` field) and launch that"
            )

    async def _start(self, client: Client, campaign: Campaign, lead: Lead) -> bool:
        workflow_id = workflow_id_for(campaign.id, lead.key)
        self.store.add_enrollment(workflow_id, campaign.id, lead)
        try:
            await client.start_workflow(
                LeadSequenceWorkflow.run,
                EnrollmentInput(campaign=campaign, lead=lead),
                id=workflow_id,
                task_queue=TASK_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(CAMPAIGN_KEY, campaign.id),
                        SearchAttributePair(STATUS_KEY, EnrollmentStatus.RUNNING.value),
                        SearchAttributePair(STAGE_KEY, "step-1"),
                    ]
                ),
                static_summary=f"Lead {workflow_id.rsplit('-', 1)[-1]} in campaign {campaign.id}",
                static_details=(
                    f"Campaign **{campaign.name}** ({len(campaign.steps)} steps: "
                    + ", ".join(step.type for step in campaign.steps)
                    + ")"
                ),
            )
        except WorkflowAlreadyStartedError:
            return False
        return True

    # Reports

    def activity(self, campaign_ref: str, lead_ref: str) -> ActivityReport:
        campaign = self._campaign(campaign_ref)
        enrollment = self._enrollment(campaign, lead_ref)
        return ActivityReport(
            campaign=campaign,
            enrollment=enrollment,
            steps=self.store.step_states(enrollment.workflow_id, campaign),
            log=self.store.log(enrollment.workflow_id),
            workflow_url=self.workflow_url(enrollment.workflow_id),
        )

    def stats(self, campaign_ref: str) -> CampaignStats:
        return self.store.stats(self._campaign(campaign_ref).id)

    def enrollments(self, campaign_ref: str) -> list[EnrollmentRow]:
        return self.store.list_enrollments(self._campaign(campaign_ref).id)

    def workflow_url(self, workflow_id: str) -> str | None:
        stack = read_stack_file(self.settings.stack_file)
        ui = stack.get("ui_url")
        return (
            f"{ui}/namespaces/{self.settings.temporal_namespace}/workflows/{workflow_id}"
            if ui
            else None
        )

    # Events reported by the world

    async def report_failure(
        self,
        campaign_ref: str,
        lead_ref: str,
        step: int,
        reason: str,
        bounced: bool,
        detail: str | None = None,
    ) -> str:
        """Report a bounce or a failed step after it ran; returns what happened, in a sentence."""
        campaign = self._campaign(campaign_ref)
        enrollment = self._enrollment(campaign, lead_ref)
        repeated = self._check_failure(campaign, enrollment, step, bounced)
        if repeated:
            return repeated

        failure = LateFailure(step=step, reason=reason, bounced=bounced, detail=detail)
        client = await self.client()
        handle = client.get_workflow_handle(enrollment.workflow_id)
        try:
            result = await handle.execute_update("apply_failure", failure, result_type=str)
        except WorkflowUpdateFailedError as error:
            cause = error.cause
            message = cause.message if isinstance(cause, ApplicationError) else str(cause)
            if "already" in message:
                return f"{enrollment.lead_key}: {message}; nothing changed"
            raise ServiceError(f"{enrollment.lead_key}: {message}") from None
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            # The workflow has ended: the failure is still recorded, by this process.
            return self._failure_after_end(campaign, enrollment, failure)
        return f"{enrollment.lead_key}: {result}"

    def _check_failure(
        self, campaign: Campaign, enrollment: EnrollmentRow, step: int, bounced: bool
    ) -> str | None:
        """Raise ServiceError when a late failure cannot apply; return a message for a repeat."""
        if not 1 <= step <= len(campaign.steps):
            raise ServiceError(
                f"step {step} does not exist: campaign {campaign.id!r} has "
                f"{len(campaign.steps)} steps"
            )
        if bounced and campaign.steps[step - 1].channel != Channel.EMAIL:
            raise ServiceError(
                f"step {step} is a {campaign.steps[step - 1].type} step: only email steps bounce; "
                "report it with `sequencer event fail` instead"
            )
        state = self.store.step_states(enrollment.workflow_id, campaign)[step - 1]
        if state.status in (StepStatus.FAILED, StepStatus.BOUNCED):
            return (
                f"step {step} of {enrollment.lead_key} is already {state.status} "
                f"({state.reason}); nothing changed"
            )
        if state.status not in (StepStatus.SENT, StepStatus.WAITING):
            raise ServiceError(
                f"step {step} of {enrollment.lead_key} is {state.status}, not sent: a failure "
                "applies only to a step that ran; check the step number with `sequencer activity`"
            )
        return None

    def _failure_after_end(
        self, campaign: Campaign, enrollment: EnrollmentRow, failure: LateFailure
    ) -> str:
        """Record a late failure for an enrollment whose workflow has ended (rule 7)."""
        status = EnrollmentStatus(enrollment.status)
        if not status.is_final:
            raise ServiceError(
                f"the workflow of {enrollment.lead_key} is not running but its status is {status}; "
                "check the worker and the Temporal server"
            )
        sequence = LeadSequence.restore(
            plan_from_steps(campaign.steps),
            self.store.step_states(enrollment.workflow_id, campaign),
            status,
            enrollment.unsubscribed,
            enrollment.enrolled_at,
        )
        now = datetime.now(UTC)
        sequence.late_failure(failure.step, failure.reason, now, failure.bounced, failure.detail)
        kind = "bounce" if failure.bounced else "fail"
        for index, entry in enumerate(sequence.log):
            self.store.record_external(
                enrollment.workflow_id, f"{kind}:{failure.step}:{index}", entry
            )
        if failure.bounced and enrollment.lead.email:
            self.store.suppress(enrollment.lead.email, "bounce", enrollment.workflow_id)
            self.store.set_unsubscribed(enrollment.workflow_id)
        return (
            f"step {failure.step} marked {'bounced' if failure.bounced else 'failed'}; the "
            f"enrollment had already ended as {status} and stays so"
        )

    async def report_reply(
        self, campaign_ref: str, lead_ref: str, channel: str | None, auto_reply: bool
    ) -> str:
        campaign = self._campaign(campaign_ref)
        enrollment = self._enrollment(campaign, lead_ref)
        reply = Reply(channel=channel, auto_reply=auto_reply)
        if await self._signal(enrollment.workflow_id, "report_reply", reply):
            if auto_reply:
                return f"{enrollment.lead_key}: auto-reply recorded; the sequence goes on"
            return f"{enrollment.lead_key}: reply recorded; the sequence stops"
        self.store.record_external(
            enrollment.workflow_id,
            f"reply:{datetime.now(UTC).isoformat()}",
            LogEntry(
                seq=0, at=datetime.now(UTC), kind="event", status="reply_after_end", detail=channel
            ),
        )
        return f"reply recorded; the enrollment had already ended as {enrollment.status}"

    # Tasks

    def tasks(self, status: str | None = "open", campaign_ref: str | None = None) -> list[TaskRow]:
        campaign_id = self._campaign(campaign_ref).id if campaign_ref else None
        return self.store.list_tasks(status, campaign_id)

    async def close_task(self, task_id: int, outcome: str, note: str | None = None) -> str:
        """Complete, fail or skip a task, and tell the lead's workflow."""
        try:
            task = self.store.get_task(task_id)
        except NotFoundError as error:
            raise ServiceError(str(error)) from None
        if outcome not in TASK_OUTCOMES:
            raise ServiceError(f"invalid task outcome {outcome!r}: use done, failed or skipped")
        # The task's status is named like the outcome. Close the task before signalling the
        # workflow: once signalled, the workflow may end the enrollment and cancel the tasks
        # still open, this one included. Closing is atomic, so a repeat finds it closed.
        status = outcome
        signal = TaskOutcome(step=task.step, outcome=outcome, reason=note)
        if not self.store.close_task(task_id, status, note):
            current = self.store.get_task(task_id).status
            if current == status:
                return f"task {task_id} is already {current}; nothing changed"
            raise ServiceError(f"task {task_id} is already {current}; nothing changed")
        try:
            delivered = await self._signal(task.workflow_id, "report_task", signal)
        except BaseException:
            self.store.set_task_status(task_id, "open", None)
            raise
        if not delivered:
            self.store.set_task_status(task_id, "cancelled", "the enrollment had already ended")
            raise ServiceError(f"task {task_id}: the lead's enrollment has already ended")
        return f"task {task_id} {status}"

    # Helpers

    def _campaign(self, reference: str) -> Campaign:
        try:
            return self.store.get_campaign(reference)
        except NotFoundError as error:
            raise ServiceError(str(error)) from None

    def _enrollment(self, campaign: Campaign, lead_ref: str) -> EnrollmentRow:
        try:
            return self.store.get_enrollment(campaign.id, lead_ref)
        except NotFoundError as error:
            raise ServiceError(str(error)) from None

    async def _signal(self, workflow_id: str, name: str, argument: Any) -> bool:
        """Signal a running workflow; return False when it has already ended."""
        client = await self.client()
        handle: WorkflowHandle = client.get_workflow_handle(workflow_id)
        try:
            await handle.signal(name, argument)
        except RPCError as error:
            if error.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True
