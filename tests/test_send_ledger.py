"""At most one send per email step: the send ledger in a real SQLite file, against SMTP servers
on free 127.0.0.1 ports.

Each test sends the same step more than once, as Temporal does when it retries an attempt or
when a worker takes over from one that died, and counts what reached the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from temporalio.exceptions import ApplicationError

from activities.email import (
    DELIVERY_UNCERTAIN_REASON,
    EmailActivities,
    LedgerEntry,
    message_id_for,
)
from activities.records import StoreSendLedger
from sequencer.channels import StepStatus
from sequencer.config import load_settings
from sequencer.errors import TRANSIENT_ERROR_TYPE
from sequencer.models import Lead, workflow_id_for
from sequencer.service import Sequencer
from sequencer.storage import Store
from tests.test_email_channel import (
    CAMPAIGN_ID,
    LEAD_EMAIL,
    SENDER_EMAIL,
    AcceptingHandler,
    SuppressionList,
    make_input,
    raw_tcp_server,
    send,
    smtp_server,
)


@pytest.fixture
def store(database_url: str):
    """A store on SQLite, then on PostgreSQL."""
    store = Store(database_url)
    yield store
    store.close()


def channel(store: Store) -> EmailActivities:
    return EmailActivities(is_suppressed=SuppressionList(), ledger=StoreSendLedger(store))


def states(store: Store) -> list[str]:
    return [row.state for row in store.list_sends()]


class DeferOnceHandler:
    """Defer the first message after DATA with 451, accept the next ones."""

    def __init__(self) -> None:
        self.calls = 0
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.calls += 1
        if self.calls == 1:
            return "451 4.3.0 Temporary local problem, try again"
        self.envelopes.append(envelope)
        return "250 OK"


class HangUpAfterData:
    """A server that reads the whole message, then closes the connection without a reply: the
    client cannot know whether the message was accepted."""

    def __init__(self) -> None:
        self.connections = 0
        self.messages = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 hangup.test ESMTP\r\n")
        await writer.drain()
        while line := await reader.readline():
            command = line.strip().upper()
            if command.startswith((b"EHLO", b"HELO")):
                writer.write(b"250 hangup.test\r\n")
            elif command.startswith((b"MAIL", b"RCPT")):
                writer.write(b"250 OK\r\n")
            elif command == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                self.messages += 1
                break
            else:
                writer.write(b"250 OK\r\n")
            await writer.drain()
        writer.close()


async def test_retry_after_success_sends_nothing(store: Store) -> None:
    handler = AcceptingHandler()
    activities = channel(store)
    with smtp_server(handler) as url:
        first = await send(make_input(url), activities)
        second = await send(make_input(url), activities)

    assert len(handler.envelopes) == 1
    assert first.status == StepStatus.SENT
    assert second.status == StepStatus.SENT
    assert second.detail == first.detail
    assert states(store) == ["sent"]


async def test_lost_reply_is_uncertain_and_not_resent(store: Store) -> None:
    server = HangUpAfterData()
    activities = channel(store)
    async with raw_tcp_server(server) as url:
        first = await send(make_input(url), activities)
        second = await send(make_input(url), activities)

    assert server.messages == 1
    # The retry reads the ledger and does not even connect.
    assert server.connections == 1
    assert first.status == StepStatus.SENT
    assert first.reason == DELIVERY_UNCERTAIN_REASON
    assert "may have accepted it" in (first.detail or "")
    assert second.reason == DELIVERY_UNCERTAIN_REASON
    assert states(store) == ["uncertain"]


async def test_deferred_data_is_sent_on_retry(store: Store) -> None:
    handler = DeferOnceHandler()
    activities = channel(store)
    with smtp_server(handler) as url:
        with pytest.raises(ApplicationError) as deferred:
            await send(make_input(url), activities)
        assert states(store) == []
        retried = await send(make_input(url), activities)

    assert deferred.value.type == TRANSIENT_ERROR_TYPE
    assert retried.status == StepStatus.SENT
    assert retried.reason is None
    assert len(handler.envelopes) == 1
    assert states(store) == ["sent"]


async def test_attempt_that_died_in_data_is_not_resent(store: Store) -> None:
    handler = AcceptingHandler()
    input = make_input("smtp://127.0.0.1:1")
    key = await claimed_key(store, input.workflow_id, "dead-attempt")
    store.move_send(key, "dead-attempt", "claimed", "sending")
    with smtp_server(handler) as url:
        outcome = await send(make_input(url), channel(store))

    assert handler.envelopes == []
    assert outcome.status == StepStatus.SENT
    assert outcome.reason == DELIVERY_UNCERTAIN_REASON
    assert "earlier attempt stopped" in (outcome.detail or "")
    assert states(store) == ["uncertain"]


async def test_attempt_that_died_before_data_is_taken_over(store: Store) -> None:
    handler = AcceptingHandler()
    input = make_input("smtp://127.0.0.1:1")
    await claimed_key(store, input.workflow_id, "dead-attempt")
    with smtp_server(handler) as url:
        outcome = await send(make_input(url), channel(store))

    assert len(handler.envelopes) == 1
    assert outcome.status == StepStatus.SENT
    assert outcome.reason is None
    assert states(store) == ["sent"]


async def test_unreachable_ledger_sends_nothing(store: Store, tmp_path: Path) -> None:
    handler = AcceptingHandler()
    store.close()
    broken = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    broken.engine.dispose()
    (tmp_path / "ledger.db").unlink()
    (tmp_path / "ledger.db").mkdir()  # a folder where the database file should be
    with smtp_server(handler) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url), channel(broken))

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert "send ledger" in raised.value.message
    assert handler.envelopes == []


def test_claim_taken_over_cannot_start_data(store: Store) -> None:
    store.claim_send("<key@example.org>", "wf", 1, "first")
    second = store.claim_send("<key@example.org>", "wf", 1, "second")

    assert second.attempt == "second"
    assert not store.move_send("<key@example.org>", "first", "claimed", "sending")
    assert store.move_send("<key@example.org>", "second", "claimed", "sending")
    # Once DATA started, the send belongs to that attempt for good.
    assert store.claim_send("<key@example.org>", "wf", 1, "third").attempt == "second"


async def claimed_key(store: Store, workflow_id: str, attempt: str) -> str:
    """Claim the send of the test's step for `attempt`, as an attempt that then died would."""
    key = message_id_for(CAMPAIGN_ID, LEAD_EMAIL, 1, SENDER_EMAIL)
    entry = await StoreSendLedger(store).claim(key, workflow_id, 1, attempt)
    assert entry == LedgerEntry(state="claimed", attempt=attempt, detail=None)
    return key


def test_sends_command_lists_uncertain(tmp_path: Path) -> None:
    home = tmp_path / "home"
    service = Sequencer(load_settings({"SEQUENCER_HOME": str(home)}))
    try:
        lead = Lead(email=LEAD_EMAIL)
        workflow_id = workflow_id_for(CAMPAIGN_ID, lead.key)
        service.store.add_enrollment(workflow_id, CAMPAIGN_ID, lead)
        service.store.claim_send("<1@example.org>", workflow_id, 1, "a")
        service.store.move_send("<1@example.org>", "a", "claimed", "sent", "<1@example.org>")
        service.store.claim_send("<2@example.org>", workflow_id, 2, "b")
        service.store.move_send("<2@example.org>", "b", "claimed", "sending")
        service.store.move_send("<2@example.org>", "b", "sending", "uncertain", "reply lost")
    finally:
        service.close()
    environment = {**os.environ, "SEQUENCER_HOME": str(home)}
    environment.pop("DATABASE_URL", None)

    listed = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "sends", "--uncertain", "--json"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )

    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["campaign"], row["lead"], row["step"]) for row in rows] == [
        (CAMPAIGN_ID, LEAD_EMAIL, 2)
    ]
    assert rows[0]["detail"] == "reply lost"
