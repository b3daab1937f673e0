"""Operations on campaigns, leads, events and tasks, shared by the CLI and the HTTP API.

Each operation validates first and changes nothing when it does not apply; errors are
`ServiceError`s whose message names the value and what to do next.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import hashlib
import json
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.account_slots import start_account
from sequencer.addresses import InvalidEmailError, normalize_email
from sequencer.campaign import (
    Campaign,
    LinkedInAccount,
    Sender,
    load_campaign,
    parse_campaign_text,
)
from sequencer.channels import Channel, EnrollmentStatus, StepStatus
from sequencer.codec import codec_for
from sequencer.config import Settings, read_stack_file
from sequencer.durations import format_duration
from sequencer.inbound import FailedRecipient, InboundKind, InboundMessage, classify_message
from sequencer.leads import ImportReport, read_leads
from sequencer.models import (
    TASK_QUEUE,
    AccountStatus,
    EnrollmentInput,
    InvitationAnswer,
    LateFailure,
    Lead,
    LogEntry,
    MailboxInput,
    MailboxStatus,
    OperatorAction,
    Reassignment,
    Reply,
    StepState,
    SubscriptionChange,
    TaskOutcome,
    workflow_id_for,
)
from sequencer.storage import CampaignStats, EnrollmentRow, NotFoundError, Store, TaskRow
from sequencer.temporal import connect_to
from sequencer.webhooks import InvitationEvent, WebhookRejected
from workflows.lead_machine import LeadSequence, plan_from_steps
from workflows.lead_sequence import (
    ACCOUNT_KEY,
    CAMPAIGN_KEY,
    RELEASE,
    STAGE_KEY,
    STATUS_KEY,
    LeadSequenceWorkflow,
    start_search_attributes,
)
from workflows.mailbox import MAILBOX_WORKFLOW_TYPE, MailboxWorkflow, mailbox_workflow_id
from workflows.sender_account import (
    ACCOUNT_WORKFLOW_TYPE,
    account_workflow_id,
)

logger = logging.getLogger(__name__)

# Enrollment starts in flight at once: enough to import thousands of leads in minutes without
# exceeding the server's per-namespace request limits.
START_CONCURRENCY = 16
# Enrollment rows written in one transaction. A launch writes a batch before it starts the
# batch's workflows, so that a lead never runs without its row. If the launch is cut short,
# the next launch of the file starts the leads that have a row and no workflow.
ENROLLMENT_BATCH = 250
TASK_OUTCOMES = ("done", "failed", "skipped")


class ServiceError(Exception):
    """An operation that cannot be carried out. The message gives the reason and the next step."""


class ServiceNotFoundError(ServiceError):
    """An operation on a campaign, lead, task or mailbox that does not exist."""


@dataclass
class LaunchReport:
    campaign: Campaign
    import_report: ImportReport
    enrolled: list[str] = field(default_factory=list)
    already_enrolled: list[str] = field(default_factory=list)
    # The poller that reads the sender's mailbox, if one does.
    mailbox: MailboxWatch | None = None


@dataclass
class MailboxWatch:
    """The poller reading a sender's mailbox after a launch, and what the launch found."""

    workflow_id: str
    imap_url: str
    # The IMAP URL the poller used before this launch moved it, if it did.
    moved_from: str | None = None
    # Why the IMAP server could not be reached just now, if it could not.
    problem: str | None = None


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
                self._client = await connect_to(self.settings, codec_for(self.settings))
            except ValueError as error:
                raise ServiceError(str(error)) from None
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
        sender_email: str | None = None,
    ) -> LaunchReport:
        """Import leads and enroll each valid one; leads already enrolled are left alone.

        `campaign_id`, `smtp_url` and `sender_email` override the file's, as the demo does for
        its local stack.
        """
        campaign = load_campaign(campaign_path)
        if campaign_id:
            campaign = campaign.model_copy(update={"id": campaign_id})
        if (smtp_url or sender_email) and campaign.sender:
            changes = {"smtp_url": smtp_url, "email": sender_email}
            sender = campaign.sender.model_copy(
                update={key: value for key, value in changes.items() if value}
            )
            campaign = campaign.model_copy(update={"sender": sender})
        report = read_leads(Path(leads_path), campaign)
        return await self._enroll_all(campaign, report, progress)

    async def launch_content(
        self,
        campaign_text: str,
        leads: bytes,
        *,
        campaign_name: str = "campaign.yaml",
        leads_name: str = "leads.csv",
        progress: Callable[[int, int], None] | None = None,
    ) -> LaunchReport:
        """Launch from uploaded contents: campaign YAML (or JSON) text and lead CSV bytes.

        The names appear in error messages. Raises CampaignError, LeadFileError or
        ServiceError, as `launch` does.
        """
        campaign = parse_campaign_text(campaign_text, campaign_name)
        report = read_leads(leads, campaign, source_name=leads_name)
        return await self._enroll_all(campaign, report, progress)

    async def launch_saved(
        self, campaign_ref: str, leads: bytes, *, leads_name: str = "leads.csv"
    ) -> LaunchReport:
        """Import lead CSV bytes into a saved campaign and enroll each valid lead."""
        campaign = self._campaign(campaign_ref)
        report = read_leads(leads, campaign, source_name=leads_name)
        return await self._enroll_all(campaign, report, None)

    def save_campaign(self, campaign: Campaign) -> None:
        """Save a campaign without enrolling anyone; a launched one keeps its steps."""
        self._check_same_steps(campaign)
        self.store.save_campaign(campaign)

    def campaign(self, campaign_ref: str) -> Campaign:
        """Return a saved campaign by id or name; raises ServiceNotFoundError."""
        return self._campaign(campaign_ref)

    async def _enroll_all(
        self,
        campaign: Campaign,
        report: ImportReport,
        progress: Callable[[int, int], None] | None,
    ) -> LaunchReport:
        self._check_same_steps(campaign)
        client = await self.client()
        self.store.save_campaign(campaign)

        result = LaunchReport(campaign=campaign, import_report=report)
        leads = [imported.lead for imported in report.leads]
        workflow_ids = [workflow_id_for(campaign.id, lead.key) for lead in leads]
        writes: dict[int, asyncio.Future[set[str]]] = {}
        started: set[str] = set()
        # Starts sent to the server that have not returned yet. If the launch is cancelled,
        # their workflows may or may not have started: the server is asked.
        in_flight: set[str] = set()
        failure: BaseException | None = None
        done = 0
        semaphore = asyncio.Semaphore(START_CONCURRENCY)

        def written(batch: int) -> asyncio.Future[set[str]]:
            """Write a batch's enrollment rows once, in a thread, and give the ids it added."""
            if batch not in writes:
                rows = slice(batch * ENROLLMENT_BATCH, (batch + 1) * ENROLLMENT_BATCH)
                pairs = list(zip(workflow_ids[rows], leads[rows], strict=True))
                writes[batch] = asyncio.ensure_future(
                    asyncio.to_thread(self.store.add_enrollments, campaign.id, pairs)
                )
            return writes[batch]

        async def enroll(index: int, lead: Lead) -> None:
            nonlocal done, failure
            batch, place = divmod(index, ENROLLMENT_BATCH)
            workflow_id = workflow_ids[index]
            async with semaphore:
                if failure is not None:
                    return  # the launch stops at its first failure
                if place == 0 and index + ENROLLMENT_BATCH < len(leads):
                    written(batch + 1)  # written while this batch starts
                try:
                    # Shielded: a cancelled start must not cancel its batch's write, which
                    # the other leads of the batch wait for.
                    await asyncio.shield(written(batch))
                    in_flight.add(workflow_id)
                    new = await self._start(client, campaign, lead, workflow_id)
                    in_flight.discard(workflow_id)
                except Exception as error:
                    in_flight.discard(workflow_id)
                    failure = failure or error
                    return
            started.add(workflow_id)
            (result.enrolled if new else result.already_enrolled).append(lead.key)
            done += 1
            if progress:
                progress(done, len(leads))

        try:
            await asyncio.gather(*(enroll(index, lead) for index, lead in enumerate(leads)))
        finally:
            if failure is not None or len(started) < len(leads):
                # A lead whose workflow did not start must not be listed as running, so that
                # the next launch enrolls it.
                await asyncio.gather(*writes.values(), return_exceptions=True)
                added = set().union(
                    *(
                        write.result()
                        for write in writes.values()
                        if not write.cancelled() and write.exception() is None
                    )
                )
                unknown = await _not_started(client, in_flight)
                await asyncio.to_thread(
                    self.store.forget_enrollments, (added - started - in_flight) | unknown
                )
        if failure is not None:
            raise failure
        if campaign.sender and any(step.type == "email" for step in campaign.steps):
            result.mailbox = await self.watch_mailbox(campaign.sender)
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

    async def _start(
        self, client: Client, campaign: Campaign, lead: Lead, workflow_id: str
    ) -> bool:
        """Start an enrolled lead's workflow; return False when it runs already."""
        try:
            await _start_lead(
                client,
                EnrollmentInput(
                    campaign=campaign, lead=lead, channel_queues=self.settings.channel_queues
                ),
                workflow_id,
                WorkflowIDReusePolicy.REJECT_DUPLICATE,
                first_step=1,
            )
        except WorkflowAlreadyStartedError:
            return False
        return True

    # Mailboxes

    async def watch_mailbox(self, sender: Sender) -> MailboxWatch | None:
        """Start reading the sender's mailbox for bounces and replies, unless it is read already.

        A poller already reading it at another IMAP URL moves to this one. Returns None when no
        IMAP server is known for the sender (neither the campaign's `imap_url` nor
        SEQUENCER_IMAP_URL).
        """
        imap_url = sender.imap_url or self.settings.imap_url
        if imap_url is None:
            return None
        client = await self.client()
        workflow_id = mailbox_workflow_id(sender.email)
        handle = await client.start_workflow(
            MailboxWorkflow.run,
            MailboxInput(
                address=sender.email,
                imap_url=imap_url,
                poll_interval=self.settings.mailbox_poll_interval,
            ),
            id=workflow_id,
            task_queue=TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"Mailbox of {sender.email}",
            static_details=f"Reads the IMAP mailbox of {sender.email} for bounces and replies",
        )
        watch = MailboxWatch(workflow_id=workflow_id, imap_url=imap_url)
        try:
            status = await handle.query(
                MailboxWorkflow.status, rpc_timeout=timedelta(seconds=MAILBOX_QUERY_TIMEOUT)
            )
        except RPCError as error:
            if error.status not in TIMEOUT_STATUSES:
                raise
            # A worker busy with the leads just started handles the query late. The signal
            # changes nothing when the poller already reads this URL.
            logger.info("Query of mailbox poller %s timed out: %s", workflow_id, error)
            await handle.signal(MailboxWorkflow.set_imap_url, imap_url)
        else:
            if status.imap_url != imap_url:
                await handle.signal(MailboxWorkflow.set_imap_url, imap_url)
                watch.moved_from = status.imap_url
        watch.problem = await _probe_imap(imap_url)
        return watch

    async def retarget_mailboxes(self, old_prefix: str, imap_url: str) -> list[str]:
        """Move every running poller whose IMAP URL starts with `old_prefix` to `imap_url`.

        The local stack calls this when it starts on another IMAP port than the one its
        earlier runs' pollers use. Returns the addresses moved.
        """
        moved = []
        for status in await self.mailboxes():
            if status.imap_url != imap_url and status.imap_url.startswith(old_prefix):
                client = await self.client()
                handle = client.get_workflow_handle(mailbox_workflow_id(status.address))
                await handle.signal(MailboxWorkflow.set_imap_url, imap_url)
                moved.append(status.address)
        return moved

    async def mailbox_signal(self, address: str, signal: str) -> str:
        """Send `poll_now` or `stop` to the poller of a sender's mailbox."""
        key = self._address(address)
        client = await self.client()
        handle = client.get_workflow_handle(mailbox_workflow_id(key))
        try:
            await handle.signal(signal)
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            raise ServiceNotFoundError(
                f"mailbox poller of {key} not found: list the mailboxes read with "
                "`sequencer mailbox list`"
            ) from None
        if signal == "stop":
            return f"{key}: mailbox no longer read; the next launch for this sender reads it again"
        return f"{key}: mailbox read now"

    async def mailboxes(self) -> list[MailboxStatus]:
        """Return the status of every mailbox poller: running, or ended by an error."""
        client = await self.client()
        statuses = []
        query = (
            f"WorkflowType = '{MAILBOX_WORKFLOW_TYPE}' AND "
            "ExecutionStatus IN ('Running', 'Failed', 'TimedOut')"
        )
        async for execution in client.list_workflows(query):
            handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
            try:
                status = await handle.query(MailboxWorkflow.status)
                description = await handle.describe()
            except RPCError as error:
                logger.warning("Cannot query mailbox poller %s: %s", execution.id, error)
                continue
            except WorkflowQueryFailedError as error:
                logger.warning("Cannot query mailbox poller %s: %s", execution.id, error)
                continue
            if description.status != WorkflowExecutionStatus.RUNNING:
                status.state = "failed"
                status.problem = f"the poller ended as {description.status.name.lower()}"
            else:
                _set_poll_state(status, description)
            statuses.append(status)
        return sorted(statuses, key=lambda status: status.address)

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

    def sends(self, state: str | None = None) -> list[dict[str, Any]]:
        """Return the email sends in the send ledger, oldest first, with their lead."""
        rows = []
        for send in self.store.list_sends(state):
            try:
                enrollment = self.store.get_enrollment_by_workflow(send.workflow_id)
                campaign, lead = enrollment.campaign_id, enrollment.lead_key
            except NotFoundError:
                campaign, lead = None, None  # a what-if run's lead, or one deleted since
            rows.append(
                {
                    "campaign": campaign,
                    "lead": lead,
                    "step": send.step,
                    "state": send.state,
                    "message_id": send.send_key,
                    "detail": send.detail,
                    "updated_at": send.updated_at.isoformat(),
                    "workflow_id": send.workflow_id,
                }
            )
        return rows

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
        self,
        campaign_ref: str,
        lead_ref: str,
        channel: str | None,
        auto_reply: bool,
        back_on: date | None = None,
    ) -> str:
        """Report a reply (rule 11), or an auto-reply, which `back_on`, the return date an
        out-of-office reply states, turns into a postponement of the next step."""
        campaign = self._campaign(campaign_ref)
        enrollment = self._enrollment(campaign, lead_ref)
        reply = Reply(channel=channel, auto_reply=auto_reply, back_on=back_on)
        if await self._signal(enrollment.workflow_id, "report_reply", reply):
            if auto_reply and back_on:
                return (
                    f"{enrollment.lead_key}: out-of-office reply recorded; back on {back_on}, "
                    "so a next step due earlier waits until then"
                )
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

    # Operator controls (rule 12) and invitations (rule 9)

    async def control(
        self, campaign_ref: str, lead_ref: str, action: str, note: str | None = None
    ) -> str:
        """Pause, resume or remove a lead; returns what happened, in a sentence."""
        if action not in ("pause", "resume", "remove"):
            raise ServiceError(f"unknown action {action!r}: use pause, resume or remove")
        campaign = self._campaign(campaign_ref)
        enrollment = self._enrollment(campaign, lead_ref)
        return await self._update(enrollment, "control", OperatorAction(action=action, note=note))

    async def report_invitation(
        self, campaign_ref: str, lead_ref: str, accepted: bool, detail: str | None = None
    ) -> str:
        """Report that the lead accepted or declined the LinkedIn invitation."""
        campaign = self._campaign(campaign_ref)
        enrollment = self._enrollment(campaign, lead_ref)
        answer = InvitationAnswer(accepted=accepted, detail=detail)
        return await self._update(enrollment, "answer_invitation", answer)

    async def invitation_event(self, event: InvitationEvent) -> str:
        """Apply a provider's webhook about an invitation; a repeated event changes nothing."""
        try:
            enrollment = self.store.get_enrollment_by_workflow(event.workflow_id)
        except NotFoundError as error:
            raise WebhookRejected(404, str(error)) from None
        answer = InvitationAnswer(
            accepted=event.accepted, detail=event.detail or f"provider event {event.event_id}"
        )
        try:
            return await self._update(enrollment, "answer_invitation", answer)
        except ServiceError as error:
            # A repeated event, or one that arrives after the lead ended: the provider must not
            # retry it.
            return f"ignored: {error}"

    async def reassign(
        self,
        campaign_ref: str,
        lead_ref: str,
        sender_email: str | None = None,
        smtp_url: str | None = None,
        linkedin_account: str | None = None,
    ) -> str:
        """Move a lead to another sender account; a lead paused by its account resumes."""
        campaign = self._campaign(campaign_ref)
        enrollment = self._enrollment(campaign, lead_ref)
        sender = None
        if sender_email and sender_email.startswith("linkedin:"):
            raise ServiceError(
                f"--to takes an email sender, not {sender_email!r}: move LinkedIn steps with "
                f"--linkedin-account {sender_email.removeprefix('linkedin:')}"
            )
        if sender_email:
            current = campaign.sender
            values: dict[str, Any] = current.model_dump() if current else {}
            values.update({"email": sender_email, "name": None})
            if smtp_url:
                values["smtp_url"] = smtp_url
            try:
                sender = Sender.model_validate(values)
            except ValidationError as error:
                problems = "; ".join(
                    ".".join(str(part) for part in e["loc"])
                    + ": "
                    + e["msg"].removeprefix("Value error, ")
                    for e in error.errors()
                )
                raise ServiceError(f"invalid sender: {problems}") from None
        elif smtp_url:
            raise ServiceError("--smtp-url needs --to: name the sender address to move to")
        if linkedin_account is not None:
            try:
                LinkedInAccount(account=linkedin_account)
            except ValidationError:
                raise ServiceError(
                    f"invalid LinkedIn account {linkedin_account!r}: use letters, digits, dots, "
                    "dashes, underscores and @, as in the campaign file's `linkedin.account`"
                ) from None
        reassignment = Reassignment(sender=sender, linkedin_account=linkedin_account)
        return await self._update(enrollment, "reassign", reassignment)

    async def reassign_all(
        self,
        campaign_ref: str,
        sender_email: str | None = None,
        smtp_url: str | None = None,
        linkedin_account: str | None = None,
    ) -> list[str]:
        """Move every lead of a campaign that has not ended; returns one line per lead."""
        campaign = self._campaign(campaign_ref)
        running = [
            row
            for row in self.store.list_enrollments(campaign.id)
            if not EnrollmentStatus(row.status).is_final
        ]
        if not running:
            raise ServiceError(f"campaign {campaign.id!r} has no lead left to move")
        lines = []
        for row in running:
            try:
                lines.append(
                    await self.reassign(
                        campaign.id, row.lead_key, sender_email, smtp_url, linkedin_account
                    )
                )
            except ServiceError as error:
                lines.append(str(error))
        return lines

    async def unsubscribe(self, address: str, reason: str = "operator") -> list[str]:
        """Add an address to the suppression list; returns one line per change."""
        key = self._address(address)
        if not self.store.suppress(key, reason, "operator"):
            existing = self.store.suppression(key) or {}
            raise ServiceError(
                f"{key} is already unsubscribed ({existing.get('reason', 'unknown reason')}); "
                "nothing changed"
            )
        lines = [f"{key} unsubscribed: no email step of any campaign will be sent to it"]
        change = SubscriptionChange(unsubscribed=True, reason=reason)
        for enrollment in self.store.enrollments_for_address(key):
            lines.append(await self._subscription(enrollment, change))
        return lines

    async def resubscribe(self, address: str, resume: bool = False) -> list[str]:
        """Remove an address from the suppression list, and optionally start again the
        enrollments that a bounce stopped, from their first step never executed."""
        key = self._address(address)
        existing = self.store.suppression(key)
        if existing is None:
            raise ServiceError(f"{key} is not unsubscribed; nothing changed")
        enrollments = self.store.enrollments_for_address(key)
        self.store.unsuppress(key)
        lines = [f"{key} re-subscribed (it was unsubscribed because of: {existing['reason']})"]
        change = SubscriptionChange(unsubscribed=False)
        for enrollment in enrollments:
            lines.append(await self._subscription(enrollment, change))
            if resume:
                lines.append(await self._resume_stopped(enrollment))
        if not resume and any(e.status == EnrollmentStatus.STOPPED for e in enrollments):
            lines.append(
                "enrollments stopped by a bounce stay stopped; add --resume to run their "
                "remaining steps"
            )
        return lines

    async def _subscription(self, enrollment: EnrollmentRow, change: SubscriptionChange) -> str:
        label = f"{enrollment.campaign_id}: {enrollment.lead_key}"
        if not EnrollmentStatus(enrollment.status).is_final:
            try:
                await self._update(enrollment, "change_subscription", change)
                return f"{label}: recorded in the running enrollment"
            except ServiceError:
                pass  # the workflow ended meanwhile, or already knew: record it below
        entry = LogEntry(
            seq=0,
            at=datetime.now(UTC),
            kind="event",
            status="unsubscribed" if change.unsubscribed else "resubscribed",
            reason=change.reason,
        )
        self.store.record_external(
            enrollment.workflow_id, f"subscription:{entry.at.isoformat()}", entry
        )
        self.store.set_unsubscribed(enrollment.workflow_id, change.unsubscribed)
        if EnrollmentStatus(enrollment.status).is_final:
            return f"{label}: recorded (the enrollment had ended as {enrollment.status})"
        return f"{label}: recorded in the activity log (the workflow already had the change)"

    async def _resume_stopped(self, enrollment: EnrollmentRow) -> str:
        label = f"{enrollment.campaign_id}: {enrollment.lead_key}"
        if enrollment.status != EnrollmentStatus.STOPPED:
            return f"{label}: not resumed, because it is {enrollment.status}, not stopped"
        campaign = self.store.get_campaign(enrollment.campaign_id)
        steps = self.store.step_states(enrollment.workflow_id, campaign)
        if not any(step.status == StepStatus.BOUNCED for step in steps):
            return f"{label}: not resumed, because no bounce stopped it"
        first = next(
            (s for s in steps if s.status in (StepStatus.SKIPPED, StepStatus.PENDING)), None
        )
        if first is None:
            return f"{label}: not resumed, because every step was executed"
        client = await self.client()
        try:
            await self._start_again(client, campaign, enrollment, steps, first)
        except WorkflowAlreadyStartedError:
            return f"{label}: not resumed, because its workflow is running again already"
        return f"{label}: resumed from step {first.step} ({first.type})"

    async def _start_again(
        self,
        client: Client,
        campaign: Campaign,
        enrollment: EnrollmentRow,
        steps: list[StepState],
        first: StepState,
    ) -> None:
        await _start_lead(
            client,
            EnrollmentInput(
                campaign=campaign,
                lead=enrollment.lead,
                resume_steps=steps,
                resume_enrolled_at=enrollment.enrolled_at,
                log_offset=self.store.workflow_entries(enrollment.workflow_id),
                channel_queues=self.settings.channel_queues,
            ),
            enrollment.workflow_id,
            WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            first_step=first.step,
        )

    # Sender accounts (rule 8)

    async def accounts(self) -> list[AccountStatus]:
        """Return the status of every sender account that a lead has used.

        Sends booked in the database add to those the account's workflow booked. The
        workflow, where one runs, decides whether the account is connected.
        """
        client = await self.client()
        found: dict[str, AccountStatus] = {}
        query = f"WorkflowType = '{ACCOUNT_WORKFLOW_TYPE}' AND ExecutionStatus = 'Running'"
        async for execution in client.list_workflows(query):
            if "/" in execution.id or execution.id.startswith("account-campaign-"):
                continue  # a what-if run's account, or a campaign's budget of new leads
            handle = client.get_workflow_handle(execution.id)
            try:
                status = await handle.query("status", result_type=AccountStatus)
            except RPCError:
                continue
            found[status.id] = status
        for row in await asyncio.to_thread(self.store.sender_accounts):
            account = row.account
            if account.channel == "campaign":
                continue
            status = found.get(account.id)
            if status is None:
                found[account.id] = status = AccountStatus(
                    id=account.id,
                    channel=account.channel,
                    connected=row.connected,
                    reason=row.reason,
                )
            for kind, count in row.sends_last_24h.items():
                status.sends_last_24h[kind] = status.sends_last_24h.get(kind, 0) + count
            status.booked_ahead += row.booked_ahead
        return [found[account_id] for account_id in sorted(found)]

    async def account_action(self, account_id: str, action: str, detail: str | None) -> str:
        """Reconnect or disconnect a sender account, such as `email:rep@acme.test`."""
        if action not in ("reconnect", "disconnect"):
            raise ServiceError(f"unknown action {action!r}: use reconnect or disconnect")
        account_id = account_id.strip()
        if ":" not in account_id and "@" in account_id:
            account_id = f"email:{account_id}"
        channel, _, name = account_id.partition(":")
        if channel == "email":
            # The form campaign files keep sender addresses in: lower case, trimmed.
            try:
                account_id = f"email:{normalize_email(name)}"
            except InvalidEmailError as error:
                raise ServiceError(
                    f"invalid sender account {account_id!r}: {str(error).rstrip('.')}. Use the "
                    "sender's address, as `sequencer account list` shows it"
                ) from None
        if channel not in ("email", "linkedin"):
            raise ServiceError(
                f"invalid sender account {account_id!r}: use an email address, "
                "email:ADDRESS or linkedin:NAME, as `sequencer account list` shows them"
            )
        client = await self.client()
        known = {
            row.account.id: row.account
            for row in await asyncio.to_thread(self.store.sender_accounts)
        }
        account = known.get(account_id)
        workflow_id = account_workflow_id(account_id)
        try:
            if account is None:
                answer = await client.get_workflow_handle(workflow_id).execute_update(
                    action, detail, result_type=str
                )
            else:
                # Booked in the database only: the account's workflow may not run yet.
                account = account.model_copy(
                    update={"check_interval": self.settings.account_check_interval}
                )
                answer = await client.execute_update_with_start_workflow(
                    action,
                    detail,
                    start_workflow_operation=start_account(account, TASK_QUEUE),
                    result_type=str,
                )
        except WorkflowUpdateFailedError as error:
            raise ServiceError(f"{_cause(error)}; nothing changed") from None
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            raise ServiceError(
                f"no sender account {account_id!r} is active: an account appears once a lead "
                "sends through it; list them with `sequencer account list`"
            ) from None
        if account is not None:
            await asyncio.to_thread(
                self.store.set_account_connected,
                account,
                action == "reconnect",
                None if action == "reconnect" else detail or "disconnected by an operator",
            )
        return answer

    # Mail that arrives in a sender's mailbox (bounces, replies)

    async def apply_mail(self, raw: bytes, source: str = "message") -> list[str]:
        """Classify one message from a sender's mailbox and apply it to the leads it is about.

        Returns one line per change. A message applied before (same Message-ID, or the same
        bytes without one) changes nothing.
        """
        return await self.apply_inbound(
            classify_message(raw), _message_key(raw), source, sender=_from_address(raw)
        )

    async def apply_inbound(
        self, message: InboundMessage, key: str, source: str, sender: str | None = None
    ) -> list[str]:
        """Apply one classified inbound event (a message, or a provider's webhook event).

        `key` identifies the event (a Message-ID, or a provider's event id), so that an event
        applied before changes nothing. `sender` is the address a reply or complaint came
        from, used when the event names no recipient. Returns one line per change.
        """
        head = f"{source}: {message.kind.value} ({message.subtype})"
        if not self.store.claim_inbound(key, message.kind.value, message.reason):
            return [f"{head}: applied before; nothing changed"]
        try:
            lines = await self._apply_inbound(message, sender, key)
        except BaseException:
            self.store.forget_inbound(key)
            raise
        if all(line.startswith(NO_LEAD) for line in lines):
            # Nothing changed: the message may apply once its lead is launched.
            self.store.forget_inbound(key)
        return [head, *(f"  {line}" for line in lines)]

    async def _apply_inbound(
        self, message: InboundMessage, sender: str | None, key: str
    ) -> list[str]:
        kind = message.kind
        if kind == InboundKind.UNRELATED:
            return [f"{NO_LEAD}: nothing to do"]
        if kind in (InboundKind.HARD_BOUNCE, InboundKind.SOFT_BOUNCE, InboundKind.DELAY_WARNING):
            lines = []
            for recipient in message.recipients or (None,):
                address = recipient.address if recipient else None
                targets = self._mail_targets(message, address)
                for enrollment, step in targets:
                    lines.append(await self._apply_bounce(message, recipient, enrollment, step))
                if targets and kind == InboundKind.SOFT_BOUNCE and address:
                    if recipient is not None and not recipient.sender_side:
                        lines += await self._count_soft_bounce(address, key)
            return lines or [f"{NO_LEAD} ({message.reason})"]
        addresses = [r.address for r in message.recipients] or ([sender] if sender else [])
        if kind == InboundKind.COMPLAINT and message.subtype == "complaint":
            lines = []
            for address in addresses:
                try:
                    lines += await self.unsubscribe(address, reason="complaint")
                except ServiceError as error:
                    lines.append(str(error))
            return lines or ["the complaint names no address: nothing to do"]
        if kind == InboundKind.COMPLAINT:
            return [f"a report about the sender, not a lead: {message.reason}"]
        lines = []
        auto = kind == InboundKind.AUTO_REPLY
        back_on = message.return_date if auto else None
        for address in addresses:
            for enrollment, _ in self._mail_targets(message, address):
                try:
                    lines.append(
                        await self.report_reply(
                            enrollment.campaign_id, enrollment.lead_key, "email", auto, back_on
                        )
                    )
                except ServiceError as error:
                    lines.append(str(error))
        return lines or [f"{NO_LEAD} ({message.reason})"]

    async def _count_soft_bounce(self, address: str, key: str) -> list[str]:
        """Record a soft bounce of `address`, and suppress the address once it reaches the
        limit of soft bounces within the window (SEQUENCER_SOFT_BOUNCE_LIMIT and _WINDOW)."""
        limit = self.settings.soft_bounce_limit
        window = self.settings.soft_bounce_window
        count = self.store.record_soft_bounce(address, key, datetime.now(UTC), window)
        if count < limit:
            return [f"{address}: soft bounce {count} of {limit} within {format_duration(window)}"]
        try:
            return await self.unsubscribe(address, reason="soft_bounces")
        except ServiceError as error:
            return [str(error)]

    def _mail_targets(
        self, message: InboundMessage, address: str | None
    ) -> list[tuple[EnrollmentRow, int | None]]:
        """Find the enrollments a message is about: by the Message-ID the engine sent, else by
        the address, where the step is the last email step sent."""
        match = ENGINE_MESSAGE_ID.search(message.original_message_id or "")
        if match:
            workflow_id = f"lead-{match['campaign']}-{match['ref']}"
            try:
                return [(self.store.get_enrollment_by_workflow(workflow_id), int(match["step"]))]
            except NotFoundError:
                pass
        if not address:
            return []
        try:
            key = normalize_email(address)
        except InvalidEmailError:
            return []
        targets = []
        for enrollment in self.store.enrollments_for_address(key):
            campaign = self.store.get_campaign(enrollment.campaign_id)
            sent = [
                state.step
                for state in self.store.step_states(enrollment.workflow_id, campaign)
                if state.channel == Channel.EMAIL and state.status == StepStatus.SENT
            ]
            targets.append((enrollment, sent[-1] if sent else None))
        return targets

    async def _apply_bounce(
        self,
        message: InboundMessage,
        recipient: FailedRecipient | None,
        enrollment: EnrollmentRow,
        step: int | None,
    ) -> str:
        label = f"{enrollment.campaign_id}: {enrollment.lead_key}"
        detail = _bounce_detail(recipient) if recipient else message.reason
        hard = message.kind == InboundKind.HARD_BOUNCE and not (recipient and recipient.sender_side)
        if hard and step is not None:
            try:
                return await self.report_failure(
                    enrollment.campaign_id, enrollment.lead_key, step, "bounce", True, detail
                )
            except ServiceError as error:
                return f"{label}: {error}"
        if recipient is not None and recipient.sender_side:
            name, reason = "sender_alert", "the receiving server blamed the sender"
        elif message.kind == InboundKind.DELAY_WARNING:
            name, reason = "delivery_delayed", "the message is not delivered yet"
        elif hard:
            name, reason = "bounce_without_step", "no email step of this lead was sent"
        else:
            name, reason = "soft_bounce", message.subtype
        campaign = self.store.get_campaign(enrollment.campaign_id)
        step_type = campaign.steps[step - 1].type if step and step <= len(campaign.steps) else None
        entry = LogEntry(
            seq=0,
            at=datetime.now(UTC),
            kind="event",
            status=name,
            step=step,
            step_type=step_type,
            reason=reason,
            detail=(detail or "")[:500],
        )
        self.store.record_external(
            enrollment.workflow_id, f"mail:{name}:{step}:{entry.at.isoformat()}", entry
        )
        return f"{label}: {name.replace('_', ' ')} recorded ({reason})"

    # Tasks

    def tasks(self, status: str | None = "open", campaign_ref: str | None = None) -> list[TaskRow]:
        campaign_id = self._campaign(campaign_ref).id if campaign_ref else None
        return self.store.list_tasks(status, campaign_id)

    async def close_task(self, task_id: int, outcome: str, note: str | None = None) -> str:
        """Complete, fail or skip a task, and tell the lead's workflow."""
        try:
            task = self.store.get_task(task_id)
        except NotFoundError as error:
            raise ServiceNotFoundError(str(error)) from None
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
            raise ServiceNotFoundError(str(error)) from None

    def _enrollment(self, campaign: Campaign, lead_ref: str) -> EnrollmentRow:
        try:
            return self.store.get_enrollment(campaign.id, lead_ref)
        except NotFoundError as error:
            raise ServiceNotFoundError(str(error)) from None

    def _address(self, address: str) -> str:
        try:
            return normalize_email(address)
        except InvalidEmailError as error:
            raise ServiceError(str(error)) from None

    async def _update(self, enrollment: EnrollmentRow, name: str, argument: Any) -> str:
        """Send an update to a lead's workflow; a refused one raises ServiceError."""
        client = await self.client()
        handle = client.get_workflow_handle(enrollment.workflow_id)
        try:
            result = await handle.execute_update(name, argument, result_type=str)
        except WorkflowUpdateFailedError as error:
            raise ServiceError(f"{enrollment.lead_key}: {_cause(error)}; nothing changed") from None
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND:
                raise
            raise ServiceError(
                f"{enrollment.lead_key}: the enrollment has already ended as "
                f"{enrollment.status}; nothing changed"
            ) from None
        return f"{enrollment.lead_key}: {result}"

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


