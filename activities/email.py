"""The email channel: render an email step, send it over SMTP and map the server's reply.

Outcomes of `send_email`:

    sent        the server accepted the message; `detail` is its Message-ID
    bounced     the server rejected the recipient as a bad address (RCPT or DATA, hard reply)
    failed      the lead has no usable address, a template variable is missing, no sender
    skipped     the address is on the suppression list
    raised      TransientChannelError for most 4xx replies, full mailboxes and network errors,
                so Temporal retries with backoff. AccountInterruptedError (non-retryable) when
                the sending side is at fault: bad credentials, refused connection, blocklisted
                IP, and 4xx replies that blame the sender's reputation.

Message-IDs are derived from the campaign, the lead and the step, so a follow-up can thread
under earlier steps without storing anything, and a retried send reuses the same Message-ID.

At most one send per step: the Message-ID is also the send's idempotency key in the worker's
send ledger (`email_sends` in the database). An attempt claims the key before connecting,
marks it `sending` just before the DATA command, and `sent` once the server accepts the
message. A later attempt (a retry, or a worker that took over from one that died) checks the
ledger first: it reports a `sent` step without sending, and never sends again one that was
`sending`. A lost connection during DATA, or an attempt that died in it, leaves the outcome
unknown: the step is recorded as sent with reason `delivery_uncertain` (see
DELIVERY_UNCERTAIN_REASON), because a message sent twice cannot be taken back while a missed one
still shows in the Activity, and a bounce of it still arrives by DSN.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderDefect
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiosmtplib
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from sequencer.addresses import InvalidEmailError, ascii_email, normalize_email
from sequencer.campaign import EmailStep, Sender
from sequencer.channels import Reason, StepStatus
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE, TRANSIENT_ERROR_TYPE
from sequencer.models import Lead, StepInput, StepOutcome, lead_ref
from sequencer.smtp_replies import SmtpReplyClass, classify_smtp_reply, parse_enhanced_status
from sequencer.templates import MissingVariableError, render

logger = logging.getLogger(__name__)

# Reasons recorded with bounced and failed email steps, next to the shared `Reason` values.
BOUNCE_REASON = "bounce"
NO_SENDER_REASON = "no_sender"
INVALID_EMAIL_ADDRESS_REASON = "invalid_email_address"
UNSUPPORTED_ADDRESS_REASON = "unsupported_address"
# A sent step whose message may or may not have reached the server, and is not sent again.
DELIVERY_UNCERTAIN_REASON = "delivery_uncertain"

# Send ledger states, as stored by sequencer.storage.
SEND_CLAIMED = "claimed"
SEND_SENDING = "sending"
SEND_SENT = "sent"
SEND_UNCERTAIN = "uncertain"

# How often a running send heartbeats. The workflow's heartbeat timeout is a few times longer,
# so that an attempt on a worker that died is retried in seconds, not minutes.
HEARTBEAT_INTERVAL = 5.0

INVALID_STEP_ERROR_TYPE = "InvalidStepError"

# Ports used when smtp_url has none: implicit TLS submission (RFC 8314) and submission with
# STARTTLS (RFC 6409).
DEFAULT_SMTPS_PORT = 465
DEFAULT_SMTP_PORT = 587

# Hints for the operator, by reply subtype, appended to account-interrupted errors.
_SENDER_HINTS = {
    "blocked-blocklist": "check the sending IP and domain against public blocklists",
    "sender-reputation-deferral": "check the sending IP's reputation and lower the sending rate",
    "sender-auth-failure": "check the SPF, DKIM and DMARC records of the sender's domain",
    "sender-reverse-dns": "check the reverse DNS (PTR) record of the sending IP",
    "message-not-rfc5322": "check the campaign's templates for header or formatting problems",
    "message-too-large": "shorten the email step's body",
    "content-rejected-spam": "rewrite the email step's content, which was rejected as spam",
    "smtp-auth-failure": "check the SMTP username and password of the sender",
    "relay-denied": "check that the sender logs in and that smtp_url points to its own server",
}
_DEFAULT_SENDER_HINT = "check the sender's account and the server's reply"


def message_id_for(campaign_id: str, lead_key: str, step_number: int, sender_email: str) -> str:
    """Return the Message-ID of one email step, without personal data.

    The domain is the sender's, in A-label form, because a Message-ID must be ASCII.
    """
    domain = ascii_email(sender_email).rpartition("@")[2]
    return f"<{campaign_id}.{lead_ref(lead_key)}.{step_number}@{domain}>"


@dataclass(frozen=True)
class SmtpServer:
    """The host and port of a sender's `smtp_url`, and whether TLS starts on connect."""

    host: str
    port: int
    implicit_tls: bool

    @classmethod
    def from_url(cls, url: str) -> SmtpServer:
        """Parse `smtp://HOST[:PORT]` or `smtps://HOST[:PORT]`, raising ValueError if invalid."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(
                f"invalid SMTP URL {url!r}: expected smtp://HOST:PORT or smtps://HOST:PORT"
            )
        implicit_tls = parts.scheme == "smtps"
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"invalid SMTP URL {url!r}: the port is not a number") from None
        if port is None:
            port = DEFAULT_SMTPS_PORT if implicit_tls else DEFAULT_SMTP_PORT
        return cls(parts.hostname, port, implicit_tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def smtp_client(
    server: SmtpServer, *, username: str | None, password: str | None, timeout: float
) -> _LedgerSMTP:
    """Build an unconnected client for `server` that logs in on connect when `username` is set.

    `timeout` is the limit in seconds for connecting and for each SMTP command.
    """
    return _LedgerSMTP(
        hostname=server.host,
        port=server.port,
        use_tls=server.implicit_tls,
        # None lets aiosmtplib upgrade with STARTTLS only when the server offers it.
        start_tls=False if server.implicit_tls else None,
        username=username,
        password=password,
        timeout=timeout,
    )


def sender_hint(subtype: str, default: str = _DEFAULT_SENDER_HINT) -> str:
    """Return what the operator should check for a sender-side reply of this subtype, or
    `default` for a subtype without a hint of its own."""
    return _SENDER_HINTS.get(subtype, default)


@dataclass
class LedgerEntry:
    """A send in the ledger: its state, the attempt that owns it, and its detail."""

    state: str
    attempt: str
    detail: str | None


class SendLedger(Protocol):
    """Durable record of each email step's send, keyed by its Message-ID."""

    async def claim(self, key: str, workflow_id: str, step: int, attempt: str) -> LedgerEntry:
        """Make `attempt` the owner of a send not yet started; return the send's entry."""
        ...

    async def move(
        self, key: str, attempt: str, before: str, after: str, detail: str | None = None
    ) -> bool:
        """Move the send from `before` to `after` if `attempt` owns it; return whether it did."""
        ...

    async def release(self, key: str, attempt: str) -> None:
        """Forget a send that did not reach the server, so that a later attempt may send it."""
        ...


