"""A local SMTP server for development and tests that stores mail instead of delivering it.

Every accepted message is written as one `.eml` file per recipient into a mailbox folder, with
`Return-Path` and `Delivered-To` headers added on top the way a delivery agent does, so the
envelope can be checked. Recipients whose local part starts with a bounce prefix (`bounce@x`,
`bounce-ann@x`) are rejected at RCPT with a 550 5.1.1 reply.

Some recipients are accepted, and a few seconds later the sink sends a message back to the
sender's mailbox through `deliver`, the way a remote mail system would, by local part prefix:

    late-bounce   a delivery status notification (DSN): failed, 5.1.1 user unknown
    soft-bounce   a DSN: failed, 4.2.2 mailbox full
    ooo           an out-of-office auto-reply that gives a return date a week later
    reply         a reply written by a person, with In-Reply-To

Without `deliver` (no IMAP server in the stack), nothing is sent back.

Outages of a sender account can be simulated, so that a demo shows enrollments pausing and
resuming by themselves. During an outage, MAIL FROM for that sender address is rejected with
`535 5.7.8 Authentication credentials invalid`, the reply of a server whose login failed:

- A sender whose local part starts with `outage` (`outage-rep@acme.test`) gets one outage. It
  starts at the first MAIL FROM from that address and lasts `outage_seconds`. After it ends,
  the address is accepted for as long as the sink runs.
- `SmtpSink.start_outage(address, seconds)` rejects any sender address from now on for that
  many seconds, and `SmtpSink.end_outage(address)` ends its outage at once.

Sender addresses are compared without regard to case.
"""

from __future__ import annotations

import email.policy
import itertools
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path
from types import TracebackType
from typing import cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from sequencer import sink_reports

logger = logging.getLogger(__name__)

LATE_BOUNCE_PREFIX = "late-bounce"
# The sink sends a message back to the sender for recipients whose local part starts with one
# of these. `sequencer.sink_reports` builds each message.
REPORT_PREFIXES = (LATE_BOUNCE_PREFIX, "soft-bounce", "ooo", "reply")
DEFAULT_REPORT_DELAY = 2.0
OUTAGE_PREFIX = "outage"
OUTAGE_REPLY = "535 5.7.8 Authentication credentials invalid"
DEFAULT_OUTAGE_SECONDS = 20.0
MAILBOX_SUFFIX = ".eml"

_UNSAFE_FILE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_MESSAGE_ID_IN_FILE_NAME = 80


def _local_part(address: str) -> str:
    return address.rpartition("@")[0].lower()


class _OutageSchedule:
    """The end of each sender address's outage, in `time.monotonic()` seconds.

    The lock guards `_ends` because the server thread reads it while the caller's thread sets
    outages. An address keeps its entry after its outage ends, which is how an `outage`
    address is kept from starting a second automatic outage.
    """

    def __init__(self, outage_seconds: float) -> None:
        self.outage_seconds = outage_seconds
        self._ends: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, address: str, seconds: float) -> None:
        with self._lock:
            self._ends[address.lower()] = time.monotonic() + seconds

    def end(self, address: str) -> None:
        with self._lock:
            self._ends[address.lower()] = time.monotonic()

    def seconds_left(self, address: str) -> float:
        """Return how long `address` stays rejected, starting the automatic outage of an
        `outage` address on its first MAIL FROM. Returns 0.0 when it is accepted."""
        key = address.lower()
        now = time.monotonic()
        with self._lock:
            if key not in self._ends and _local_part(key).startswith(OUTAGE_PREFIX):
                self._ends[key] = now + self.outage_seconds
                logger.info("sender outage started for %.1f seconds", self.outage_seconds)
            return max(self._ends.get(key, now) - now, 0.0)


def _check_seconds(name: str, seconds: float, *, allow_zero: bool) -> None:
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        expected = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"invalid {name} {seconds!r}: expected a number of seconds, {expected}")


