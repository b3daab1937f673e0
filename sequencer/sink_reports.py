"""Messages that the local SMTP sink sends back to a sender, as a remote mail system would.

Each builder returns the raw bytes of one RFC 5322 message, addressed to `sender`, about the
`original` message (its raw bytes) that was sent to `recipient`. Builders are pure: the caller
passes the current time, and each Message-ID is derived from the original's.

The delivery status notifications follow RFC 3464 (multipart/report with a
message/delivery-status part and the returned headers), as Postfix writes them.
"""

from __future__ import annotations

import email.policy
import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.utils import format_datetime

REPORTING_HOST = "smtp-sink.localhost"
# The out-of-office reply gives a return date this many days after the message arrived.
OUT_OF_OFFICE_DAYS = 7

Builder = Callable[[str, str, bytes, datetime], bytes]

_RETURNED_HEADERS = ("From", "To", "Subject", "Date", "Message-ID")


def _headers(original: bytes) -> dict[str, str]:
    parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(original)
    return {name: str(parsed[name]).strip() for name in _RETURNED_HEADERS if parsed[name]}


def _message_id(kind: str, original: dict[str, str], recipient: str) -> str:
    digest = hashlib.sha256(
        f"{kind}\0{original.get('Message-ID', '')}\0{recipient}".encode()
    ).hexdigest()
    return f"<{kind}.{digest[:24]}@{REPORTING_HOST}>"


def _lines(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _status_notification(
    sender: str,
    recipient: str,
    original: bytes,
    now: datetime,
    *,
    status: str,
    reply: str,
    explanation: str,
) -> bytes:
    headers = _headers(original)
    boundary = "=_" + hashlib.sha256(original + status.encode()).hexdigest()[:32]
    returned = [f"{name}: {value}" for name, value in headers.items()]
    return _lines(
        "Return-Path: <>",
        f"From: Mail Delivery System <MAILER-DAEMON@{REPORTING_HOST}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {_message_id('dsn', headers, recipient)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at host {REPORTING_HOST}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients.",
        "",
        f"<{recipient}>: {explanation}: {reply}",
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {REPORTING_HOST}",
        f"Arrival-Date: {format_datetime(now)}",
        "",
        f"Final-Recipient: rfc822; {recipient}",
        f"Original-Recipient: rfc822; {recipient}",
        "Action: failed",
        f"Status: {status}",
        f"Remote-MTA: dns; mx.{recipient.rpartition('@')[2]}",
        f"Diagnostic-Code: smtp; {reply}",
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
        *returned,
        "",
        f"--{boundary}--",
    )


def hard_bounce(sender: str, recipient: str, original: bytes, now: datetime) -> bytes:
    """Return a DSN saying that `recipient` does not exist (5.1.1)."""
    return _status_notification(
        sender,
        recipient,
        original,
        now,
        status="5.1.1",
        reply=f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown",
        explanation="host said",
    )


def soft_bounce(sender: str, recipient: str, original: bytes, now: datetime) -> bytes:
    """Return a DSN saying that the mailbox of `recipient` is full (4.2.2)."""
    return _status_notification(
        sender,
        recipient,
        original,
        now,
        status="4.2.2",
        reply=f"452 4.2.2 <{recipient}>: Mailbox full",
        explanation="delivery temporarily suspended, then given up",
    )


def out_of_office(sender: str, recipient: str, original: bytes, now: datetime) -> bytes:
    """Return an RFC 3834 auto-reply from `recipient` that gives a return date."""
    headers = _headers(original)
    back = (now + timedelta(days=OUT_OF_OFFICE_DAYS)).date()
    subject = headers.get("Subject", "your message")
    return _lines(
        f"From: <{recipient}>",
        f"To: <{sender}>",
        f"Subject: Out of Office: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {_message_id('ooo', headers, recipient)}",
        *([f"In-Reply-To: {headers['Message-ID']}"] if "Message-ID" in headers else []),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Thank you for your message.",
        "",
        f"I am out of the office until {back.strftime('%B')} {back.day}, {back.year}, "
        "with limited access to email.",
        "I will answer when I am back.",
    )


def human_reply(sender: str, recipient: str, original: bytes, now: datetime) -> bytes:
    """Return a reply written by the person at `recipient`."""
    headers = _headers(original)
    subject = headers.get("Subject", "")
    parent = headers.get("Message-ID")
    return _lines(
        f"From: <{recipient}>",
        f"To: <{sender}>",
        f"Subject: Re: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {_message_id('reply', headers, recipient)}",
        *([f"In-Reply-To: {parent}", f"References: {parent}"] if parent else []),
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Hi, thanks for reaching out. Could we talk on Thursday?",
    )


_BUILDERS: tuple[tuple[str, Builder], ...] = (
    ("late-bounce", hard_bounce),
    ("soft-bounce", soft_bounce),
    ("ooo", out_of_office),
    ("reply", human_reply),
)


def builder_for(local_part: str) -> Builder | None:
    """Return the builder for a recipient's local part, or None when it calls for no report."""
    for prefix, builder in _BUILDERS:
        if local_part.lower().startswith(prefix):
            return builder
    return None