async def _not_started(client: Client, workflow_ids: Collection[str]) -> set[str]:
    """Return the workflows among `workflow_ids` that the server does not know.

    A workflow whose state cannot be read (the server is unreachable) is not returned.
    """

    async def unknown(workflow_id: str) -> bool:
        try:
            await client.get_workflow_handle(workflow_id).describe(rpc_timeout=timedelta(seconds=5))
        except RPCError as error:
            return error.status == RPCStatusCode.NOT_FOUND
        return False

    ids = sorted(workflow_ids)
    found = await asyncio.gather(*(unknown(workflow_id) for workflow_id in ids))
    return {workflow_id for workflow_id, missing in zip(ids, found, strict=True) if missing}


async def _start_lead(
    client: Client,
    input: EnrollmentInput,
    workflow_id: str,
    reuse_policy: WorkflowIDReusePolicy,
    first_step: int,
) -> None:
    """Start a lead's workflow with its search attributes and the Temporal UI's summary.

    `reuse_policy` allows a second run of the same id only when starting an ended one again.
    """
    campaign = input.campaign
    if input.release is None:
        input = input.model_copy(update={"release": RELEASE})
    resumed = ", resumed" if input.resume_steps is not None else ""
    # The values the workflow would set itself, so that its first rest costs no upsert.
    status, stage, account = start_search_attributes(campaign, first_step)
    await client.start_workflow(
        LeadSequenceWorkflow.run,
        input,
        id=workflow_id,
        task_queue=TASK_QUEUE,
        id_reuse_policy=reuse_policy,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(CAMPAIGN_KEY, campaign.id),
                SearchAttributePair(STATUS_KEY, status),
                SearchAttributePair(STAGE_KEY, stage),
                *([SearchAttributePair(ACCOUNT_KEY, account)] if account else []),
            ]
        ),
        static_summary=(
            f"Lead {workflow_id.rsplit('-', 1)[-1]} in campaign {campaign.id}{resumed}"
        ),
        static_details=(
            f"Campaign **{campaign.name}** ({len(campaign.steps)} steps: "
            + ", ".join(step.type for step in campaign.steps)
            + ")"
        ),
    )