class _MailboxHandler:
    """aiosmtpd handler hooks: the MAIL and RCPT verdicts and the storage of accepted messages."""

    def __init__(
        self,
        mailbox_dir: Path,
        bounce_prefixes: tuple[str, ...],
        outages: _OutageSchedule,
        reports: _ReportSender | None = None,
    ) -> None:
        self.mailbox_dir = mailbox_dir
        self.bounce_prefixes = tuple(prefix.lower() for prefix in bounce_prefixes)
        self.outages = outages
        self.reports = reports
        # The counter orders messages stored within the same nanosecond tick.
        self._sequence = itertools.count()
        self._sequence_lock = threading.Lock()

    def is_bounce_address(self, address: str) -> bool:
        local_part = _local_part(address)
        if local_part.startswith(REPORT_PREFIXES):
            return False
        return local_part.startswith(self.bounce_prefixes)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        seconds_left = self.outages.seconds_left(address)
        if seconds_left > 0:
            logger.info(
                "rejected a sender at MAIL FROM: %s (outage, %.1f seconds left)",
                OUTAGE_REPLY,
                seconds_left,
            )
            return OUTAGE_REPLY
        # With a MAIL hook, aiosmtpd leaves recording the sender to the hook.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.is_bounce_address(address):
            logger.info("rejected a recipient at RCPT: 550 5.1.1 user unknown (bounce prefix)")
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message_id = _message_id_of(content)
        try:
            for recipient in envelope.rcpt_tos:
                self._store(content, envelope.mail_from or "", recipient, message_id)
        except OSError as error:
            logger.error(
                "could not store message %s in %s: %s", message_id, self.mailbox_dir, error
            )
            return "451 4.3.0 Could not store the message, try again later"
        logger.info("accepted message %s for %d recipient(s)", message_id, len(envelope.rcpt_tos))
        if self.reports is not None and envelope.mail_from:
            for recipient in envelope.rcpt_tos:
                self.reports.schedule(envelope.mail_from, recipient, content)
        return "250 2.0.0 Message accepted for delivery"

    def _store(self, content: bytes, mail_from: str, recipient: str, message_id: str) -> Path:
        with self._sequence_lock:
            sequence = next(self._sequence)
        safe_id = _UNSAFE_FILE_NAME_CHARACTERS.sub("_", message_id.strip("<>"))
        safe_id = safe_id[:_MAX_MESSAGE_ID_IN_FILE_NAME] or "no-message-id"
        name = f"{time.time_ns():020d}-{sequence:06d}-{safe_id}{MAILBOX_SUFFIX}"
        trace = f"Return-Path: <{mail_from}>\r\nDelivered-To: {recipient}\r\n"

        # A reader never sees a half-written file: it is written under a hidden temporary name
        # and renamed, which is atomic within one folder.
        handle, temporary = tempfile.mkstemp(dir=self.mailbox_dir, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(trace.encode("utf-8"))
                file.write(content)
            path = self.mailbox_dir / name
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path


def _message_id_of(content: bytes) -> str:
    headers = BytesHeaderParser(policy=email.policy.default).parsebytes(content)
    message_id = str(headers.get("Message-ID", "")).strip()
    return message_id or "(no Message-ID)"


class _ReportSender:
    """Sends the messages that REPORT_PREFIXES recipients call for, each after `delay` seconds.

    Each report goes out from a timer thread, so the SMTP transaction ends first, as with a real
    remote system. `deliver(address, raw)` is blocking; its errors are logged, not retried.
    """

    def __init__(self, deliver: Callable[[str, bytes], None], delay: float) -> None:
        self.deliver = deliver
        self.delay = delay
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()

    def schedule(self, sender: str, recipient: str, original: bytes) -> None:
        build = sink_reports.builder_for(_local_part(recipient))
        if build is None:
            return
        report = build(sender, recipient, original, datetime.now(UTC))
        timer = threading.Timer(self.delay, self._send, (sender, report))
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _send(self, sender: str, report: bytes) -> None:
        try:
            self.deliver(sender, report)
            logger.info("sent a report back to the sender's mailbox")
        except Exception as error:
            logger.error("could not deliver a report to the sender's mailbox: %s", error)
        finally:
            with self._lock:
                self._timers = {timer for timer in self._timers if timer.is_alive()}

    def cancel(self) -> None:
        """Drop the reports not sent yet."""
        with self._lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()


class _FreePortController(Controller):
    """A Controller that accepts port 0 and fails at once when it cannot bind its port."""

    def _run(self, ready_event: threading.Event) -> None:
        super()._run(ready_event)
        # aiosmtpd 1.4.6 returns without setting the event when binding fails, so start() would
        # wait the whole ready_timeout before raising the bind error.
        ready_event.set()

    def _trigger_server(self) -> None:
        if self._thread_exception is not None:
            raise self._thread_exception
        # aiosmtpd connects to `self.port` to check that the server responds, so port 0 must be
        # replaced by the bound port first. The server is bound before this runs.
        if self.port == 0 and self.server is not None:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpSink:
    """A local SMTP server that stores messages in `mailbox_dir` and rejects bounce addresses.

    It runs in its own thread, so it serves both synchronous and asyncio callers. Start it with
    `start()` or use it as a context manager. `outage_seconds` is the length of the automatic
    outage of `outage` sender addresses, and 0 turns it off. `deliver(address, raw)` puts a
    message into a sender's mailbox; the sink calls it `report_delay` seconds after accepting a
    message for a REPORT_PREFIXES recipient.
    """

    def __init__(
        self,
        mailbox_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 2525,
        bounce_prefixes: tuple[str, ...] = ("bounce",),
        outage_seconds: float = DEFAULT_OUTAGE_SECONDS,
        deliver: Callable[[str, bytes], None] | None = None,
        report_delay: float = DEFAULT_REPORT_DELAY,
    ) -> None:
        _check_seconds("outage_seconds", outage_seconds, allow_zero=True)
        _check_seconds("report_delay", report_delay, allow_zero=True)
        self._reports = _ReportSender(deliver, report_delay) if deliver else None
        self.mailbox_dir = Path(mailbox_dir)
        self.host = host
        self._requested_port = port
        self.bounce_prefixes = bounce_prefixes
        # Outages outlive a restart of the server, and can be set before it starts.
        self._outages = _OutageSchedule(outage_seconds)
        self._controller: _FreePortController | None = None

    @property
    def port(self) -> int:
        """The port the server listens on: the OS-chosen one when started with port 0."""
        if self._controller is not None:
            return self._controller.port
        return self._requested_port

    @property
    def smtp_url(self) -> str:
        """The `smtp://host:port` URL that a campaign's sender uses to reach this server."""
        return f"smtp://{self.host}:{self.port}"

    @property
    def outage_seconds(self) -> float:
        """The length in seconds of the automatic outage of `outage` sender addresses."""
        return self._outages.outage_seconds

    def start_outage(self, address: str, seconds: float) -> None:
        """Reject MAIL FROM for `address` with OUTAGE_REPLY from now on for `seconds` seconds.

        This replaces any outage of that address, including the automatic one of an `outage`
        address, which then never starts. Raises ValueError unless `seconds` is more than zero.
        """
        _check_seconds("outage length", seconds, allow_zero=False)
        self._outages.start(address, seconds)
        logger.info("sender outage set for %.1f seconds", seconds)

    def end_outage(self, address: str) -> None:
        """Accept MAIL FROM for `address` from now on.

        The automatic outage of an `outage` address does not start after this either.
        """
        self._outages.end(address)
        logger.info("sender outage ended")

    def start(self) -> None:
        """Start listening and return once the server responds.

        Raises OSError when the port cannot be bound, for example because it is in use.
        """
        if self._controller is not None:
            raise RuntimeError(f"the SMTP sink is already running on {self.host}:{self.port}")
        self.mailbox_dir.mkdir(parents=True, exist_ok=True)

        # aiosmtpd logs every recipient address at INFO on its "mail.log" logger. Quiet it
        # unless the application configured that logger itself.
        aiosmtpd_logger = logging.getLogger("mail.log")
        if aiosmtpd_logger.level == logging.NOTSET:
            aiosmtpd_logger.setLevel(logging.WARNING)

        handler = _MailboxHandler(
            self.mailbox_dir, self.bounce_prefixes, self._outages, self._reports
        )
        controller = _FreePortController(
            handler,
            hostname=self.host,
            port=self._requested_port,
            server_hostname="smtp-sink.localhost",
            enable_SMTPUTF8=True,
        )
        try:
            controller.start()
        except BaseException:
            # The failed controller's thread has ended, but its event loop is still open.
            controller.stop(no_assert=True)
            if not controller.loop.is_closed():
                controller.loop.close()
            raise
        self._controller = controller
        logger.info(
            "SMTP sink listening on %s:%d, storing mail in %s",
            self.host,
            self.port,
            self.mailbox_dir,
        )

    def stop(self) -> None:
        """Stop the server and close its port. Stopping a sink that is not running does nothing."""
        if self._controller is None:
            return
        port = self._controller.port
        self._controller.stop()
        if self._reports is not None:
            self._reports.cancel()
        self._controller = None
        # Keep reporting the port that was in use, so a test can reuse it as a closed port.
        self._requested_port = port
        logger.info("SMTP sink on %s:%d stopped", self.host, port)

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def read_mailbox(mailbox_dir: Path) -> list[EmailMessage]:
    """Parse the messages stored in a mailbox folder, oldest first.

    Files keep the CRLF line endings of SMTP, but the parsed messages have LF line endings, as
    Python's email package expects. Returns an empty list when the folder does not exist yet.
    """
    folder = Path(mailbox_dir)
    if not folder.is_dir():
        return []
    parser = BytesParser(policy=email.policy.default)
    messages: list[EmailMessage] = []
    for path in sorted(folder.glob(f"*{MAILBOX_SUFFIX}")):
        if path.name.startswith("."):
            continue
        content = path.read_bytes().replace(b"\r\n", b"\n")
        messages.append(cast(EmailMessage, parser.parsebytes(content)))
    return messages
