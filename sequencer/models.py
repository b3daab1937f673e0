"""Leads and the messages exchanged between the workflow, its activities and the CLI.

Every workflow, signal, query and activity takes one of these models and returns one. New
fields get defaults so that histories recorded before they existed still decode.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from sequencer.campaign import Campaign, LinkedInAccount, Sender, Step
from sequencer.channels import StepStatus
from sequencer.schedule import SendingSchedule

TASK_QUEUE = "sequencer"
# Channels whose activities run on a task queue of their own (`channel_queue`), so that their
# workers can be sized and rate-limited apart from the workflows' (docs/deploy.md).
QUEUED_CHANNELS = ("email", "linkedin")
# The roles a worker process can take (SEQUENCER_WORKER_ROLES): the workflows with the
# activities that write to the database, or the activities of one queued channel.
WORKER_ROLES = ("workflows", *QUEUED_CHANNELS)
WORKFLOW_TYPE = "LeadSequenceWorkflow"

# Search attributes registered on the Temporal server. They contain no personal data, because
# Temporal does not encrypt search attributes or workflow ids, even with a payload codec.
SEARCH_ATTRIBUTE_CAMPAIGN = "SequencerCampaign"
SEARCH_ATTRIBUTE_STATUS = "SequencerStatus"
SEARCH_ATTRIBUTE_STAGE = "SequencerStage"
# The sender account a lead waits on while paused by it, else the one its next step sends from.
SEARCH_ATTRIBUTE_ACCOUNT = "SequencerAccount"
SEARCH_ATTRIBUTES = (
    SEARCH_ATTRIBUTE_CAMPAIGN,
    SEARCH_ATTRIBUTE_STATUS,
    SEARCH_ATTRIBUTE_STAGE,
    SEARCH_ATTRIBUTE_ACCOUNT,
)


class Lead(BaseModel):
    """One person to contact. `variables` contains the extra CSV columns, for templates."""

    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None
    linkedin_url: str | None = None
    phone: str | None = None  # E.164
    timezone: str | None = None  # IANA name
    variables: dict[str, str] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """Return the lead's identity: its email address, else its LinkedIn URL."""
        key = self.email or self.linkedin_url
        if not key:
            raise ValueError("a lead needs an email address or a LinkedIn URL")
        return key

    @property
    def ref(self) -> str:
        """Return a short hash of the key, used where personal data must not appear."""
        return lead_ref(self.key)

    def template_variables(self) -> dict[str, str]:
        """Return every value a template may use: the extra columns, then the standard ones."""
        values = dict(self.variables)
        for name in ("email", "first_name", "last_name", "company", "linkedin_url", "phone"):
            value = getattr(self, name)
            if value:
                values[name] = value
        return values


def channel_queue(task_queue: str, channel: str) -> str:
    """Return the task queue of a channel's activities for the leads of `task_queue`."""
    return f"{task_queue}-{channel}"