# The start of the line for a message that concerns no enrolled lead.
NO_LEAD = "no enrolled lead matches this message"
# The Message-IDs that activities/email.py gives the engine's emails.
ENGINE_MESSAGE_ID = re.compile(
    r"<?(?P<campaign>[a-z0-9][a-z0-9-]{0,62})\.(?P<ref>[0-9a-f]{16})\.(?P<step>\d+)@[^>\s]+>?"
)


# The statuses of an RPC that timed out: the SDK reports its own timeout as CANCELLED.
TIMEOUT_STATUSES = (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED)

# How long a launch waits for the sender's mailbox poller to report the IMAP URL it reads.
MAILBOX_QUERY_TIMEOUT = 10.0

# How long a launch waits to connect to the IMAP server before it warns that it cannot.
IMAP_PROBE_TIMEOUT = 3.0


async def _probe_imap(imap_url: str) -> str | None:
    """Return why a TCP connection to the IMAP server fails, or None when it connects."""
    parts = urlsplit(imap_url)
    port = parts.port or (993 if parts.scheme == "imaps" else 143)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port), IMAP_PROBE_TIMEOUT
        )
    except (OSError, TimeoutError) as error:
        return f"cannot connect to {parts.hostname}:{port} ({error or 'timed out'})"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def _set_poll_state(status: MailboxStatus, description: WorkflowExecutionDescription) -> None:
    """Fill in a running poller's state from its pending poll, retried or not."""
    for pending in description.raw_description.pending_activities:
        if pending.attempt > 1:
            status.state = "retrying"
            failure = pending.last_failure.message or "unknown error"
            status.problem = f"attempt {pending.attempt}: {failure}"
            return
    if status.totals.last_error:
        status.state = "failed"
        status.problem = status.totals.last_error


def _bounce_detail(recipient: FailedRecipient) -> str:
    """Return the status code and diagnostic of a failed recipient, each code written once."""
    diagnostic = recipient.diagnostic or ""
    if recipient.status and recipient.status not in diagnostic:
        return f"{recipient.status} {diagnostic}".strip()
    return diagnostic or recipient.status or ""


def _message_key(raw: bytes) -> str:
    """Return the message's Message-ID, or a digest of its bytes when it has none."""
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    message_id = (headers.get("Message-ID") or "").strip()
    if message_id:
        return f"id:{message_id}"
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _from_address(raw: bytes) -> str | None:
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    _, address = email.utils.parseaddr(str(headers.get("From") or ""))
    return address or None


def _cause(error: WorkflowUpdateFailedError) -> str:
    cause = error.cause
    return cause.message if isinstance(cause, ApplicationError) else str(cause)
