"""The database: campaigns, enrollments, the activity log, tasks and the suppression list.

SQLite by default (a file in the data directory), any SQLAlchemy URL through `DATABASE_URL`.
Stats are computed from the activity log, never kept as counters, so Stats and Activity
always agree. Every write is idempotent: log entries carry a key unique per enrollment, so an
activity retried after a timeout writes nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from sequencer.addresses import InvalidEmailError, normalize_email
from sequencer.campaign import Campaign
from sequencer.channels import FINAL_STATUSES, EnrollmentStatus, StepStatus
from sequencer.models import (
    AccountRef,
    Lead,
    LogEntry,
    RecordInput,
    SlotGrant,
    SlotRequest,
    StepState,
    TaskInput,
)
from workflows.sender_account import WINDOW, Slot, SlotBook, cap_detail

T = TypeVar("T")

metadata = MetaData()

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("definition", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("workflow_id", String(128), primary_key=True),
    Column("campaign_id", String(64), nullable=False, index=True),
    Column("lead_key", Text, nullable=False),
    Column("lead", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("unsubscribed", Boolean, nullable=False, default=False),
    Column("enrolled_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("campaign_id", "lead_key"),
)

activity = Table(
    "activity",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("workflow_id", String(128), nullable=False, index=True),
    Column("entry_key", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("status", String(32), nullable=False),
    Column("step", Integer),
    Column("step_type", String(32)),
    Column("channel", String(16)),
    Column("reason", Text),
    Column("detail", Text),
    UniqueConstraint("workflow_id", "entry_key"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("reason", String(32), nullable=False),
    Column("source", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("workflow_id", String(128), nullable=False),
    Column("campaign_id", String(64), nullable=False),
    Column("lead_key", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("step_type", String(32), nullable=False),
    Column("instructions", Text, nullable=False),
    Column("status", String(16), nullable=False),  # open, done, failed, skipped, cancelled
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True)),
    Column("note", Text),
    UniqueConstraint("workflow_id", "step"),
)

# Messages read from a sender's mailbox (bounces, replies), so that each is applied once.
inbound_messages = Table(
    "inbound_messages",
    metadata,
    Column("message_key", String(255), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("summary", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

# Soft bounces by address, counted to suppress an address that keeps bouncing.
soft_bounces = Table(
    "soft_bounces",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("message_key", String(255), primary_key=True),
    Column("bounced_at", DateTime(timezone=True), nullable=False),
)

# API keys of the HTTP API: only a SHA-256 digest of each key is stored.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    # The first characters of the key, shown in lists so that a key can be recognised.
    Column("prefix", String(16), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)

# The email sends of each step, keyed by the step's Message-ID, so that a retried attempt never
# sends again what the SMTP server may already have. States:
#   claimed    an attempt owns the send and has not started DATA: a later attempt may take over
#   sending    the message is being transmitted: if the attempt dies now, the outcome is unknown
#   sent       the server accepted the message
#   uncertain  the connection was lost during DATA, or the attempt died in it: never sent again
email_sends = Table(
    "email_sends",
    metadata,
    Column("send_key", String(255), primary_key=True),
    Column("workflow_id", String(128), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempt", String(64), nullable=False),
    Column("detail", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Sender accounts whose sends are booked in this database, and whether each can send. A lead
# that books a slot locks its account's row first, so that two bookings on one account, from
# any worker, never interleave. `connected` mirrors the account's workflow, which decides:
# a booking on an account marked disconnected goes to that workflow, and so does an operator.
sender_accounts = Table(
    "sender_accounts",
    metadata,
    Column("id", String(160), primary_key=True),
    Column("account", JSON, nullable=False),
    Column("connected", Boolean, nullable=False, default=True),
    Column("reason", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("pruned_at", DateTime(timezone=True)),
)

# The sending slots booked on each account: one per lead and step, kept for the 24 hours after
# their time that the daily caps count, and deleted when the account books after that.
sending_slots = Table(
    "sending_slots",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", String(160), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("workflow_id", String(128), nullable=False),
    Column("step", Integer, nullable=False),
    UniqueConstraint("account_id", "workflow_id", "step"),
    Index("ix_sending_slots_account_at", "account_id", "at"),
    Index("ix_sending_slots_account_kind_at", "account_id", "kind", "at"),
    Index("ix_sending_slots_workflow_id", "workflow_id"),
)

SEND_CLAIMED = "claimed"
SEND_SENDING = "sending"
SEND_SENT = "sent"
SEND_UNCERTAIN = "uncertain"

OPEN = "open"


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes even for timezone-aware columns; every time stored is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class NotFoundError(LookupError):
    """A campaign, lead or task that the database does not contain."""


@dataclass
class TaskRow:
    id: int
    workflow_id: str
    campaign_id: str
    lead_key: str
    step: int
    step_type: str
    instructions: str
    status: str
    created_at: datetime
    closed_at: datetime | None
    note: str | None


@dataclass
class SendRow:
    send_key: str
    workflow_id: str
    step: int
    state: str
    attempt: str
    detail: str | None
    updated_at: datetime


def _send_row(row: Any) -> SendRow:
    return SendRow(
        send_key=row.send_key,
        workflow_id=row.workflow_id,
        step=row.step,
        state=row.state,
        attempt=row.attempt,
        detail=row.detail,
        updated_at=_aware(row.updated_at),
    )


@dataclass
class AccountRow:
    """A sender account in the database, with the sends booked on it in the last 24 hours."""

    account: AccountRef
    connected: bool
    reason: str | None
    sends_last_24h: dict[str, int]
    booked_ahead: int


@dataclass
class ApiKeyRow:
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _api_key_row(row: Any) -> ApiKeyRow:
    return ApiKeyRow(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=_aware(row.created_at),
        last_used_at=_aware(row.last_used_at),
        revoked_at=_aware(row.revoked_at),
    )


@dataclass
class EnrollmentRow:
    workflow_id: str
    campaign_id: str
    lead_key: str
    lead: Lead
    status: str
    unsubscribed: bool
    enrolled_at: datetime
    updated_at: datetime

    def matches(self, query: str) -> bool:
        """Return whether `query` occurs, ignoring case, in the lead's key, email address,
        LinkedIn URL, name or company."""
        lead = self.lead
        name = " ".join(part for part in (lead.first_name, lead.last_name) if part)
        fields = (self.lead_key, lead.email, lead.linkedin_url, name, lead.company)
        needle = query.casefold()
        return any(needle in value.casefold() for value in fields if value)


@dataclass
class ChannelCounts:
    sent: int = 0
    failed: int = 0
    bounced: int = 0
    skipped: int = 0
    waiting: int = 0

    @property
    def failure_rate(self) -> float | None:
        """Return (failed + bounced) / executed steps, or None before any step ran."""
        executed = self.sent + self.failed + self.bounced
        return (self.failed + self.bounced) / executed if executed else None

    def add(self, status: str) -> None:
        if status in (s.value for s in StepStatus) and status != StepStatus.PENDING:
            setattr(self, status, getattr(self, status) + 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "bounced": self.bounced,
            "skipped": self.skipped,
            "waiting": self.waiting,
            "failure_rate": self.failure_rate,
        }


@dataclass
class CampaignStats:
    campaign_id: str
    campaign_name: str
    leads: dict[str, int] = field(default_factory=dict)
    steps: dict[int, ChannelCounts] = field(default_factory=dict)
    step_types: dict[int, str] = field(default_factory=dict)
    channels: dict[str, ChannelCounts] = field(default_factory=dict)
    unsubscribed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign_name,
            "campaign_id": self.campaign_id,
            "leads": self.leads,
            "unsubscribed": self.unsubscribed,
            "steps": [
                {"step": number, "type": self.step_types[number], **counts.as_dict()}
                for number, counts in sorted(self.steps.items())
            ],
            "channels": {name: counts.as_dict() for name, counts in sorted(self.channels.items())},
        }


# A write for `Store.write_all`: a function of a connection, and its other arguments.
Write = tuple[Callable[..., Any], tuple[Any, ...]]

# How many writes one transaction of the write queue takes at most.
WRITE_BATCH = 64


@dataclass(frozen=True)
class Failed:
    """The error of one write among those `Store.write_all` ran."""

    error: Exception


class WriteQueue:
    """Run the database writes of a worker's activities in groups, one transaction per group.

    Dozens of activities write at once under load: bookings of sending slots, log entries,
    the send ledger. With a thread hand-off and a transaction each, the hand-offs and the
    commits cost more than the statements. The queue runs one group at a time, in a thread.
    The writes that arrive while a group runs form the next group (group commit): one
    hand-off and one commit for up to WRITE_BATCH writes. Each caller gets its own result or
    error, after the commit.
    """

    def __init__(self, store: Store, batch: int = WRITE_BATCH) -> None:
        self._store = store
        self._batch = batch
        self._waiting: list[tuple[Write, asyncio.Future[Any]]] = []
        self._running: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Groups run and writes handed to them, failed ones included, for tests and benchmarks.
        self.transactions = 0
        self.writes = 0

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Return `work(connection, *args)`, run in a write transaction shared with others."""
        loop = asyncio.get_running_loop()
        if self._running is not None and self._loop is not loop:
            # Another event loop drains the queue (two loops share a store in some tests).
            return await asyncio.to_thread(self._store.write, work, *args)
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(((work, args), future))
        if self._running is None:
            self._loop = loop
            self._running = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Write, asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._batch]
                del self._waiting[: self._batch]
                outcomes = await asyncio.to_thread(
                    self._store.write_all, [write for write, _ in batch]
                )
                self.transactions += 1
                self.writes += len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue  # its caller was cancelled
                    if isinstance(outcome, Failed):
                        future.set_exception(outcome.error)
                    else:
                        future.set_result(outcome)
                batch = []
        except Exception as error:  # noqa: BLE001 - the thread failed: its callers get why
            for _, future in batch + self._waiting:
                if not future.done():
                    future.set_exception(error)
            self._waiting.clear()
        except BaseException:
            # The loop is closing: cancel the callers still waiting.
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._running = None