def lead_ref(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def workflow_id_for(campaign_id: str, lead_key: str) -> str:
    """Return the enrollment's workflow id, derived so that a lead is enrolled once per campaign."""
    return f"lead-{campaign_id}-{lead_ref(lead_key)}"


# A lead's workflow continues as new once its history has this many events, so that an
# enrollment with many events or months of waiting keeps a short history.
CONTINUE_AS_NEW_AFTER_EVENTS = 2000


class MachineSnapshot(BaseModel):
    """A running enrollment's state machine, as one run hands it to the next."""

    state: str
    steps: list[StepState]
    enrolled_at: datetime | None = None
    next_due: datetime | None = None
    waiting_step: int | None = None
    waiting_for: Literal["task", "invitation"] | None = None
    invitation: Literal["none", "pending", "accepted", "declined"] = "none"
    invited_at: datetime | None = None
    unsubscribed: bool = False
    pause_reason: str | None = None
    paused_by: Literal["operator", "account", "cap"] | None = None
    paused_remaining: timedelta | None = None
    log: list[LogEntry] = Field(default_factory=list)
    seq_offset: int = 0
    gate_invitations: bool = True


class CarriedState(BaseModel):
    """The state a lead's workflow hands to its next run when it continues as new."""

    machine: MachineSnapshot
    sender: Sender | None = None  # the sender now in use, after any reassignment
    linkedin: LinkedInAccount
    # The sending slot booked for a step: (step, account id, slot time, why it is later)
    slot: tuple[int, str, datetime, str | None] | None = None
    account_wait: str | None = None
    resume_at: datetime | None = None
    ignored: list[str] = Field(default_factory=list)
    runs: int = 1  # runs of this enrollment before the next one


class EnrollmentInput(BaseModel):
    campaign: Campaign
    lead: Lead
    # Set when an operator starts again an enrollment that ended (rule 12): the steps as they
    # ended. Executed steps keep their status, the others run again.
    resume_steps: list[StepState] | None = None
    resume_enrolled_at: datetime | None = None
    log_offset: int = 0  # entries the earlier run wrote, so that new entries number after them
    # Set when the previous run of this enrollment continued as new.
    carried: CarriedState | None = None
    continue_as_new_after: int = Field(default=CONTINUE_AS_NEW_AFTER_EVENTS, ge=10)
    # The release of the lead workflow's code that the starter expects (RELEASE in
    # workflows/lead_sequence.py). A run that carries it decides its behaviour from it instead
    # of calling a patch, which would cost a marker and a search attribute update. None:
    # started by an older release, so the workflow's patches decide.
    release: str | None = None
    # Whether the email and LinkedIn steps run on their channels' task queues (runs of
    # RELEASE; Settings.channel_queues). Off, they run on the lead's own queue.
    channel_queues: bool = False


class EnrollmentResult(BaseModel):
    """An enrollment's status and steps: the workflow's result and its `activity` query."""

    status: str
    unsubscribed: bool
    steps: list[StepState]
    enrolled_at: datetime | None = None
    log: list[LogEntry] = Field(default_factory=list)
    # Events that did not apply when they arrived, such as a bounce for a step not sent yet.
    ignored: list[str] = Field(default_factory=list)


class StepInput(BaseModel):
    """The input of a channel activity: one step for one lead."""

    campaign_id: str
    workflow_id: str
    step_number: int
    step: Step
    lead: Lead
    sender: Sender | None = None
    # Step numbers of the email steps already sent to this lead, oldest first, for threading.
    earlier_email_steps: list[int] = Field(default_factory=list)


class StepOutcome(BaseModel):
    """The result of a channel activity. Transient errors are raised, not returned."""

    status: Literal[
        StepStatus.SENT,
        StepStatus.FAILED,
        StepStatus.BOUNCED,
        StepStatus.WAITING,
        StepStatus.SKIPPED,
    ]
    reason: str | None = None
    detail: str | None = None  # a provider reference or the SMTP reply, shown in Activity
    # For a sent invitation: "accepted" when the provider reports the lead as already a
    # connection; otherwise the invitation is pending until the lead responds.
    invitation: Literal["pending", "accepted"] | None = None


class StepState(BaseModel):
    """One step of one enrollment as the activity report shows it."""

    step: int
    type: str
    channel: str
    status: StepStatus = StepStatus.PENDING
    at: datetime | None = None
    reason: str | None = None
    detail: str | None = None


class LogEntry(BaseModel):
    """One line of a lead's activity log: a step changing status, or an enrollment event."""

    seq: int
    at: datetime
    kind: Literal["step", "event"]
    status: (
        str  # a StepStatus for steps; enrolled, waiting, unsubscribed, replied, ended... for events
    )
    step: int | None = None
    step_type: str | None = None
    channel: str | None = None
    reason: str | None = None
    detail: str | None = None


class LateFailure(BaseModel):
    """A failure reported after the step ran: a bounce or a failed LinkedIn invitation."""

    step: int
    reason: str
    bounced: bool = False
    detail: str | None = None


class Reply(BaseModel):
    channel: str | None = None
    auto_reply: bool = False  # an out-of-office reply is recorded but is not a reply
    detail: str | None = None
    # The return date that an out-of-office reply states.
    back_on: date | None = None


class TaskOutcome(BaseModel):
    step: int
    outcome: Literal["done", "failed", "skipped"]
    reason: str | None = None


class InvitationAnswer(BaseModel):
    """The lead's response to a LinkedIn invitation, reported by the provider or an operator."""

    accepted: bool
    detail: str | None = None


class OperatorAction(BaseModel):
    """Pause, resume or remove an enrollment (rule 12)."""

    action: Literal["pause", "resume", "remove"]
    note: str | None = None


class SubscriptionChange(BaseModel):
    """The lead's address was unsubscribed or re-subscribed in the suppression list."""

    unsubscribed: bool
    reason: str | None = None


class Reassignment(BaseModel):
    """Move an enrollment to another sender account."""

    sender: Sender | None = None
    linkedin_account: str | None = None


class AccountReconnected(BaseModel):
    account_id: str


class AccountRef(BaseModel):
    """A sender account: an email inbox, a LinkedIn account, or a campaign's start budget."""

    id: str  # such as "email:rep@acme.test" or "linkedin:default"
    channel: Literal["email", "linkedin", "campaign"]
    sender: Sender | None = None
    # How often a disconnected account is checked; None turns the health check off.
    check_interval: timedelta | None = timedelta(minutes=15)


class SlotRequest(BaseModel):
    """Ask a sender account for the next free sending slot for one step of one lead."""

    account: AccountRef
    workflow_id: str
    step: int
    kind: str  # email, linkedin_invite, linkedin_message, linkedin_visit, start
    cap: int | None = None  # sends of this kind per rolling 24 hours
    spacing: timedelta = timedelta(0)  # between two sends of the account, of any kind
    # The lead's task queue, which names the account's workflow and its queue. None: the
    # booking activity's queue, which was the lead's until channels had queues of their own.
    lead_queue: str | None = None


class SlotGrant(BaseModel):
    granted: bool
    at: datetime | None = None
    # Why the slot is later than asked ("cap" or "spacing"), or why nothing was granted.
    reason: str | None = None
    detail: str | None = None


class PlanStep(BaseModel):
    """A campaign step as the lead's state machine plans it."""

    type: str
    wait_after: timedelta


class StepFinish(BaseModel):
    """The state a lead's last step hands its activity, which then writes the lead's end.

    When the step is sent, the activity applies the outcome to the state machine rebuilt from
    these, and writes the entries not written yet and those of the end, with the lead's final
    status. The workflow then applies the same outcome at the same time and finds the same
    entries, so it writes nothing more: one activity fewer per lead.
    """

    steps: list[PlanStep]
    schedule: SendingSchedule | None = None
    invite_timeout: timedelta
    # The machine's state without its log; its entries are numbered after those of the log.
    machine: MachineSnapshot
    # The lead's identity and the entries not written yet.
    record: RecordInput


class BookedStep(BaseModel):
    """A step that sends through a sender account: book its slot, then run it if the slot is now.

    `activity` is the name of the channel activity that runs the step. `finish` is set for the
    lead's last step when the activity may write the lead's end (StepFinish).
    """

    activity: str
    slot: SlotRequest
    step: StepInput
    finish: StepFinish | None = None


class BookedStepResult(BaseModel):
    """The slot booked for a step and, when that slot was free at once, the step's outcome.

    `recorded` are the entries the activity wrote with the lead's end, at `recorded_at`.
    """

    grant: SlotGrant
    outcome: StepOutcome | None = None
    recorded_at: datetime | None = None
    recorded: list[LogEntry] = Field(default_factory=list)


class AccountProblem(BaseModel):
    """A step found its sender account unusable: the account is marked disconnected."""

    account: AccountRef
    workflow_id: str | None = None
    detail: str


class AccountStatus(BaseModel):
    id: str
    channel: str
    connected: bool
    reason: str | None = None
    since: datetime | None = None
    waiting_leads: int = 0
    sends_last_24h: dict[str, int] = Field(default_factory=dict)
    booked_ahead: int = 0
    last_check: str | None = None


class RecordInput(BaseModel):
    """New activity log entries and the current enrollment state, written to the database."""

    workflow_id: str
    campaign_id: str
    campaign_name: str
    lead_key: str
    status: str
    unsubscribed: bool = False
    entries: list[LogEntry] = Field(default_factory=list)
    # The lead's address when these entries include a bounce, for the suppression list.
    unsubscribe_address: str | None = None


class TaskInput(BaseModel):
    """A call or manual task for a person to complete."""

    workflow_id: str
    campaign_id: str
    lead_key: str
    step_number: int
    step_type: str
    instructions: str


EnrollmentResult.model_rebuild()


# Mailbox polling: the IMAP mailbox of a sender account, read for bounces and replies.


class MailboxCursor(BaseModel):
    """How far a mailbox has been read: the highest UID processed under one UIDVALIDITY.

    IMAP gives each message of a mailbox a UID that only grows, for as long as the mailbox's
    UIDVALIDITY stays the same (RFC 3501, section 2.3.1.1).
    """

    uidvalidity: int | None = None
    last_uid: int = 0


class MailboxTotals(BaseModel):
    polls: int = 0
    messages: int = 0
    failed: int = 0
    last_poll_at: datetime | None = None
    last_summary: str | None = None
    # The error that ended the last poll, when it failed without retries.
    last_error: str | None = None


class MailboxInput(BaseModel):
    """A mailbox poller's input: which mailbox, how often, and where the last run stopped.

    The mailbox's password is not here: workflow inputs are stored in the history, so the
    activity reads it from the worker's settings.
    """

    address: str
    imap_url: str
    poll_interval: timedelta = timedelta(minutes=1)
    # Continue as new after this many polls, so the history stays small (about 10 events a
    # poll).
    polls_per_run: int = Field(default=150, ge=1)
    # The first poll, and the first after a UIDVALIDITY change, read messages from this date on.
    since: date | None = None
    cursor: MailboxCursor = Field(default_factory=MailboxCursor)
    totals: MailboxTotals = Field(default_factory=MailboxTotals)


class PollRequest(BaseModel):
    address: str
    imap_url: str
    since: date
    cursor: MailboxCursor


class PollResult(BaseModel):
    cursor: MailboxCursor
    messages: int = 0
    # Messages that could not be applied and were passed over, by UID.
    failed_uids: list[int] = Field(default_factory=list)
    uidvalidity_changed: bool = False


class MailboxStatus(BaseModel):
    address: str
    imap_url: str
    poll_interval: timedelta
    cursor: MailboxCursor
    totals: MailboxTotals
    # "reading", "retrying" (the poll fails and is retried) or "failed" (it will not work until
    # the IMAP URL changes), with the error when there is one. Filled in by the service.
    state: str = "reading"
    problem: str | None = None
