"""The email activity against SMTP servers on free 127.0.0.1 ports, and the SMTP sink itself.

Most tests send through a real `SmtpSink`. Tests of server replies the sink never sends
(greylisting, blocklisting, login failures) start a small aiosmtpd server of their own.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.email import (
    BOUNCE_REASON,
    INVALID_EMAIL_ADDRESS_REASON,
    NO_SENDER_REASON,
    UNSUPPORTED_ADDRESS_REASON,
    EmailActivities,
    message_id_for,
)
from sequencer.campaign import EmailStep, LinkedInVisitStep, Sender
from sequencer.channels import Reason, StepStatus
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE, TRANSIENT_ERROR_TYPE
from sequencer.models import Lead, StepInput, lead_ref, workflow_id_for
from sequencer.smtp_sink import SmtpSink, read_mailbox

CAMPAIGN_ID = "spring-outreach"
SENDER_EMAIL = "sales@example.org"
LEAD_EMAIL = "ann@example.com"
STEP = EmailStep(
    subject="Hello {{first_name}}",
    body="Hi {{first_name}},\n\nhow is {{company}} doing?\n\n{{sign_off|Best}}\nSam\n",
)


class SuppressionList:
    """An in-memory suppression list that records every address it is asked about."""

    def __init__(self, addresses: set[str] | None = None) -> None:
        self.addresses = addresses or set()
        self.checked: list[str] = []

    async def __call__(self, address: str) -> bool:
        self.checked.append(address)
        return address in self.addresses


def make_input(
    smtp_url: str | None,
    *,
    lead: Lead | None = None,
    step: Any = STEP,
    step_number: int = 1,
    earlier_email_steps: list[int] | None = None,
) -> StepInput:
    lead = lead or Lead(email=LEAD_EMAIL, first_name="Ann", last_name="Lee", company="Acme")
    sender = Sender(email=SENDER_EMAIL, name="Sam Sales", smtp_url=smtp_url) if smtp_url else None
    return StepInput(
        campaign_id=CAMPAIGN_ID,
        workflow_id=workflow_id_for(CAMPAIGN_ID, lead.key),
        step_number=step_number,
        step=step,
        lead=lead,
        sender=sender,
        earlier_email_steps=earlier_email_steps or [],
    )


async def send(input: StepInput, activities: EmailActivities | None = None) -> Any:
    activities = activities or EmailActivities(is_suppressed=SuppressionList())
    return await ActivityEnvironment().run(activities.send_email, input)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def smtp_server(handler: object, **smtp_options: Any) -> Iterator[str]:
    """Run an aiosmtpd server with `handler` on a free port and yield its smtp:// URL."""
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **smtp_options)
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


@asynccontextmanager
async def raw_tcp_server(on_connect: Any) -> AsyncIterator[str]:
    """Run a bare TCP server on a free port, for servers that misbehave below SMTP."""
    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"smtp://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


class RejectingRecipientHandler:
    """Reject every recipient with a fixed reply."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        return self.reply


class RejectingDataHandler:
    """Accept recipients, then reject the message after DATA with a fixed reply."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        return self.reply


