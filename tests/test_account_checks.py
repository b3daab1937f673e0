"""Account health checks against real servers on free 127.0.0.1 ports, and the sink's outages.

Email checks run against a real `SmtpSink`, or a small aiosmtpd server of their own that
records the commands it receives. LinkedIn checks run against the real sandbox, and against a
small FastAPI provider for replies the sandbox never sends (503, an unknown status, no endpoint).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.accounts import (
    AccountActivities,
    AccountCheck,
    AccountCheckInput,
    check_email_account,
    check_linkedin_account,
)
from activities.email import EmailActivities
from sequencer.campaign import EmailStep, Sender
from sequencer.channels import StepStatus
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE
from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.models import Lead, StepInput, workflow_id_for
from sequencer.smtp_sink import OUTAGE_REPLY, SmtpSink, read_mailbox

SENDER_EMAIL = "rep@acme.test"
OUTAGE_SENDER_EMAIL = "outage-rep@acme.test"
API_KEY = "provider-key"
# Generous limits for a loaded machine. The tests wait with deadlines instead of asserting
# how long something took.
CHECK_TIMEOUT = 5.0
RECOVERY_DEADLINE = 15.0
SHORT_TIMEOUT = 0.5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def check(
    email: str,
    smtp_url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float = CHECK_TIMEOUT,
) -> AccountCheck:
    sender = Sender(email=email, smtp_url=smtp_url)
    return await check_email_account(sender, username=username, password=password, timeout=timeout)


async def wait_until_ok(run_check: Callable[[], Awaitable[AccountCheck]]) -> list[AccountCheck]:
    """Run the check until it passes and return every result, or fail the test after the
    deadline."""
    results: list[AccountCheck] = []
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while time.monotonic() < deadline:
        results.append(await run_check())
        if results[-1].ok:
            return results
        await asyncio.sleep(0.05)
    pytest.fail(f"the check did not pass within {RECOVERY_DEADLINE} s, last: {results[-1]}")


@pytest.fixture
def mailbox(tmp_path: Path) -> Path:
    return tmp_path / "mailbox"


@pytest.fixture
def sink(mailbox: Path) -> Iterator[SmtpSink]:
    with SmtpSink(mailbox, port=0, outage_seconds=60.0) as server:
        yield server


# Email checks against the sink


async def test_normal_sender_passes(sink: SmtpSink, mailbox: Path) -> None:
    result = await check(SENDER_EMAIL, sink.smtp_url)

    assert result.ok
    assert f"127.0.0.1:{sink.port}" in result.detail
    assert read_mailbox(mailbox) == []


async def test_outage_sender_rejected_during_window(sink: SmtpSink, mailbox: Path) -> None:
    results = [await check(OUTAGE_SENDER_EMAIL, sink.smtp_url) for _ in range(3)]

    for result in results:
        assert not result.ok
        assert OUTAGE_REPLY in result.detail
        assert f"127.0.0.1:{sink.port}" in result.detail
        assert "check the SMTP username and password" in result.detail
        assert "\n" not in result.detail
    other = await check(SENDER_EMAIL, sink.smtp_url)
    assert other.ok
    assert read_mailbox(mailbox) == []


async def test_outage_sender_accepted_after_window(mailbox: Path) -> None:
    with SmtpSink(mailbox, port=0, outage_seconds=0.5) as sink:
        first = await check(OUTAGE_SENDER_EMAIL, sink.smtp_url)
        results = await wait_until_ok(lambda: check(OUTAGE_SENDER_EMAIL, sink.smtp_url))
        later = [await check(OUTAGE_SENDER_EMAIL, sink.smtp_url) for _ in range(3)]

    assert not first.ok
    assert OUTAGE_REPLY in first.detail
    assert results[-1].ok
    assert all(result.ok for result in later)


async def test_zero_outage_seconds_disables_outage(mailbox: Path) -> None:
    with SmtpSink(mailbox, port=0, outage_seconds=0) as sink:
        result = await check(OUTAGE_SENDER_EMAIL, sink.smtp_url)

    assert result.ok


async def test_start_and_end_outage(sink: SmtpSink) -> None:
    sink.start_outage("Rep@ACME.test", 60)

    during = await check(SENDER_EMAIL, sink.smtp_url)
    other = await check("someone-else@acme.test", sink.smtp_url)
    sink.end_outage(SENDER_EMAIL)
    after = await check(SENDER_EMAIL, sink.smtp_url)

    assert not during.ok
    assert OUTAGE_REPLY in during.detail
    assert other.ok
    assert after.ok


async def test_start_outage_expires(sink: SmtpSink) -> None:
    sink.start_outage(SENDER_EMAIL, 2.0)

    during = await check(SENDER_EMAIL, sink.smtp_url)
    results = await wait_until_ok(lambda: check(SENDER_EMAIL, sink.smtp_url))

    assert not during.ok
    assert results[-1].ok


async def test_end_outage_prevents_automatic_outage(sink: SmtpSink) -> None:
    sink.end_outage(OUTAGE_SENDER_EMAIL)

    result = await check(OUTAGE_SENDER_EMAIL, sink.smtp_url)

    assert result.ok


async def test_start_outage_before_sink_starts(mailbox: Path) -> None:
    sink = SmtpSink(mailbox, port=0)
    sink.start_outage(SENDER_EMAIL, 60)

    with sink:
        result = await check(SENDER_EMAIL, sink.smtp_url)

    assert not result.ok
    assert OUTAGE_REPLY in result.detail


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf")])
def test_start_outage_rejects_invalid_length(sink: SmtpSink, seconds: float) -> None:
    with pytest.raises(ValueError, match="invalid outage length"):
        sink.start_outage(SENDER_EMAIL, seconds)


@pytest.mark.parametrize("seconds", [-1, float("nan")])
def test_sink_rejects_invalid_outage_seconds(mailbox: Path, seconds: float) -> None:
    with pytest.raises(ValueError, match="invalid outage_seconds"):
        SmtpSink(mailbox, port=0, outage_seconds=seconds)


async def test_non_ascii_sender_uses_smtputf8(sink: SmtpSink) -> None:
    result = await check("josé@acme.test", sink.smtp_url)

    assert result.ok


# send_email during an outage


def make_step_input(smtp_url: str) -> StepInput:
    lead = Lead(email="ann@example.com", first_name="Ann")
    return StepInput(
        campaign_id="outage-demo",
        workflow_id=workflow_id_for("outage-demo", lead.key),
        step_number=1,
        step=EmailStep(subject="Hello {{first_name}}", body="Hi {{first_name}}"),
        lead=lead,
        sender=Sender(email=OUTAGE_SENDER_EMAIL, smtp_url=smtp_url),
        earlier_email_steps=[],
    )


async def is_never_suppressed(address: str) -> bool:
    return False


async def test_send_email_outage_interrupts_account(sink: SmtpSink, mailbox: Path) -> None:
    activities = EmailActivities(is_suppressed=is_never_suppressed)
    input = make_step_input(sink.smtp_url)

    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(activities.send_email, input)
    sink.end_outage(OUTAGE_SENDER_EMAIL)
    outcome = await ActivityEnvironment().run(activities.send_email, input)

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert raised.value.non_retryable
    assert OUTAGE_REPLY in raised.value.message
    # A credentials reply points at the credentials, not at the sender's address.
    assert "Check the SMTP username and password of the sender" in raised.value.message
    assert outcome.status == StepStatus.SENT
    assert len(read_mailbox(mailbox)) == 1


# Email checks against failing or scripted servers


async def test_closed_port_names_host_and_port(mailbox: Path) -> None:
    stopped = SmtpSink(mailbox, port=0)
    stopped.start()
    stopped.stop()

    result = await check(SENDER_EMAIL, stopped.smtp_url)

    assert not result.ok
    assert f"127.0.0.1:{stopped.port}" in result.detail
    assert "refused the connection" in result.detail


@asynccontextmanager
async def silent_tcp_server() -> AsyncIterator[int]:
    """Accept connections and never send a byte, like a server that hangs."""

    async def stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(stay_silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_silent_server_times_out() -> None:
    async with silent_tcp_server() as port:
        result = await check(SENDER_EMAIL, f"smtp://127.0.0.1:{port}", timeout=SHORT_TIMEOUT)

    assert not result.ok
    assert f"127.0.0.1:{port}" in result.detail
    assert "did not respond within 0.5 seconds" in result.detail


async def test_smtps_to_plain_server_fails_tls(sink: SmtpSink) -> None:
    result = await check(SENDER_EMAIL, f"smtps://127.0.0.1:{sink.port}")

    assert not result.ok
    assert f"TLS with SMTP server 127.0.0.1:{sink.port} failed" in result.detail


async def test_invalid_smtp_url_port() -> None:
    result = await check(SENDER_EMAIL, "smtp://127.0.0.1:not-a-port")

    assert not result.ok
    assert "the port is not a number" in result.detail
    assert "smtp_url" in result.detail


async def test_credentials_without_server_auth(sink: SmtpSink) -> None:
    result = await check(SENDER_EMAIL, sink.smtp_url, username="rep", password="secret")

    assert not result.ok
    assert "AUTH" in result.detail
    assert "secret" not in result.detail


class RecordingHandler:
    """Record the SMTP commands of each session, and reply to MAIL FROM with `mail_reply`."""

    def __init__(self, mail_reply: str = "250 OK") -> None:
        self.commands: list[str] = []
        self.mail_reply = mail_reply

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        self.commands.append("AUTH")
        accepted = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"rep",
            b"right-password",
        )
        return AuthResult(success=accepted, handled=False)

    async def handle_EHLO(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.commands.append("EHLO")
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.commands.append(f"MAIL FROM:<{address}>")
        if self.mail_reply.startswith("250"):
            envelope.mail_from = address
        return self.mail_reply

    async def handle_RCPT(self, *args: Any) -> str:
        self.commands.append("RCPT")
        return "250 OK"

    async def handle_DATA(self, *args: Any) -> str:
        self.commands.append("DATA")
        return "250 OK"

    async def handle_RSET(self, *args: Any) -> str:
        self.commands.append("RSET")
        return "250 OK"

    async def handle_QUIT(self, *args: Any) -> str:
        self.commands.append("QUIT")
        return "221 Bye"


@contextmanager
def recording_server(handler: RecordingHandler) -> Iterator[str]:
    """Run an aiosmtpd server with AUTH over plain SMTP on a free port, and yield its URL."""
    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        auth_require_tls=False,
        authenticator=handler.authenticate,
    )
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


async def test_check_sends_no_message() -> None:
    handler = RecordingHandler()
    with recording_server(handler) as url:
        result = await check(SENDER_EMAIL, url, username="rep", password="right-password")

    assert result.ok
    assert handler.commands == ["EHLO", "AUTH", f"MAIL FROM:<{SENDER_EMAIL}>", "RSET", "QUIT"]


async def test_check_without_credentials_skips_auth() -> None:
    handler = RecordingHandler()
    with recording_server(handler) as url:
        result = await check(SENDER_EMAIL, url)

    assert result.ok
    assert handler.commands == ["EHLO", f"MAIL FROM:<{SENDER_EMAIL}>", "RSET", "QUIT"]


async def test_wrong_password_fails_login() -> None:
    handler = RecordingHandler()
    with recording_server(handler) as url:
        result = await check(SENDER_EMAIL, url, username="rep", password="wrong-password")

    assert not result.ok
    assert "rejected the login: 535" in result.detail
    assert "SEQUENCER_SMTP_PASSWORD" in result.detail
    assert "wrong-password" not in result.detail
    assert "AUTH" in handler.commands
    assert not any(command.startswith("MAIL") for command in handler.commands)


@pytest.mark.parametrize(
    ("reply", "hint"),
    [
        pytest.param(
            "553 5.7.1 <rep@acme.test>: Sender address rejected: not owned by user",
            "check that the sender's email address belongs to the account",
            id="permanent",
        ),
        pytest.param(
            "451 4.3.0 Temporary local problem, try again later",
            "a later check shows",
            id="temporary",
        ),
        pytest.param(
            "550 5.7.1 Service unavailable, client host blocked using Spamhaus",
            "check the sending IP and domain against public blocklists",
            id="blocklisted",
        ),
    ],
)
async def test_mail_from_rejection_fails(reply: str, hint: str) -> None:
    handler = RecordingHandler(mail_reply=reply)
    with recording_server(handler) as url:
        result = await check(SENDER_EMAIL, url)

    assert not result.ok
    assert reply in result.detail
    assert hint in result.detail
    assert handler.commands == ["EHLO", f"MAIL FROM:<{SENDER_EMAIL}>", "RSET", "QUIT"]


async def test_check_rejects_password_without_username() -> None:
    sender = Sender(email=SENDER_EMAIL)

    with pytest.raises(ValueError, match="password was given without an SMTP username"):
        await check_email_account(sender, username=None, password="secret")


# LinkedIn checks against the sandbox


@pytest.fixture
def sandbox() -> Iterator[LinkedInSandbox]:
    server = LinkedInSandbox(port=0, api_key=API_KEY)
    if not any(getattr(route, "path", None) == "/v1/account" for route in server.app.routes):
        pytest.skip("sequencer.linkedin_sandbox does not serve GET /v1/account")
    with server:
        yield server


async def test_linkedin_connected(sandbox: LinkedInSandbox) -> None:
    result = await check_linkedin_account(sandbox.base_url + "/", API_KEY, timeout=CHECK_TIMEOUT)

    assert result.ok
    assert "connected" in result.detail


async def test_linkedin_session_expired_then_reconnected(sandbox: LinkedInSandbox) -> None:
    sandbox.expire_session()
    expired = await check_linkedin_account(sandbox.base_url, API_KEY, timeout=CHECK_TIMEOUT)
    sandbox.expire_session(False)
    reconnected = await check_linkedin_account(sandbox.base_url, API_KEY, timeout=CHECK_TIMEOUT)

    assert not expired.ok
    assert "HTTP 401 (session_expired: " in expired.detail
    assert "Reconnect the LinkedIn account at the provider" in expired.detail
    assert "\n" not in expired.detail
    assert reconnected.ok


async def test_linkedin_wrong_key(sandbox: LinkedInSandbox) -> None:
    result = await check_linkedin_account(sandbox.base_url, "wrong-key", timeout=CHECK_TIMEOUT)

    assert not result.ok
    assert "HTTP 401 (unauthorized: " in result.detail
    assert "wrong-key" not in result.detail


async def test_linkedin_client_passed_in_stays_open(sandbox: LinkedInSandbox) -> None:
    async with httpx.AsyncClient() as client:
        first = await check_linkedin_account(sandbox.base_url, API_KEY, client, CHECK_TIMEOUT)
        second = await check_linkedin_account(sandbox.base_url, API_KEY, client, CHECK_TIMEOUT)

        assert not client.is_closed
    assert first.ok
    assert second.ok


# LinkedIn checks against a small provider, for replies the sandbox never sends


class FakeProvider:
    """A provider whose GET /v1/account returns `status`, or an HTTP error for the names
    "expired" and "unavailable", and records every request."""

    def __init__(self) -> None:
        self.status = "connected"
        self.requests: list[tuple[str, str, str]] = []
        self.app = FastAPI()
        self.app.add_api_route("/v1/account", self.account, methods=["GET"])

    async def account(self, request: Request) -> JSONResponse:
        authorization = request.headers.get("authorization", "")
        self.requests.append((request.method, request.url.path, authorization))
        if authorization != f"Bearer {API_KEY}":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if self.status == "expired":
            return JSONResponse(
                {"error": "session_expired", "detail": "log in to LinkedIn again"},
                status_code=401,
            )
        if self.status == "unavailable":
            return JSONResponse({"error": "service_unavailable"}, status_code=503)
        return JSONResponse({"status": self.status})


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port, and yield its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it started serving"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def provider_url(provider: FakeProvider) -> Iterator[str]:
    with serve(provider.app) as url:
        yield url


async def test_linkedin_request_sends_bearer_key(provider: FakeProvider, provider_url: str) -> None:
    result = await check_linkedin_account(provider_url, API_KEY, timeout=CHECK_TIMEOUT)

    assert result.ok
    assert provider.requests == [("GET", "/v1/account", f"Bearer {API_KEY}")]


async def test_linkedin_session_expired_reply(provider: FakeProvider, provider_url: str) -> None:
    provider.status = "expired"

    result = await check_linkedin_account(provider_url, API_KEY, timeout=CHECK_TIMEOUT)

    assert not result.ok
    assert "HTTP 401 (session_expired: log in to LinkedIn again)" in result.detail
    assert "Reconnect the LinkedIn account" in result.detail


async def test_linkedin_unavailable(provider: FakeProvider, provider_url: str) -> None:
    provider.status = "unavailable"

    result = await check_linkedin_account(provider_url, API_KEY, timeout=CHECK_TIMEOUT)

    assert not result.ok
    assert "HTTP 503 (service_unavailable)" in result.detail
    assert "A later check may pass" in result.detail


async def test_linkedin_disconnected_status(provider: FakeProvider, provider_url: str) -> None:
    provider.status = "disconnected"

    result = await check_linkedin_account(provider_url, API_KEY, timeout=CHECK_TIMEOUT)

    assert not result.ok
    assert "'disconnected'" in result.detail


async def test_linkedin_missing_endpoint() -> None:
    with serve(FastAPI()) as url:
        result = await check_linkedin_account(url, API_KEY, timeout=CHECK_TIMEOUT)

    assert not result.ok
    assert "unexpected HTTP 404" in result.detail
    assert "GET /v1/account" in result.detail


async def test_linkedin_closed_port() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = await check_linkedin_account(url, API_KEY, timeout=CHECK_TIMEOUT)

    assert not result.ok
    assert f"the request to the LinkedIn provider at {url} failed" in result.detail
    assert "ConnectError" in result.detail


async def test_linkedin_silent_provider_times_out() -> None:
    async with silent_tcp_server() as port:
        result = await check_linkedin_account(
            f"http://127.0.0.1:{port}", API_KEY, timeout=SHORT_TIMEOUT
        )

    assert not result.ok
    assert "did not respond within 0.5 seconds" in result.detail


# The check_account activity


async def test_activity_checks_both_channels(sink: SmtpSink, sandbox: LinkedInSandbox) -> None:
    activities = AccountActivities(
        linkedin_url=sandbox.base_url, linkedin_api_key=API_KEY, timeout=CHECK_TIMEOUT
    )
    environment = ActivityEnvironment()
    email_input = AccountCheckInput(
        channel="email", sender=Sender(email=OUTAGE_SENDER_EMAIL, smtp_url=sink.smtp_url)
    )
    try:
        email = await environment.run(activities.check_account, email_input)
        sandbox.expire_session()
        linkedin = await environment.run(
            activities.check_account, AccountCheckInput(channel="linkedin")
        )
    finally:
        await activities.aclose()

    assert not email.ok
    assert OUTAGE_REPLY in email.detail
    assert not linkedin.ok
    assert "session_expired" in linkedin.detail


async def test_activity_without_linkedin_provider() -> None:
    activities = AccountActivities()

    result = await ActivityEnvironment().run(
        activities.check_account, AccountCheckInput(channel="linkedin")
    )

    assert not result.ok
    assert "SEQUENCER_LINKEDIN_URL" in result.detail


def test_email_check_input_needs_sender() -> None:
    with pytest.raises(ValidationError, match="needs the sender"):
        AccountCheckInput(channel="email")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"smtp_password": "secret"}, "without an SMTP username"),
        ({"timeout": 0}, "invalid check timeout"),
        ({"linkedin_url": "ftp://provider"}, "invalid LinkedIn provider URL"),
        ({"linkedin_url": "http://127.0.0.1:8765"}, "API key is empty"),
    ],
)
def test_activities_reject_invalid_settings(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccountActivities(**options)