class _ClaimLost(Exception):
    """Another attempt took the send over before this one started DATA."""


class _LedgerSMTP(aiosmtplib.SMTP):
    """An SMTP client that calls `before_data` just before the DATA command.

    `in_doubt` is true once DATA has started and the server's final reply has not come.
    """

    before_data: Callable[[], Awaitable[None]] | None = None
    data_started = False
    data_answered = False

    @property
    def in_doubt(self) -> bool:
        return self.data_started and not self.data_answered

    async def data(self, message: str | bytes, /, **options: Any) -> aiosmtplib.SMTPResponse:
        if self.before_data is not None:
            await self.before_data()
        self.data_started = True
        try:
            response = await super().data(message, **options)
        except aiosmtplib.SMTPResponseException:
            self.data_answered = True
            raise
        self.data_answered = True
        return response


@asynccontextmanager
async def _heartbeats() -> AsyncIterator[None]:
    """Heartbeat every HEARTBEAT_INTERVAL seconds while the body runs."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


class EmailActivities:
    """The email channel's activities. The worker builds one instance with its clients."""

    def __init__(
        self,
        *,
        is_suppressed: Callable[[str], Awaitable[bool]],
        smtp_username: str | None = None,
        smtp_password: str | None = None,
        timeout: float = 30.0,
        ledger: SendLedger | None = None,
    ) -> None:
        """Set up the channel.

        `is_suppressed` receives the lead's normalized address. `timeout` is the limit in
        seconds for connecting and for each SMTP command. Without a `ledger`, nothing keeps a
        retried attempt from sending a message the server accepted before (tests only).
        """
        if smtp_password is not None and smtp_username is None:
            raise ValueError("an SMTP password was given without an SMTP username")
        if timeout <= 0:
            raise ValueError(f"invalid SMTP timeout {timeout!r}: expected a positive number")
        self._is_suppressed = is_suppressed
        self._smtp_username = smtp_username
        self._smtp_password = smtp_password
        self._timeout = timeout
        self._ledger = ledger

    @activity.defn(name="send_email")
    async def send_email(self, input: StepInput) -> StepOutcome:
        """Send one email step to one lead and return its outcome.

        Raises ApplicationError of type TransientChannelError (retryable) or
        AccountInterruptedError (non-retryable), as described in the module docstring.
        """
        step = input.step
        if not isinstance(step, EmailStep):
            raise ApplicationError(
                f"send_email received a {step.type} step (campaign {input.campaign_id}, step "
                f"{input.step_number}): the workflow must route it to its own channel",
                type=INVALID_STEP_ERROR_TYPE,
                non_retryable=True,
            )
        lead = input.lead

        if not lead.email:
            return self._finish(
                input, StepStatus.FAILED, Reason.NO_EMAIL_ADDRESS, "the lead has no email address"
            )
        try:
            address = normalize_email(lead.email)
        except InvalidEmailError as error:
            return self._finish(input, StepStatus.FAILED, INVALID_EMAIL_ADDRESS_REASON, str(error))

        if await self._is_suppressed(address):
            return self._finish(
                input, StepStatus.SKIPPED, Reason.UNSUBSCRIBED, "the address is unsubscribed"
            )

        variables = lead.template_variables()
        try:
            subject = render(step.subject, variables)
        except MissingVariableError as error:
            return self._missing_variable(input, error, "subject")
        try:
            body = render(step.body, variables)
        except MissingVariableError as error:
            return self._missing_variable(input, error, "body")

        sender = input.sender
        if sender is None:
            return self._finish(
                input,
                StepStatus.FAILED,
                NO_SENDER_REASON,
                "the campaign has no sender: add a sender with email and smtp_url to the "
                "campaign file",
            )

        recipient = ascii_email(address)
        message = build_message(input, sender, recipient, subject, body)
        return await self._send(input, sender, message, recipient)

    async def _send(
        self, input: StepInput, sender: Sender, message: EmailMessage, recipient: str
    ) -> StepOutcome:
        try:
            server = SmtpServer.from_url(sender.smtp_url)
        except ValueError as error:
            raise self._account_interrupted(
                input, f"{error}. Fix the sender's smtp_url in the campaign file"
            ) from None
        client = smtp_client(
            server,
            username=self._smtp_username,
            password=self._smtp_password,
            timeout=self._timeout,
        )
        ledger = self._ledger
        if ledger is None:
            async with _heartbeats():
                return await self._transmit(input, server, client, sender, message, recipient)

        key = str(message["Message-ID"])
        attempt = uuid.uuid4().hex
        entry = await self._ledger_call(
            input, ledger.claim(key, input.workflow_id, input.step_number, attempt)
        )
        if entry.state == SEND_SENT:
            logger.info(
                "email step already sent by an earlier attempt, not sent again: campaign %s, "
                "workflow %s, step %d",
                input.campaign_id,
                input.workflow_id,
                input.step_number,
            )
            return self._finish(input, StepStatus.SENT, None, entry.detail or key)
        if entry.state == SEND_SENDING:
            # An earlier attempt stopped in DATA: the server may have the message.
            detail = (
                f"an earlier attempt stopped while transmitting the message ({key}) to SMTP "
                f"server {server}; the server may have accepted it, so it is not sent again"
            )
            await self._ledger_call(
                input, ledger.move(key, entry.attempt, SEND_SENDING, SEND_UNCERTAIN, detail)
            )
            return self._uncertain(input, detail)
        if entry.state != SEND_CLAIMED or entry.attempt != attempt:
            detail = entry.detail or f"the outcome of sending {key} is unknown"
            return self._uncertain(input, detail)

        async def before_data() -> None:
            if not await self._ledger_call(
                input, ledger.move(key, attempt, SEND_CLAIMED, SEND_SENDING)
            ):
                raise _ClaimLost()

        client.before_data = before_data
        try:
            async with _heartbeats():
                outcome = await self._transmit(input, server, client, sender, message, recipient)
        except _ClaimLost:
            raise self._transient(
                input, "another attempt took this send over before it started DATA"
            ) from None
        except BaseException:
            # A send stopped in DATA stays `sending`, which later attempts treat as uncertain.
            if not client.in_doubt:
                await self._release_quietly(input, key, attempt)
            raise
        if outcome.status == StepStatus.SENT:
            if outcome.reason == DELIVERY_UNCERTAIN_REASON:
                await self._mark_quietly(input, key, attempt, SEND_UNCERTAIN, outcome.detail)
            else:
                await self._mark_quietly(input, key, attempt, SEND_SENT, None)
        else:
            await self._release_quietly(input, key, attempt)
        return outcome

    async def _transmit(
        self,
        input: StepInput,
        server: SmtpServer,
        client: _LedgerSMTP,
        sender: Sender,
        message: EmailMessage,
        recipient: str,
    ) -> StepOutcome:
        try:
            try:
                await client.connect()
            except (aiosmtplib.SMTPException, OSError) as error:
                raise self._connection_error(input, server, error) from error

            try:
                await client.send_message(
                    message, sender=ascii_email(sender.email), recipients=[recipient]
                )
            except aiosmtplib.SMTPRecipientsRefused as error:
                refused = error.recipients[0]
                return self._rejected(input, server, refused.code, refused.message, recipient)
            except aiosmtplib.SMTPSenderRefused as error:
                raise self._sender_refused(input, server, error, recipient) from error
            except aiosmtplib.SMTPResponseException as error:
                return self._rejected(input, server, error.code, error.message, recipient)
            except aiosmtplib.SMTPNotSupported as error:
                return self._not_supported(input, server, error, recipient)
            except (aiosmtplib.SMTPException, OSError) as error:
                # A QUIT on a dropped or silent connection would only wait for the timeout again.
                client.close()
                if client.in_doubt:
                    return self._uncertain(
                        input,
                        f"the connection to SMTP server {server} was lost while transmitting the "
                        f"message ({error}); the server may have accepted it, so it is not sent "
                        f"again (Message-ID {message['Message-ID']})",
                    )
                raise self._transient(
                    input, f"sending through SMTP server {server} failed: {error}"
                ) from error
        finally:
            await _close(client)

        message_id = str(message["Message-ID"])
        return self._finish(input, StepStatus.SENT, None, message_id)

    async def _ledger_call(self, input: StepInput, call: Awaitable[Any]) -> Any:
        """Await a ledger call; a database failure becomes a transient error, retried later."""
        try:
            return await call
        except Exception as error:
            raise self._transient(
                input, f"the send ledger in the database failed ({error}); nothing was sent"
            ) from error

    async def _release_quietly(self, input: StepInput, key: str, attempt: str) -> None:
        assert self._ledger is not None
        try:
            await self._ledger.release(key, attempt)
        except Exception as error:  # noqa: BLE001 - a later attempt takes the claim over
            logger.warning(
                "could not release the send of workflow %s, step %d: %s",
                input.workflow_id,
                input.step_number,
                error,
            )

    async def _mark_quietly(
        self, input: StepInput, key: str, attempt: str, state: str, detail: str | None
    ) -> None:
        """Record the outcome of a send that reached DATA; the outcome is returned either way."""
        assert self._ledger is not None
        try:
            await self._ledger.move(key, attempt, SEND_SENDING, state, detail)
        except Exception as error:  # noqa: BLE001 - a later attempt reads `sending` as uncertain
            logger.warning(
                "could not mark the send of workflow %s, step %d as %s: %s",
                input.workflow_id,
                input.step_number,
                state,
                error,
            )

    def _uncertain(self, input: StepInput, detail: str) -> StepOutcome:
        logger.warning(
            "email step outcome unknown, recorded as sent and not sent again: campaign %s, "
            "workflow %s, step %d",
            input.campaign_id,
            input.workflow_id,
            input.step_number,
        )
        return StepOutcome(status=StepStatus.SENT, reason=DELIVERY_UNCERTAIN_REASON, detail=detail)

    def _rejected(
        self, input: StepInput, server: SmtpServer, code: int, text: str, recipient: str
    ) -> StepOutcome:
        """Map a rejected RCPT or DATA command to a bounce, or raise for a retry or an alert."""
        reply = format_reply(code, text)
        if not 400 <= code <= 599:
            raise self._transient(
                input, f"SMTP server {server} sent an unexpected reply: {_redact(reply, recipient)}"
            )
        verdict = classify_smtp_reply(code, reply)
        if verdict.kind == "hard":
            logger.info(
                "email bounced with %s (%s): campaign %s, workflow %s, step %d",
                _reply_code(code, reply),
                verdict.subtype,
                input.campaign_id,
                input.workflow_id,
                input.step_number,
            )
            return StepOutcome(status=StepStatus.BOUNCED, reason=BOUNCE_REASON, detail=reply)
        if verdict.kind == "soft":
            raise self._transient(
                input,
                f"SMTP server {server} deferred the message ({verdict.subtype}): "
                f"{_redact(reply, recipient)}",
                reply_code=_reply_code(code, reply),
            )
        raise self._sender_alert(input, server, verdict, _redact(reply, recipient))

    def _sender_refused(
        self,
        input: StepInput,
        server: SmtpServer,
        error: aiosmtplib.SMTPSenderRefused,
        recipient: str,
    ) -> ApplicationError:
        """Map a rejected MAIL FROM: permanent rejections are always the sender's problem."""
        reply = _redact(format_reply(error.code, error.message), recipient)
        if 400 <= error.code <= 499:
            verdict = classify_smtp_reply(error.code, reply)
            if verdict.kind != "sender":
                return self._transient(
                    input,
                    f"SMTP server {server} deferred the sender address: {reply}",
                    reply_code=_reply_code(error.code, reply),
                )
            return self._sender_alert(input, server, verdict, reply)
        hint = sender_hint(
            classify_smtp_reply(error.code, reply).subtype,
            "check that the sender's email address belongs to the account that logs in",
        )
        return self._account_interrupted(
            input,
            f"SMTP server {server} rejected the sender address: {reply}. "
            + hint[0].upper()
            + hint[1:],
        )

    def _not_supported(
        self,
        input: StepInput,
        server: SmtpServer,
        error: aiosmtplib.SMTPNotSupported,
        recipient: str,
    ) -> StepOutcome:
        if not recipient.isascii():
            detail = (
                f"SMTP server {server} does not support SMTPUTF8, which the lead's address with a "
                "non-ASCII local part needs"
            )
            return self._finish(input, StepStatus.FAILED, UNSUPPORTED_ADDRESS_REASON, detail)
        raise self._account_interrupted(
            input, f"SMTP server {server} does not support a required feature: {error}"
        )

    def _connection_error(
        self, input: StepInput, server: SmtpServer, error: Exception
    ) -> ApplicationError:
        """Map a failure to connect, start TLS or log in to the sender's SMTP server."""
        cause = error.__cause__ if isinstance(error, aiosmtplib.SMTPConnectError) else error

        if isinstance(error, aiosmtplib.SMTPAuthenticationError):
            reply = format_reply(error.code, error.message)
            if 400 <= error.code <= 499:
                return self._transient(
                    input,
                    f"SMTP server {server} deferred the login: {reply}",
                    reply_code=_reply_code(error.code, reply),
                )
            return self._account_interrupted(
                input,
                f"SMTP server {server} rejected the login: {reply}. Check the SMTP username and "
                "password (SEQUENCER_SMTP_USERNAME, SEQUENCER_SMTP_PASSWORD)",
            )
        if isinstance(error, aiosmtplib.SMTPResponseException):
            reply = format_reply(error.code, error.message)
            if 400 <= error.code <= 499:
                return self._transient(
                    input, f"SMTP server {server} is not accepting mail now: {reply}"
                )
            verdict = SmtpReplyClass("sender", "connection-rejected", "SENDER_ALERT")
            if 500 <= error.code <= 599:
                verdict = classify_smtp_reply(error.code, reply)
            return self._sender_alert(input, server, verdict, reply)
        if isinstance(error, aiosmtplib.SMTPTimeoutError | aiosmtplib.SMTPServerDisconnected):
            return self._transient(input, f"connecting to SMTP server {server} failed: {error}")
        if isinstance(cause, ConnectionRefusedError):
            return self._account_interrupted(
                input,
                f"SMTP server {server} refused the connection. Check that the server is running "
                "and that the sender's smtp_url has the right host and port",
            )
        if isinstance(cause, ssl.SSLError):
            return self._account_interrupted(
                input,
                f"TLS with SMTP server {server} failed: {cause}. Check that smtps:// is used only "
                "for implicit TLS (usually port 465) and smtp:// for STARTTLS or plain SMTP, and "
                "that the server's certificate is valid",
            )
        if isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_NONAME:
            return self._account_interrupted(
                input,
                f"SMTP server host {server.host!r} was not found. Check the sender's smtp_url",
            )
        if isinstance(error, aiosmtplib.SMTPConnectError | OSError):
            return self._transient(input, f"connecting to SMTP server {server} failed: {error}")
        # Other SMTPException: no AUTH or STARTTLS support where it is needed.
        return self._account_interrupted(
            input, f"SMTP server {server} cannot be used as configured: {error}"
        )

    def _missing_variable(
        self, input: StepInput, error: MissingVariableError, field: str
    ) -> StepOutcome:
        detail = f"{error} in the {field}"
        return self._finish(input, StepStatus.FAILED, Reason.MISSING_VARIABLE, detail)

    def _finish(
        self, input: StepInput, status: StepStatus, reason: str | None, detail: str | None
    ) -> StepOutcome:
        logger.info(
            "email step %s%s: campaign %s, workflow %s, step %d",
            status.value,
            f" ({reason})" if reason else "",
            input.campaign_id,
            input.workflow_id,
            input.step_number,
        )
        return StepOutcome(status=status, reason=reason, detail=detail)

    def _transient(
        self, input: StepInput, message: str, reply_code: str | None = None
    ) -> ApplicationError:
        logger.warning(
            "email step deferred%s, Temporal retries it: campaign %s, workflow %s, step %d",
            f" with {reply_code}" if reply_code else "",
            input.campaign_id,
            input.workflow_id,
            input.step_number,
        )
        return ApplicationError(_with_step(input, message), type=TRANSIENT_ERROR_TYPE)

    def _sender_alert(
        self, input: StepInput, server: SmtpServer, verdict: SmtpReplyClass, reply: str
    ) -> ApplicationError:
        hint = sender_hint(verdict.subtype)
        return self._account_interrupted(
            input,
            f"SMTP server {server} rejected the message because of the sending side "
            f"({verdict.subtype}): {reply}. To resume, {hint}",
        )

    def _account_interrupted(self, input: StepInput, message: str) -> ApplicationError:
        logger.warning(
            "email step interrupted by the sender account: campaign %s, workflow %s, step %d: %s",
            input.campaign_id,
            input.workflow_id,
            input.step_number,
            message,
        )
        # BENIGN: the lead pauses until the account works again, which is no bug, so the SDK
        # logs the failure at DEBUG instead of a WARNING with a traceback.
        return ApplicationError(
            _with_step(input, message),
            type=ACCOUNT_INTERRUPTED_ERROR_TYPE,
            non_retryable=True,
            category=ApplicationErrorCategory.BENIGN,
        )