class AcceptingHandler:
    """Keep the envelopes of accepted messages in memory."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


def password_checker(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    accepted = isinstance(data, LoginPassword) and (data.login, data.password) == (
        b"sales",
        b"right-password",
    )
    # handled=False makes aiosmtpd send the 235 or 535 reply itself.
    return AuthResult(success=accepted, handled=False)


@pytest.fixture
def mailbox(tmp_path: Path) -> Path:
    return tmp_path / "mailbox"


@pytest.fixture
def sink(mailbox: Path) -> Iterator[SmtpSink]:
    server = SmtpSink(mailbox, port=0)
    server.start()
    yield server
    server.stop()


# Sending through the sink


async def test_send_delivers_rendered_message(sink: SmtpSink, mailbox: Path) -> None:
    outcome = await send(make_input(sink.smtp_url))

    expected_id = message_id_for(CAMPAIGN_ID, LEAD_EMAIL, 1, SENDER_EMAIL)
    assert outcome.status == StepStatus.SENT
    assert outcome.detail == expected_id
    messages = read_mailbox(mailbox)
    assert len(messages) == 1
    message = messages[0]
    assert message["From"] == "Sam Sales <sales@example.org>"
    assert message["To"] == "Ann Lee <ann@example.com>"
    assert message["Subject"] == "Hello Ann"
    assert message["Message-ID"] == expected_id
    assert message["Date"] is not None
    assert message["X-Sequencer-Ref"] == f"{CAMPAIGN_ID}/{lead_ref(LEAD_EMAIL)}/1"
    assert message["In-Reply-To"] is None
    assert message["References"] is None
    assert message["Delivered-To"] == LEAD_EMAIL
    assert message["Return-Path"] == f"<{SENDER_EMAIL}>"
    body = message.get_content()
    assert body == "Hi Ann,\n\nhow is Acme doing?\n\nBest\nSam\n"
    assert "{{" not in body


async def test_follow_up_threads_under_earlier_steps(sink: SmtpSink, mailbox: Path) -> None:
    outcome = await send(make_input(sink.smtp_url, step_number=3, earlier_email_steps=[1, 2]))

    assert outcome.status == StepStatus.SENT
    first = message_id_for(CAMPAIGN_ID, LEAD_EMAIL, 1, SENDER_EMAIL)
    second = message_id_for(CAMPAIGN_ID, LEAD_EMAIL, 2, SENDER_EMAIL)
    (message,) = read_mailbox(mailbox)
    assert message["Message-ID"] == message_id_for(CAMPAIGN_ID, LEAD_EMAIL, 3, SENDER_EMAIL)
    assert message["In-Reply-To"] == second
    assert message["References"] == f"{first} {second}"


async def test_bounce_prefix_returns_bounced(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(email="bounce-ann@example.com", first_name="Ann", company="Acme")

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.BOUNCED
    assert outcome.reason == BOUNCE_REASON
    assert outcome.detail == (
        "550 5.1.1 <bounce-ann@example.com>: Recipient address rejected: User unknown"
    )
    assert read_mailbox(mailbox) == []


async def test_late_bounce_address_accepted(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(email="late-bounce-ann@example.com", first_name="Ann", company="Acme")

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.SENT
    assert len(read_mailbox(mailbox)) == 1


async def test_suppressed_address_skipped(sink: SmtpSink, mailbox: Path) -> None:
    suppression = SuppressionList({LEAD_EMAIL})
    lead = Lead(email=" Ann@Example.COM ", first_name="Ann", company="Acme")

    outcome = await send(
        make_input(sink.smtp_url, lead=lead), EmailActivities(is_suppressed=suppression)
    )

    assert outcome.status == StepStatus.SKIPPED
    assert outcome.reason == Reason.UNSUBSCRIBED
    assert suppression.checked == [LEAD_EMAIL]
    assert read_mailbox(mailbox) == []


async def test_missing_subject_variable_fails(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(email=LEAD_EMAIL, company="Acme")

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == Reason.MISSING_VARIABLE
    assert "first_name" in outcome.detail
    assert "subject" in outcome.detail
    assert read_mailbox(mailbox) == []


async def test_missing_body_variable_fails(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(email=LEAD_EMAIL, first_name="Ann")

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == Reason.MISSING_VARIABLE
    assert "company" in outcome.detail
    assert "body" in outcome.detail
    assert read_mailbox(mailbox) == []


async def test_lead_without_email_fails(sink: SmtpSink, mailbox: Path) -> None:
    suppression = SuppressionList()
    lead = Lead(linkedin_url="https://www.linkedin.com/in/ann-lee", first_name="Ann")

    outcome = await send(
        make_input(sink.smtp_url, lead=lead), EmailActivities(is_suppressed=suppression)
    )

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == Reason.NO_EMAIL_ADDRESS
    assert suppression.checked == []
    assert read_mailbox(mailbox) == []


async def test_invalid_email_fails(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(email="ann at example.com", first_name="Ann", company="Acme")

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == INVALID_EMAIL_ADDRESS_REASON
    assert read_mailbox(mailbox) == []


async def test_missing_sender_fails(mailbox: Path) -> None:
    outcome = await send(make_input(None))

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == NO_SENDER_REASON
    assert "the campaign has no sender" in outcome.detail


async def test_idn_domain_uses_a_label_envelope(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(email="jan@müller-bau.de", first_name="Jan", company="Müller Bau")

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.SENT
    (message,) = read_mailbox(mailbox)
    assert message["Delivered-To"] == "jan@xn--mller-bau-q9a.de"
    assert "jan@xn--mller-bau-q9a.de" in message["To"]
    assert "how is Müller Bau doing?" in message.get_content()


async def test_non_ascii_local_part_uses_smtputf8(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(email="jürgen@example.com", first_name="Jürgen", company="Acme")

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.SENT
    (message,) = read_mailbox(mailbox)
    assert message["Delivered-To"] == "jürgen@example.com"
    assert message["Subject"] == "Hello Jürgen"


async def test_non_ascii_local_part_without_smtputf8_fails() -> None:
    handler = AcceptingHandler()
    lead = Lead(email="jürgen@example.com", first_name="Jürgen", company="Acme")
    with smtp_server(handler, enable_SMTPUTF8=False) as url:
        outcome = await send(make_input(url, lead=lead))

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == UNSUPPORTED_ADDRESS_REASON
    assert "SMTPUTF8" in outcome.detail
    assert handler.envelopes == []


async def test_line_breaks_in_variables_add_no_headers(sink: SmtpSink, mailbox: Path) -> None:
    lead = Lead(
        email=LEAD_EMAIL,
        first_name="Ann\r\nBcc: victim@example.net",
        last_name="Lee\nX-Injected: yes",
        company="Acme",
    )

    outcome = await send(make_input(sink.smtp_url, lead=lead))

    assert outcome.status == StepStatus.SENT
    (message,) = read_mailbox(mailbox)
    assert message["Bcc"] is None
    assert message["X-Injected"] is None
    assert message["Subject"] == "Hello Ann Bcc: victim@example.net"
    assert message["To"].addresses[0].addr_spec == LEAD_EMAIL


async def test_non_email_step_rejected(sink: SmtpSink) -> None:
    with pytest.raises(ApplicationError) as raised:
        await send(make_input(sink.smtp_url, step=LinkedInVisitStep()))

    assert raised.value.non_retryable


# Servers that fail


async def test_closed_port_interrupts_account(mailbox: Path) -> None:
    stopped = SmtpSink(mailbox, port=0)
    stopped.start()
    stopped.stop()

    with pytest.raises(ApplicationError) as raised:
        await send(make_input(stopped.smtp_url))

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert raised.value.non_retryable
    assert f"127.0.0.1:{stopped.port}" in raised.value.message
    assert "refused" in raised.value.message


async def test_greylisting_is_transient() -> None:
    with smtp_server(RejectingRecipientHandler("451 4.7.1 Greylisted")) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url))

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert not raised.value.non_retryable
    assert "451 4.7.1 Greylisted" in raised.value.message


async def test_mailbox_full_is_transient() -> None:
    reply = "552 5.2.2 <ann@example.com> Quota exceeded (mailbox for user is full)"
    with smtp_server(RejectingRecipientHandler(reply)) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url))

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert not raised.value.non_retryable
    assert LEAD_EMAIL not in raised.value.message


async def test_blocklisted_sender_interrupts_account() -> None:
    with smtp_server(RejectingRecipientHandler("550 5.7.1 IP address blacklisted")) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url))

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert raised.value.non_retryable
    assert "blocklist" in raised.value.message


async def test_data_rejected_hard_bounces() -> None:
    with smtp_server(RejectingDataHandler("550 5.1.1 User unknown")) as url:
        outcome = await send(make_input(url))

    assert outcome.status == StepStatus.BOUNCED
    assert outcome.reason == BOUNCE_REASON
    assert outcome.detail == "550 5.1.1 User unknown"


async def test_data_rejected_as_spam_interrupts_account() -> None:
    with smtp_server(RejectingDataHandler("554 5.7.0 Reject, id=20025-09 - SPAM")) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url))

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert raised.value.non_retryable


async def test_wrong_password_interrupts_account() -> None:
    options = {"auth_require_tls": False, "authenticator": password_checker}
    activities = EmailActivities(
        is_suppressed=SuppressionList(), smtp_username="sales", smtp_password="wrong"
    )
    with smtp_server(AcceptingHandler(), **options) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url), activities)

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert raised.value.non_retryable
    assert "535" in raised.value.message
    assert "wrong" not in raised.value.message


async def test_right_password_sends() -> None:
    handler = AcceptingHandler()
    options = {"auth_require_tls": False, "authenticator": password_checker}
    activities = EmailActivities(
        is_suppressed=SuppressionList(), smtp_username="sales", smtp_password="right-password"
    )
    with smtp_server(handler, **options) as url:
        outcome = await send(make_input(url), activities)

    assert outcome.status == StepStatus.SENT
    assert len(handler.envelopes) == 1
    assert handler.envelopes[0].rcpt_tos == [LEAD_EMAIL]
    assert handler.envelopes[0].mail_from == SENDER_EMAIL


async def test_dropped_connection_is_transient() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with raw_tcp_server(hang_up) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url))

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert not raised.value.non_retryable


async def test_silent_server_times_out() -> None:
    async def stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    activities = EmailActivities(is_suppressed=SuppressionList(), timeout=0.5)
    async with raw_tcp_server(stay_silent) as url:
        with pytest.raises(ApplicationError) as raised:
            await send(make_input(url), activities)

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert not raised.value.non_retryable


async def test_smtps_to_plain_server_interrupts_account(sink: SmtpSink) -> None:
    with pytest.raises(ApplicationError) as raised:
        await send(make_input(f"smtps://127.0.0.1:{sink.port}"))

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert "TLS" in raised.value.message


async def test_non_numeric_port_interrupts_account() -> None:
    with pytest.raises(ApplicationError) as raised:
        await send(make_input("smtp://127.0.0.1:mail"))

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert "port" in raised.value.message


# Message-IDs and construction checks


def test_message_id_has_no_personal_data() -> None:
    message_id = message_id_for("spring-outreach", LEAD_EMAIL, 2, "sales@müller-bau.de")

    assert message_id == f"<spring-outreach.{lead_ref(LEAD_EMAIL)}.2@xn--mller-bau-q9a.de>"
    assert "ann" not in message_id


def test_password_without_username_rejected() -> None:
    with pytest.raises(ValueError, match="username"):
        EmailActivities(is_suppressed=SuppressionList(), smtp_password="secret")


def test_non_positive_timeout_rejected() -> None:
    with pytest.raises(ValueError, match="timeout"):
        EmailActivities(is_suppressed=SuppressionList(), timeout=0)


# The SMTP sink on its own


def test_sink_rejects_custom_prefixes(tmp_path: Path) -> None:
    mailbox = tmp_path / "mailbox"
    with SmtpSink(mailbox, port=0, bounce_prefixes=("nobody", "gone")) as server:
        with smtplib.SMTP("127.0.0.1", server.port) as client:
            refused = client.sendmail(
                SENDER_EMAIL,
                ["Nobody@example.com", "gone-ann@example.com", "bounce@example.com"],
                "Subject: hi\r\n\r\nhello\r\n",
            )

    assert sorted(refused) == ["Nobody@example.com", "gone-ann@example.com"]
    assert refused["gone-ann@example.com"][0] == 550
    assert [message["Delivered-To"] for message in read_mailbox(mailbox)] == ["bounce@example.com"]


def test_sink_stores_messages_in_order(sink: SmtpSink, mailbox: Path) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        for number in range(5):
            client.sendmail(
                SENDER_EMAIL,
                [LEAD_EMAIL],
                f"Message-ID: <m{number}/x@example.org>\r\nSubject: {number}\r\n\r\nbody\r\n",
            )

    assert [message["Subject"] for message in read_mailbox(mailbox)] == list("01234")
    names = sorted(path.name for path in mailbox.iterdir())
    assert all(name.endswith(".eml") for name in names)
    assert "m0_x_example.org" in names[0]


def test_sink_stores_one_file_per_recipient(sink: SmtpSink, mailbox: Path) -> None:
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        client.sendmail(
            SENDER_EMAIL, ["a@example.com", "b@example.com"], "Subject: both\r\n\r\nbody\r\n"
        )

    messages = read_mailbox(mailbox)
    assert sorted(message["Delivered-To"] for message in messages) == [
        "a@example.com",
        "b@example.com",
    ]
    assert all(message["Subject"] == "both" for message in messages)


def test_sink_port_zero_picks_free_port(mailbox: Path) -> None:
    with SmtpSink(mailbox, port=0) as server:
        assert server.port != 0
        assert server.smtp_url == f"smtp://127.0.0.1:{server.port}"


def test_sink_port_in_use_raises(sink: SmtpSink, mailbox: Path) -> None:
    second = SmtpSink(mailbox, port=sink.port)

    with pytest.raises(OSError):
        second.start()


def test_read_mailbox_missing_folder_empty(tmp_path: Path) -> None:
    assert read_mailbox(tmp_path / "nothing-here") == []