class Store:
    """Database access shared by the worker's activities and the command line."""

    def __init__(self, url: str) -> None:
        self.url = url
        # preserve_rowcount: without it psycopg 3 reports -1 rows for an INSERT without
        # RETURNING (SQLAlchemy issue 10696), and the idempotent writes count on that number.
        self.engine: Engine = create_engine(
            url, future=True, execution_options={"preserve_rowcount": True}
        )
        # Writers of this process take turns here on SQLite, which allows one writer at a
        # time: a writer that finds the database locked polls for it with growing sleeps.
        self._writing: AbstractContextManager[Any] = nullcontext()
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            self._writing = threading.Lock()
        self._add_entries = self._insert(activity).on_conflict_do_nothing().returning(activity.c.id)
        self._add_enrollment = (
            self._insert(enrollments).on_conflict_do_nothing().returning(enrollments.c.workflow_id)
        )
        self._lock_account = (
            self._insert(sender_accounts)
            .values(
                id=bindparam("account_key"),
                account=bindparam("account_value", type_=JSON),
                connected=True,
                updated_at=bindparam("now"),
            )
            .on_conflict_do_update(index_elements=["id"], set_={"updated_at": bindparam("now")})
            .returning(sender_accounts.c.connected, sender_accounts.c.pruned_at)
        )
        # The worker's activities write through this queue.
        self.writes = WriteQueue(self)
        # Imported here: the migrations import this module's tables.
        from sequencer.schema import upgrade

        upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def write(self, work: Callable[..., T], *args: Any) -> T:
        """Return `work(connection, *args)`, run in a write transaction of its own."""
        with self._writing, self.engine.begin() as connection:
            return work(connection, *args)

    def write_all(self, works: Sequence[Write]) -> list[Any]:
        """Run `works` in one transaction and return what each returned, in order.

        When one raises, nothing of the transaction stays. A database that fails as a whole
        (locked, unreachable) fails every write with the same error. Any other error runs each
        write again in a transaction of its own, so that it reaches only the write that raised.
        Failed writes appear in the result as `Failed`.
        """
        if len(works) > 1:
            try:
                with self._writing, self.engine.begin() as connection:
                    return [work(connection, *args) for work, args in works]
            except OperationalError as error:
                return [Failed(error)] * len(works)
            except Exception:  # noqa: BLE001 - each write runs again and gets its own error
                pass
        outcomes: list[Any] = []
        for work, args in works:
            try:
                outcomes.append(self.write(work, *args))
            except Exception as error:  # noqa: BLE001 - handed to the write's caller
                outcomes.append(Failed(error))
        return outcomes

    def _insert(self, table: Table):
        if self.engine.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    # Campaigns and enrollments

    def save_campaign(self, campaign: Campaign) -> None:
        now = _now()
        definition = json.loads(campaign.model_dump_json())
        statement = self._insert(campaigns).values(
            id=campaign.id,
            name=campaign.name,
            definition=definition,
            created_at=now,
            updated_at=now,
        )
        statement = statement.on_conflict_do_update(
            index_elements=["id"],
            set_={"name": campaign.name, "definition": definition, "updated_at": now},
        )
        with self.engine.begin() as connection:
            connection.execute(statement)

    def get_campaign(self, reference: str) -> Campaign:
        """Return a campaign by id or by name, raising NotFoundError with the known ids."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(campaigns.c.definition).where(campaigns.c.id == reference)
            ).first()
            if row is None:
                named = connection.execute(
                    select(campaigns.c.id, campaigns.c.definition)
                    .where(func.lower(campaigns.c.name) == reference.strip().lower())
                    .order_by(campaigns.c.created_at)
                ).all()
                if len(named) > 1:
                    ids = ", ".join(r.id for r in named)
                    raise NotFoundError(
                        f"{len(named)} campaigns are named {reference!r} ({ids}); "
                        "name the one you mean by its id"
                    )
                row = named[0] if named else None
            if row is None:
                known = [r.id for r in connection.execute(select(campaigns.c.id))]
                hint = (
                    f"known campaigns: {', '.join(known)}"
                    if known
                    else "no campaign is launched yet"
                )
                raise NotFoundError(f"campaign {reference!r} not found ({hint})")
        return Campaign.model_validate(row.definition)

    def list_campaigns(self) -> list[Campaign]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(campaigns.c.definition).order_by(campaigns.c.created_at)
            )
            return [Campaign.model_validate(row.definition) for row in rows]

    def add_enrollment(self, workflow_id: str, campaign_id: str, lead: Lead) -> bool:
        """Insert an enrollment row; return False when the lead was already enrolled."""
        return workflow_id in self.add_enrollments(campaign_id, [(workflow_id, lead)])

    def add_enrollments(self, campaign_id: str, leads: Sequence[tuple[str, Lead]]) -> set[str]:
        """Insert the enrollment rows of `(workflow id, lead)` pairs in one transaction.

        Returns the workflow ids of the rows inserted: a lead enrolled already keeps its row.
        """
        if not leads:
            return set()
        now = _now()
        rows = [
            {
                "workflow_id": workflow_id,
                "campaign_id": campaign_id,
                "lead_key": lead.key,
                "lead": lead.model_dump(mode="json"),
                "status": EnrollmentStatus.RUNNING.value,
                "unsubscribed": False,
                "enrolled_at": now,
                "updated_at": now,
            }
            for workflow_id, lead in leads
        ]
        with self._writing, self.engine.begin() as connection:
            return set(connection.execute(self._add_enrollment, rows).scalars())

    def forget_enrollments(self, workflow_ids: Collection[str]) -> None:
        """Delete the enrollment rows of workflows that never started, unless they wrote."""
        if not workflow_ids:
            return
        ids = sorted(workflow_ids)
        with self._writing, self.engine.begin() as connection:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                wrote = select(activity.c.workflow_id).where(activity.c.workflow_id.in_(chunk))
                connection.execute(
                    enrollments.delete().where(
                        enrollments.c.workflow_id.in_(chunk),
                        enrollments.c.workflow_id.not_in(wrote),
                    )
                )

    def get_enrollment(self, campaign_id: str, lead_reference: str) -> EnrollmentRow:
        """Find a lead of a campaign by email address or LinkedIn URL."""
        keys = {lead_reference.strip()}
        try:
            keys.add(normalize_email(lead_reference))
        except InvalidEmailError:
            pass
        with self.engine.connect() as connection:
            row = connection.execute(
                _enrollment_query().where(
                    enrollments.c.campaign_id == campaign_id,
                    enrollments.c.lead_key.in_(keys) | enrollments.c.workflow_id.in_(keys),
                )
            ).first()
        if row is None:
            raise NotFoundError(
                f"lead {lead_reference!r} is not enrolled in campaign {campaign_id!r}; "
                "check the address, or list the campaign's leads with `sequencer leads`"
            )
        return _enrollment(row)

    def get_enrollment_by_workflow(self, workflow_id: str) -> EnrollmentRow:
        with self.engine.connect() as connection:
            row = connection.execute(
                _enrollment_query().where(enrollments.c.workflow_id == workflow_id)
            ).first()
        if row is None:
            raise NotFoundError(f"no enrollment has the workflow id {workflow_id!r}")
        return _enrollment(row)

    def list_enrollments(self, campaign_id: str) -> list[EnrollmentRow]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                _enrollment_query()
                .where(enrollments.c.campaign_id == campaign_id)
                .order_by(enrollments.c.enrolled_at, enrollments.c.lead_key)
            )
            return [_enrollment(row) for row in rows]

    def set_unsubscribed(self, workflow_id: str, unsubscribed: bool = True) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(enrollments)
                .where(enrollments.c.workflow_id == workflow_id)
                .values(unsubscribed=unsubscribed, updated_at=_now())
            )

    def enrollments_for_address(self, address: str) -> list[EnrollmentRow]:
        """Return every enrollment, in any campaign, of the lead with this email address."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                _enrollment_query()
                .where(enrollments.c.lead_key == _key(address))
                .order_by(enrollments.c.enrolled_at)
            )
            return [_enrollment(row) for row in rows]

    def workflow_entries(self, workflow_id: str) -> int:
        """Return how many log entries the enrollment's workflow runs have written."""
        with self.engine.connect() as connection:
            return connection.execute(
                select(func.count())
                .select_from(activity)
                .where(
                    activity.c.workflow_id == workflow_id,
                    activity.c.entry_key.like("wf:%"),
                )
            ).scalar_one()

    def suppression(self, address: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(suppressions).where(suppressions.c.address == _key(address))
            ).first()
        return dict(row._mapping) if row else None

    # The activity log

    def record(self, record: RecordInput) -> int:
        """Write new log entries and the enrollment's status; return how many entries were new.

        Entries already written (a retried activity) are skipped by their unique key.
        """
        return self.write(self.record_in, record)

    def record_in(self, connection: Connection, record: RecordInput) -> int:
        """Run `record` in the caller's transaction."""
        rows = [
            {
                "workflow_id": record.workflow_id,
                "entry_key": f"wf:{entry.seq}",
                **_entry_values(entry),
            }
            for entry in record.entries
        ]
        inserted = 0
        if rows:
            # One statement for all entries. Only the rows inserted come back.
            inserted = len(connection.execute(self._add_entries, rows).all())
        connection.execute(
            _SET_STATUS,
            {
                "lead_id": record.workflow_id,
                "status": record.status,
                "unsubscribed": record.unsubscribed,
                "updated_at": _now(),
            },
        )
        if record.status in FINAL_STATUSES:
            connection.execute(
                update(tasks)
                .where(tasks.c.workflow_id == record.workflow_id, tasks.c.status == OPEN)
                .values(status="cancelled", closed_at=_now(), note=f"enrollment {record.status}")
            )
        if record.unsubscribe_address:
            self._suppress(connection, record.unsubscribe_address, "bounce", record.workflow_id)
        return inserted

    def claim_inbound(self, message_key: str, kind: str, summary: str) -> bool:
        """Record an inbound message; return False when it was recorded before."""
        statement = (
            self._insert(inbound_messages)
            .values(message_key=message_key[:255], kind=kind, summary=summary, received_at=_now())
            .on_conflict_do_nothing()
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

    # Email sends (at most one per step)

    def claim_send(self, send_key: str, workflow_id: str, step: int, attempt: str) -> SendRow:
        """Make `attempt` the owner of a send not yet started, and return the send's row.

        A row in another state than `claimed` is returned unchanged: the caller must not send.
        """
        return self.write(self.claim_send_in, send_key, workflow_id, step, attempt)

    def claim_send_in(
        self, connection: Connection, send_key: str, workflow_id: str, step: int, attempt: str
    ) -> SendRow:
        """Run `claim_send` in the caller's transaction."""
        connection.execute(
            self._insert(email_sends)
            .values(
                send_key=send_key,
                workflow_id=workflow_id,
                step=step,
                state=SEND_CLAIMED,
                attempt=attempt,
                updated_at=_now(),
            )
            .on_conflict_do_nothing()
        )
        connection.execute(
            update(email_sends)
            .where(email_sends.c.send_key == send_key, email_sends.c.state == SEND_CLAIMED)
            .values(attempt=attempt, updated_at=_now())
        )
        row = connection.execute(
            select(email_sends).where(email_sends.c.send_key == send_key)
        ).one()
        return _send_row(row)

    def move_send(
        self, send_key: str, attempt: str, before: str, after: str, detail: str | None = None
    ) -> bool:
        """Move a send from state `before` to `after` if `attempt` still owns it."""
        return self.write(self.move_send_in, send_key, attempt, before, after, detail)

    def move_send_in(
        self,
        connection: Connection,
        send_key: str,
        attempt: str,
        before: str,
        after: str,
        detail: str | None = None,
    ) -> bool:
        """Run `move_send` in the caller's transaction."""
        values: dict[str, Any] = {"state": after, "updated_at": _now()}
        if detail is not None:
            values["detail"] = detail
        moved = connection.execute(
            update(email_sends)
            .where(
                email_sends.c.send_key == send_key,
                email_sends.c.attempt == attempt,
                email_sends.c.state == before,
            )
            .values(**values)
        )
        return moved.rowcount == 1

    def release_send(self, send_key: str, attempt: str) -> None:
        """Forget a send that did not reach the server, so that a later attempt may send it."""
        self.write(self.release_send_in, send_key, attempt)

    def release_send_in(self, connection: Connection, send_key: str, attempt: str) -> None:
        """Run `release_send` in the caller's transaction."""
        connection.execute(
            email_sends.delete().where(
                email_sends.c.send_key == send_key,
                email_sends.c.attempt == attempt,
                email_sends.c.state.in_([SEND_CLAIMED, SEND_SENDING]),
            )
        )

    # Sending slots: the daily caps and spacing of sender accounts

    def book_slot(self, request: SlotRequest, now: datetime) -> SlotGrant | None:
        """Book the next free slot from `now` for one step of one lead on its account.

        The same lead and step get the slot they booked before. Returns None, booking nothing,
        when the account is marked disconnected: its workflow then decides (rule 8).
        """
        return self.write(self.book_slot_in, request, now)

    def book_slot_in(
        self, connection: Connection, request: SlotRequest, now: datetime
    ) -> SlotGrant | None:
        """Run `book_slot` in the caller's transaction."""
        account_id = request.account.id
        # A write first, so that the booking holds the lock until it commits: the
        # database's on SQLite, the account's row on PostgreSQL.
        connected, pruned_at = connection.execute(
            self._lock_account,
            {
                "account_key": account_id,
                "account_value": request.account.model_dump(mode="json"),
                "now": now,
            },
        ).one()
        if not connected:
            return None
        mine = {"account_key": account_id, "lead": request.workflow_id, "number": request.step}
        booked = connection.execute(_BOOKED, mine).scalar()
        if booked is not None:
            return SlotGrant(granted=True, at=max(_aware(booked), now))
        if pruned_at is None or _aware(pruned_at) <= now - PRUNE_EVERY:
            connection.execute(_PRUNE, {"account_key": account_id, "before": now - WINDOW})
            connection.execute(_MARK_PRUNED, {"account_key": account_id, "now": now})
        book = SlotBook(_slots_that_limit(connection, request, now))
        at, reason = book.next_free(now, request.kind, request.cap, request.spacing)
        connection.execute(
            _BOOK,
            {
                "account_id": account_id,
                "kind": request.kind,
                "at": at,
                "workflow_id": request.workflow_id,
                "step": request.step,
            },
        )
        detail = cap_detail(account_id, request.cap, request.kind) if reason == "cap" else None
        return SlotGrant(granted=True, at=at, reason=reason, detail=detail)

    def release_slots(self, workflow_id: str, now: datetime, account_id: str | None = None) -> int:
        """Free the slots a lead booked and will not use: those still ahead of `now`."""
        condition = [sending_slots.c.workflow_id == workflow_id, sending_slots.c.at > now]
        if account_id is not None:
            condition.append(sending_slots.c.account_id == account_id)
        with self.engine.begin() as connection:
            return connection.execute(sending_slots.delete().where(*condition)).rowcount

    def set_account_connected(
        self, account: AccountRef, connected: bool, reason: str | None = None
    ) -> None:
        """Mirror what the account's workflow decided: it can send, or it cannot and why."""
        values = {"connected": connected, "reason": reason, "updated_at": _now()}
        with self.engine.begin() as connection:
            connection.execute(
                self._insert(sender_accounts)
                .values(id=account.id, account=account.model_dump(mode="json"), **values)
                .on_conflict_do_update(index_elements=["id"], set_=values)
            )

    def sender_accounts(self) -> list[AccountRow]:
        """Return every account that booked a slot here, with its sends of the last 24 hours."""
        now = _now()
        with self.engine.connect() as connection:
            accounts = connection.execute(select(sender_accounts)).all()
            counts = connection.execute(
                select(sending_slots.c.account_id, sending_slots.c.kind, func.count())
                .where(sending_slots.c.at > now - WINDOW, sending_slots.c.at <= now)
                .group_by(sending_slots.c.account_id, sending_slots.c.kind)
            ).all()
            ahead = dict(
                connection.execute(
                    select(sending_slots.c.account_id, func.count())
                    .where(sending_slots.c.at > now)
                    .group_by(sending_slots.c.account_id)
                ).all()
            )
        sent: dict[str, dict[str, int]] = defaultdict(dict)
        for account_id, kind, count in counts:
            sent[account_id][kind] = count
        return [
            AccountRow(
                account=AccountRef.model_validate(row.account),
                connected=row.connected,
                reason=row.reason,
                sends_last_24h=sent.get(row.id, {}),
                booked_ahead=ahead.get(row.id, 0),
            )
            for row in sorted(accounts, key=lambda row: row.id)
        ]

    def list_sends(self, state: str | None = None) -> list[SendRow]:
        query = select(email_sends).order_by(email_sends.c.updated_at)
        if state is not None:
            query = query.where(email_sends.c.state == state)
        with self.engine.connect() as connection:
            return [_send_row(row) for row in connection.execute(query)]

    def record_soft_bounce(
        self, address: str, message_key: str, at: datetime, window: timedelta
    ) -> int:
        """Record a soft bounce of `address` once per message, and return how many soft
        bounces of that address arrived in the `window` up to `at`, this one included."""
        statement = (
            self._insert(soft_bounces)
            .values(address=_key(address), message_key=message_key[:255], bounced_at=at)
            .on_conflict_do_nothing()
        )
        count = (
            select(func.count())
            .select_from(soft_bounces)
            .where(soft_bounces.c.address == _key(address))
            .where(soft_bounces.c.bounced_at > at - window)
            .where(soft_bounces.c.bounced_at <= at)
        )
        with self.engine.begin() as connection:
            connection.execute(statement)
            return int(connection.execute(count).scalar_one())

    # API keys

    def add_api_key(self, name: str, prefix: str, digest: str) -> int:
        """Store a new API key's digest and return its id."""
        with self.engine.begin() as connection:
            result = connection.execute(
                api_keys.insert().values(name=name, prefix=prefix, digest=digest, created_at=_now())
            )
            return int(result.inserted_primary_key[0])

    def api_key_by_digest(self, digest: str) -> ApiKeyRow | None:
        """Return the key with this digest, or None.

        The key's last use is written at most once a minute, so that a busy client does not
        cause a write on every request.
        """
        with self.engine.begin() as connection:
            row = connection.execute(
                select(api_keys).where(api_keys.c.digest == digest)
            ).one_or_none()
            if row is None:
                return None
            key = _api_key_row(row)
            now = _now()
            if key.revoked_at is None and (
                key.last_used_at is None or now - key.last_used_at > timedelta(minutes=1)
            ):
                connection.execute(
                    update(api_keys).where(api_keys.c.id == key.id).values(last_used_at=now)
                )
            return key

    def list_api_keys(self) -> list[ApiKeyRow]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(api_keys).order_by(api_keys.c.id))
            return [_api_key_row(row) for row in rows]

    def revoke_api_key(self, key_id: int) -> bool:
        """Revoke a key; return False when no key has that id or it was revoked before."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id)
                .where(api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
            return result.rowcount == 1

    def forget_inbound(self, message_key: str) -> None:
        """Forget an inbound message whose processing failed, so that it can be tried again."""
        with self.engine.begin() as connection:
            connection.execute(
                inbound_messages.delete().where(inbound_messages.c.message_key == message_key[:255])
            )

    def record_external(self, workflow_id: str, key: str, entry: LogEntry) -> bool:
        """Write an entry that did not come from the workflow (an event after it ended).

        `key` identifies the event, so the same event reported twice is written once.
        """
        statement = (
            self._insert(activity)
            .values(workflow_id=workflow_id, entry_key=f"ext:{key}"[:64], **_entry_values(entry))
            .on_conflict_do_nothing()
        )
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

    def log(self, workflow_id: str) -> list[LogEntry]:
        """Return an enrollment's activity log in the order it was recorded.

        Recording order is causal order: the workflow writes its entries in sequence, and an
        event recorded after the workflow ended comes after them. Sorting by timestamp
        instead would mix clocks (the worker's and a command's) that can disagree.
        """
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(activity)
                .where(activity.c.workflow_id == workflow_id)
                .order_by(activity.c.id)
            )
            return [
                LogEntry(
                    seq=row.id,
                    at=_aware(row.at),
                    kind=row.kind,
                    status=row.status,
                    step=row.step,
                    step_type=row.step_type,
                    channel=row.channel,
                    reason=row.reason,
                    detail=row.detail,
                )
                for row in rows
            ]

    def step_states(self, workflow_id: str, campaign: Campaign) -> list[StepState]:
        """Return each step's current status, from the last log entry about it."""
        states = [
            StepState(step=number, type=step.type, channel=step.channel.value)
            for number, step in enumerate(campaign.steps, start=1)
        ]
        for entry in self.log(workflow_id):
            if entry.kind == "step" and entry.step and entry.step <= len(states):
                state = states[entry.step - 1]
                state.status = StepStatus(entry.status)
                state.at = entry.at
                state.reason = entry.reason
                state.detail = entry.detail
        return states

    def stats(self, campaign_id: str) -> CampaignStats:
        """Count leads by status and steps by outcome, from the activity log alone."""
        campaign = self.get_campaign(campaign_id)
        result = CampaignStats(campaign_id=campaign.id, campaign_name=campaign.name)
        for number, step in enumerate(campaign.steps, start=1):
            result.steps[number] = ChannelCounts()
            result.step_types[number] = step.type
            result.channels.setdefault(step.channel.value, ChannelCounts())

        statuses: Counter[str] = Counter()
        latest: dict[tuple[str, int], str] = {}
        with self.engine.connect() as connection:
            for row in connection.execute(
                _enrollment_query().where(enrollments.c.campaign_id == campaign.id)
            ):
                statuses[row.status] += 1
                result.unsubscribed += bool(row.unsubscribed or row.suppressed)

            # A step's status is the status of the last log entry about it.
            rows = connection.execute(
                select(activity.c.workflow_id, activity.c.step, activity.c.status)
                .join(enrollments, enrollments.c.workflow_id == activity.c.workflow_id)
                .where(enrollments.c.campaign_id == campaign.id, activity.c.kind == "step")
                .order_by(activity.c.id)
            )
            for row in rows:
                latest[(row.workflow_id, row.step)] = row.status

        result.leads = {status.value: statuses.get(status.value, 0) for status in EnrollmentStatus}
        by_channel: defaultdict[str, ChannelCounts] = defaultdict(ChannelCounts)
        for (_, number), status in latest.items():
            if number in result.steps:
                result.steps[number].add(status)
                by_channel[campaign.steps[number - 1].channel.value].add(status)
        result.channels.update(by_channel)
        return result

    # Suppression list

    def is_suppressed(self, address: str) -> bool:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(suppressions.c.address).where(suppressions.c.address == _key(address))
            ).first()
        return row is not None

    def suppress(self, address: str, reason: str, source: str) -> bool:
        with self.engine.begin() as connection:
            return self._suppress(connection, address, reason, source)

    def _suppress(self, connection, address: str, reason: str, source: str) -> bool:
        statement = (
            self._insert(suppressions)
            .values(address=_key(address), reason=reason, source=source, created_at=_now())
            .on_conflict_do_nothing()
        )
        return connection.execute(statement).rowcount == 1

    def unsuppress(self, address: str) -> bool:
        """Remove an address from the suppression list; return False when it was not there."""
        with self.engine.begin() as connection:
            result = connection.execute(
                suppressions.delete().where(suppressions.c.address == _key(address))
            )
        return result.rowcount == 1

    def list_suppressions(self) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(suppressions).order_by(suppressions.c.created_at))
            return [dict(row._mapping) for row in rows]

    # Tasks

    def create_task(self, task: TaskInput) -> TaskRow:
        """Create the task for a call or manual step, or return the one already created."""
        return self.write(self.create_task_in, task)

    def create_task_in(self, connection: Connection, task: TaskInput) -> TaskRow:
        """Run `create_task` in the caller's transaction."""
        statement = (
            self._insert(tasks)
            .values(
                workflow_id=task.workflow_id,
                campaign_id=task.campaign_id,
                lead_key=task.lead_key,
                step=task.step_number,
                step_type=task.step_type,
                instructions=task.instructions,
                status=OPEN,
                created_at=_now(),
            )
            .on_conflict_do_nothing()
        )
        connection.execute(statement)
        row = connection.execute(
            select(tasks).where(
                tasks.c.workflow_id == task.workflow_id, tasks.c.step == task.step_number
            )
        ).one()
        return _task(row)

    def list_tasks(
        self, status: str | None = OPEN, campaign_id: str | None = None
    ) -> list[TaskRow]:
        query = select(tasks).order_by(tasks.c.created_at, tasks.c.id)
        if status:
            query = query.where(tasks.c.status == status)
        if campaign_id:
            query = query.where(tasks.c.campaign_id == campaign_id)
        with self.engine.connect() as connection:
            return [_task(row) for row in connection.execute(query)]

    def get_task(self, task_id: int) -> TaskRow:
        with self.engine.connect() as connection:
            row = connection.execute(select(tasks).where(tasks.c.id == task_id)).first()
        if row is None:
            raise NotFoundError(
                f"task {task_id} not found; list open tasks with `sequencer task list`"
            )
        return _task(row)

    def set_task_status(self, task_id: int, status: str, note: str | None) -> None:
        """Overwrite a task's status, for a task whose outcome could not be delivered."""
        closed_at = None if status == OPEN else _now()
        with self.engine.begin() as connection:
            connection.execute(
                update(tasks)
                .where(tasks.c.id == task_id)
                .values(status=status, note=note, closed_at=closed_at)
            )

    def close_task(self, task_id: int, status: str, note: str | None = None) -> bool:
        """Close an open task; return False when it was no longer open."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(tasks)
                .where(tasks.c.id == task_id, tasks.c.status == OPEN)
                .values(status=status, closed_at=_now(), note=note)
            )
        return result.rowcount == 1


def _key(address: str) -> str:
    try:
        return normalize_email(address)
    except InvalidEmailError:
        return address.strip().lower()


def _entry_values(entry: LogEntry) -> dict[str, Any]:
    return {
        "at": entry.at,
        "kind": entry.kind,
        "status": entry.status,
        "step": entry.step,
        "step_type": entry.step_type,
        "channel": entry.channel,
        "reason": entry.reason,
        "detail": entry.detail,
    }


def _task(row) -> TaskRow:
    values = dict(row._mapping)
    values["created_at"] = _aware(values["created_at"])
    values["closed_at"] = _aware(values["closed_at"])
    return TaskRow(**values)


def _enrollment_query():
    # Unsubscribed is a flag on the address, kept in the workspace-wide suppression list, so
    # an address suppressed by another campaign shows as unsubscribed here too.
    return select(enrollments, suppressions.c.address.label("suppressed")).select_from(
        enrollments.outerjoin(suppressions, suppressions.c.address == enrollments.c.lead_key)
    )


def _enrollment(row) -> EnrollmentRow:
    values = dict(row._mapping)
    values["unsubscribed"] = bool(values.pop("suppressed") or values["unsubscribed"])
    values["lead"] = Lead.model_validate(values["lead"])
    values["enrolled_at"] = _aware(values["enrolled_at"])
    values["updated_at"] = _aware(values["updated_at"])
    return EnrollmentRow(**values)


_SET_STATUS = update(enrollments).where(enrollments.c.workflow_id == bindparam("lead_id"))

# The statements of a booking, built once: a booking runs for every send.
_SLOT_COLUMNS = select(
    sending_slots.c.id,
    sending_slots.c.at,
    sending_slots.c.kind,
    sending_slots.c.workflow_id,
    sending_slots.c.step,
).where(sending_slots.c.account_id == bindparam("account_key"))
_BOOKED = select(sending_slots.c.at).where(
    sending_slots.c.account_id == bindparam("account_key"),
    sending_slots.c.workflow_id == bindparam("lead"),
    sending_slots.c.step == bindparam("number"),
)
_NEAR = _SLOT_COLUMNS.where(sending_slots.c.at > bindparam("after"))
_RECENT = _SLOT_COLUMNS.where(
    sending_slots.c.kind == bindparam("kind_key"), sending_slots.c.at > bindparam("after")
)
_RECENT_UP_TO = select(func.count()).select_from(_RECENT.limit(bindparam("cap")).subquery())
_PRUNE = sending_slots.delete().where(
    sending_slots.c.account_id == bindparam("account_key"),
    sending_slots.c.at <= bindparam("before"),
)
_MARK_PRUNED = (
    update(sender_accounts)
    .where(sender_accounts.c.id == bindparam("account_key"))
    .values(pruned_at=bindparam("now"))
)
_BOOK = sending_slots.insert()
# How often a booking deletes the account's slots that no cap counts any more.
PRUNE_EVERY = timedelta(hours=1)


def _slots_that_limit(connection, request: SlotRequest, now: datetime) -> list[Slot]:
    """Return the account's booked slots that can hold back a new one from `now`.

    Those closer than the spacing, and those of the request's kind within 24 hours when there
    are as many as the cap: with fewer, no window from `now` can reach it.
    """
    account = {"account_key": request.account.id}
    queries = []
    if request.spacing > timedelta(0):
        queries.append((_NEAR, {**account, "after": now - request.spacing}))
    if request.cap is not None:
        recent = {**account, "kind_key": request.kind, "after": now - WINDOW}
        count = connection.execute(_RECENT_UP_TO, {**recent, "cap": request.cap}).scalar_one()
        if count >= request.cap:
            queries.append((_RECENT, recent))
    slots: dict[int, Slot] = {}
    for query, parameters in queries:
        for row in connection.execute(query, parameters):
            slots[row.id] = Slot(
                at=_aware(row.at), kind=row.kind, workflow_id=row.workflow_id, step=row.step
            )
    return list(slots.values())


# How long a connection to a SQLite database waits for another one's lock.
SQLITE_BUSY_SECONDS = 10.0


def _sqlite_pragmas(connection, _record) -> None:
    # The busy timeout makes a writer wait for the other instead of failing with "database is
    # locked". WAL lets the CLI read while the worker writes.
    cursor = connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        _switch_to_wal(cursor)
    cursor.close()


def _switch_to_wal(cursor) -> None:
    """Put a SQLite database in WAL mode, which it then keeps for every later connection.

    The switch needs the database to itself. While another connection opens the same new
    database, SQLite rejects the switch at once, without waiting for the busy timeout, so the
    switch is tried again until that timeout has passed.
    """
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    pause = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