def build_message(
    input: StepInput, sender: Sender, recipient: str, subject: str, body: str
) -> EmailMessage:
    """Build the email of one step, with threading headers that point at earlier email steps.

    `recipient` is the envelope address, whose domain is in A-label form. `subject` and `body`
    are already rendered.
    """
    lead = input.lead
    message = EmailMessage()
    message["From"] = _address_header(sender.name, ascii_email(sender.email))
    message["To"] = _address_header(_full_name(lead), recipient)
    # A line break from a lead's variable would end the header, so subjects are one line.
    message["Subject"] = " ".join(subject.split())
    message["Date"] = format_datetime(datetime.now(UTC))

    lead_key = lead.key
    message["Message-ID"] = message_id_for(
        input.campaign_id, lead_key, input.step_number, sender.email
    )
    earlier_ids = [
        message_id_for(input.campaign_id, lead_key, number, sender.email)
        for number in input.earlier_email_steps
    ]
    if earlier_ids:
        message["In-Reply-To"] = earlier_ids[-1]
        message["References"] = " ".join(earlier_ids)
    message["X-Sequencer-Ref"] = f"{input.campaign_id}/{lead_ref(lead_key)}/{input.step_number}"

    message.set_content(body)
    return message


def _address_header(name: str | None, address: str) -> Address | str:
    display_name = " ".join((name or "").split())
    try:
        return Address(display_name=display_name, addr_spec=address)
    except HeaderDefect:
        # A non-ASCII local part (SMTPUTF8) cannot be built as an Address, so the header
        # carries the bare address.
        return address


def _full_name(lead: Lead) -> str:
    return " ".join(part for part in (lead.first_name, lead.last_name) if part)


def format_reply(code: int, text: str) -> str:
    """Return an SMTP reply as one line, "550 5.1.1 ...", from aiosmtplib's code and text.

    aiosmtplib joins the lines of a multi-line reply with newlines and drops their codes.
    """
    return " ".join([str(code), *text.split()])


def _reply_code(code: int, reply: str) -> str:
    status = parse_enhanced_status(reply)
    return f"{code} {status}" if status else str(code)


def _redact(text: str, address: str) -> str:
    """Replace the recipient's address in a server reply, which error messages carry into
    Temporal's history."""
    return re.sub(re.escape(address), "(recipient)", text, flags=re.IGNORECASE)


def _with_step(input: StepInput, message: str) -> str:
    return f"{message} (campaign {input.campaign_id}, step {input.step_number})"


async def _close(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        pass  # the message's outcome is already known; a failed QUIT changes nothing
    finally:
        client.close()
