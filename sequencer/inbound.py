"""Classify the messages that arrive in a sender's mailbox: bounces, delays, replies, complaints.

`classify_message` is pure: it parses the raw bytes with the standard library `email` package,
does no I/O and never reads the clock. The cause of each failed recipient comes from
`classify_smtp_reply`, given the recipient's reply code and diagnostic text, so a bounce and a
failed SMTP transaction get the same verdict.

The checks run in this order, and the first that matches decides:

    feedback report  multipart/report; report-type=feedback-report (ARF, RFC 5965 and RFC 6591)
    DSN              per-recipient fields of a message/delivery-status part (RFC 3464)
    other bounce     sent by MAILER-DAEMON or postmaster, a bounce subject or X-Failed-Recipients;
                     the failed recipients are read from the text (qmail, Exim, Exchange 2003...)
    auto-reply       Auto-Submitted other than "no" (RFC 3834), X-Autoreply and similar headers,
                     or an out-of-office subject
    human reply      In-Reply-To or References names a Message-ID
    unrelated        anything else

Bounces come before auto-replies because most bounces also carry `Auto-Submitted: auto-replied`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
from enum import StrEnum

from sequencer.smtp_replies import SmtpReplyClass, classify_smtp_reply, parse_enhanced_status


class InboundKind(StrEnum):
    """Meaning of an inbound message for the lead and the sender."""

    HARD_BOUNCE = "hard_bounce"  # bad address, so the engine stops emailing the lead
    SOFT_BOUNCE = (
        "soft_bounce"  # not delivered for a reason that may pass or that is the sender's fault
    )
    DELAY_WARNING = (
        "delay_warning"  # still queued and may yet be delivered, so resending would duplicate
    )
    AUTO_REPLY = "auto_reply"
    COMPLAINT = "complaint"  # the recipient reported the message as spam
    HUMAN_REPLY = "human_reply"
    UNRELATED = "unrelated"


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient that a bounce, delay warning, complaint or auto-reply is about.

    `status` is the enhanced status code as the report states it (the DSN `Status` field, or the
    first code in a plain-text bounce). `subtype` and `sender_side` come from the diagnostic text,
    which may disagree with `status`. `sender_side` is True when the sending IP, domain,
    authentication or content is at fault, so the lead must not be unsubscribed.
    """

    address: str
    status: str | None
    reply_code: int | None
    diagnostic: str | None
    subtype: str
    sender_side: bool


@dataclass(frozen=True, kw_only=True)
class InboundMessage:
    """The verdict on one inbound message.

    `recipients` lists every failed recipient of a bounce or delay warning, in the order of the
    report. For a complaint it contains the complained-about recipient, and for an auto-reply the
    address that sent it, so the engine can find the lead. It is empty for human replies and
    unrelated mail, which the engine matches by `original_message_id`.

    `original_message_id` is the Message-ID of the message that bounced or was reported, read
    from the returned headers. For replies it is the first Message-ID of In-Reply-To, or else the
    last one of References (the direct parent).
    """

    kind: InboundKind
    subtype: str
    reason: str
    recipients: tuple[FailedRecipient, ...] = ()
    original_message_id: str | None = None
    return_date: date | None = None


def classify_message(raw: bytes) -> InboundMessage:
    """Classify one raw RFC 5322 message (bytes as received, headers included)."""
    message = BytesParser(policy=policy.compat32).parsebytes(raw)
    text = raw.decode("utf-8", errors="replace")

    if _report_type(message) == "feedback-report" or _first_part(
        message, "message/feedback-report"
    ):
        return _classify_feedback_report(message, text)

    delivery_status = _delivery_status_recipients(message, text)
    if delivery_status:
        return _classify_delivery_status(message, text, delivery_status)

    if _looks_like_bounce(message):
        return _classify_plain_bounce(message, text)

    auto_reply = _classify_auto_reply(message)
    if auto_reply is not None:
        return auto_reply

    parent_id = _parent_message_id(message)
    if parent_id is not None:
        return InboundMessage(
            kind=InboundKind.HUMAN_REPLY,
            subtype="reply",
            original_message_id=parent_id,
            reason=f"reply to {parent_id} with no bounce or auto-reply markers",
        )
    return InboundMessage(
        kind=InboundKind.UNRELATED,
        subtype="ordinary-message",
        reason="no bounce, report or auto-reply markers and no In-Reply-To or References",
    )


# --- headers and MIME parts -------------------------------------------------------------------


def _header(message: Message, name: str) -> str:
    """Return a header decoded from RFC 2047 encoded words, unfolded, or "" when absent."""
    value = message.get(name)
    if value is None:
        return ""
    try:
        decoded = str(make_header(decode_header(str(value))))
    except (LookupError, UnicodeError, ValueError, HeaderParseError):
        decoded = str(
            value
        )  # Keep the raw form when the charset is unknown or an encoded word is broken.
    return " ".join(decoded.split())


def _report_type(message: Message) -> str:
    if message.get_content_type() != "multipart/report":
        return ""
    return str(message.get_param("report-type", "") or "").lower()


def _parts(message: Message) -> Iterator[Message]:
    """Yield every MIME part, without entering attached messages (message/rfc822)."""
    yield message
    if message.get_content_maintype() == "message":
        return
    payload = _payload(message)
    if isinstance(payload, list):
        for part in payload:
            if isinstance(part, Message):
                yield from _parts(part)


def _payload(part: Message) -> list[Message] | str:
    """Return the part's payload: its sub-parts, or its undecoded text.

    For a body with non-ASCII bytes, Message.get_payload() decodes with the declared charset
    and catches only LookupError (CPython 3.11), so a charset such as idna raises UnicodeError
    and one with a NUL character ValueError. Such a part counts as a leaf without text here,
    and `_part_text` still reads it.
    """
    try:
        return part.get_payload()
    except (UnicodeError, ValueError):
        return ""


def _first_part(message: Message, content_type: str) -> Message | None:
    for part in _parts(message):
        if part.get_content_type() == content_type:
            return part
    return None


def _part_text(part: Message) -> str:
    """Return the decoded text of a leaf part, or "" for a part that contains other parts."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except (LookupError, UnicodeError):
        # A charset Python does not know, or a codec such as idna that cannot replace errors.
        return payload.decode("utf-8", errors="replace")


def _returned_headers(message: Message) -> Message | None:
    """Return the headers of the returned or reported message, from a MIME part."""
    for part in _parts(message):
        content_type = part.get_content_type()
        if content_type == "text/rfc822-headers":
            return HeaderParser().parsestr(_part_text(part))
        if content_type == "message/rfc822":
            payload = _payload(part)
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
    return None


_MESSAGE_ID_FIELD = re.compile(r"^Message-ID:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(r"<[^<>\s]+@[^<>\s]+>")


def _original_message_id(message: Message, text: str) -> str | None:
    """Find the Message-ID of the returned message in a MIME part, or else in the body text."""
    returned = _returned_headers(message)
    if returned is not None:
        match = _MESSAGE_ID.search(_header(returned, "Message-ID"))
        if match:
            return match.group(0)

    # Plain-text bounces (qmail, Exim) quote the returned message after the notification, and
    # broken MIME boundaries leave the parts unsplit. The body starts after the first blank line.
    body = re.split(r"\r?\n\r?\n", text, maxsplit=1)
    if len(body) < 2:
        return None
    match = _MESSAGE_ID_FIELD.search(body[1])
    return match.group(1) if match else None


def _parent_message_id(message: Message) -> str | None:
    in_reply_to = _MESSAGE_ID.findall(_header(message, "In-Reply-To"))
    if in_reply_to:
        return in_reply_to[0]
    references = _MESSAGE_ID.findall(_header(message, "References"))
    return references[-1] if references else None


# --- SMTP diagnostics -------------------------------------------------------------------------

# A reply code that starts the text or follows a space, colon or "said:", and is followed by a
# space or the hyphen of a multi-line reply, so that IP addresses and ids are not taken for one.
_REPLY_CODE = re.compile(r"(?:^|(?<=[\s:;(]))([45]\d\d)(?=[ -])")
# qmail appends its own verdict as "(#5.5.0)".
_QMAIL_STATUS = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)")

# Texts that the reporting MTA writes itself, or SMTP replies that classify_smtp_reply has no
# rule for. They apply only when classify_smtp_reply returns one of `_UNSPECIFIC_SUBTYPES`.
# NOTE: "client host rejected" is an SMTP reply (Postfix) and belongs in smtp_replies.py.
_BOUNCE_TEXT_RULES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(
            r"client host rejected|sender was rejected|your (ip|host|server)\b.{0,40}\b(rejected"
            r"|blocked)",
            re.IGNORECASE,
        ),
        "sender",
        "sender-host-rejected",
    ),
    (
        # Gmail's "Send mail as" through an SMTP server that rejects or lacks authentication.
        re.compile(r"send mail as|customfromdenied|does not advertise auth", re.IGNORECASE),
        "sender",
        "sender-config-error",
    ),
    (
        re.compile(
            r"retry timeout exceeded|(been|too long) in the queue|queue too long|message expired"
            r"|could not be delivered for \d+ (hours|days)",
            re.IGNORECASE,
        ),
        "soft",
        "expired",
    ),
    (
        # Exchange 2003 sends no SMTP or enhanced code at all.
        re.compile(r"recipient name is not recognized", re.IGNORECASE),
        "hard",
        "user-unknown",
    ),
)
_UNSPECIFIC_SUBTYPES = frozenset(
    {"temporary-failure", "unclassified-permanent", "mailbox-or-system-status", "policy-rejected"}
)


@dataclass(frozen=True)
class _Verdict:
    kind: str  # "hard", "soft" or "sender", as in SmtpReplyClass
    subtype: str


def _reply_code(diagnostic: str) -> int | None:
    match = _REPLY_CODE.search(diagnostic)
    return int(match.group(1)) if match else None


def _classify_diagnostic(status: str | None, reply_code: int | None, diagnostic: str) -> _Verdict:
    """Classify one failed recipient from its reply code, status and diagnostic text.

    A report without a reply code is a final failure, so the code defaults to 550, or to 450
    when the status is a 4.x.x one.
    """
    text = diagnostic
    if parse_enhanced_status(text) is None and status is not None:
        # The Status field or qmail's suffix, put where parse_enhanced_status reads a code.
        text = f"{status} {text}"
    code = reply_code
    if code is None:
        code = 450 if status is not None and status.startswith("4.") else 550

    verdict: SmtpReplyClass = classify_smtp_reply(code, text)
    if verdict.subtype in _UNSPECIFIC_SUBTYPES:
        for pattern, kind, subtype in _BOUNCE_TEXT_RULES:
            if pattern.search(diagnostic):
                return _Verdict(kind, subtype)
    return _Verdict(verdict.kind, verdict.subtype)


def _failed_recipient(
    address: str, status: str | None, diagnostic: str, *, delayed: bool = False
) -> tuple[FailedRecipient, str]:
    """Build one failed recipient and return it with its kind ("hard", "soft" or "sender")."""
    reply_code = _reply_code(diagnostic)
    if delayed:
        verdict = _Verdict("soft", "delay-warning")
    else:
        verdict = _classify_diagnostic(status, reply_code, diagnostic)
    recipient = FailedRecipient(
        address=address,
        status=status,
        reply_code=reply_code,
        diagnostic=diagnostic or None,
        subtype=verdict.subtype,
        sender_side=verdict.kind == "sender",
    )
    return recipient, verdict.kind


def _bounce_message(
    classified: list[tuple[FailedRecipient, str]], original_message_id: str | None, source: str
) -> InboundMessage:
    """Build a bounce verdict. The message is hard when any recipient is hard, and its subtype
    is that of the first hard recipient, or else of the first recipient."""
    hard = [recipient for recipient, kind in classified if kind == "hard"]
    chosen = hard[0] if hard else classified[0][0]
    side = "sender-side " if chosen.sender_side else ""
    return InboundMessage(
        kind=InboundKind.HARD_BOUNCE if hard else InboundKind.SOFT_BOUNCE,
        subtype=chosen.subtype,
        recipients=tuple(recipient for recipient, _ in classified),
        original_message_id=original_message_id,
        reason=(
            f"{source} reports {len(classified)} failed recipient(s); {chosen.address}: "
            f"{side}{chosen.subtype} (status {chosen.status or 'none'})"
        ),
    )


# --- delivery status notifications (RFC 3464) -------------------------------------------------


@dataclass(frozen=True)
class _DsnRecipient:
    address: str
    action: str
    status: str | None
    diagnostic: str


def _field_groups(text: str) -> Iterator[dict[str, str]]:
    """Parse blank-line separated groups of `Name: value` fields, unfolding continuation lines.

    Field names are lower-cased. A later repeat of a field keeps the first value.
    """
    for paragraph in re.split(r"\r?\n[ \t]*\r?\n", text):
        fields: dict[str, str] = {}
        name = ""
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t") and name:
                fields[name] += " " + line.strip()
                continue
            match = re.match(r"([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)", line)
            if match is None:
                name = ""
                continue
            name = match.group(1).lower()
            fields.setdefault(name, match.group(2).strip())
        if fields:
            yield fields


def _typed_value(value: str) -> str:
    """Drop the type prefix of a DSN field: "rfc822; a@b" -> "a@b", "smtp; 550 ..." -> "550 ..."."""
    kind, separator, rest = value.partition(";")
    if separator and re.fullmatch(r"[A-Za-z0-9-]+", kind.strip()):
        value = rest
    return " ".join(value.split())


def _dsn_recipients_from(text: str) -> list[_DsnRecipient]:
    recipients = []
    for fields in _field_groups(text):
        address = fields.get("original-recipient") or fields.get("final-recipient")
        if not address or "action" not in fields:
            continue
        status = parse_enhanced_status(fields.get("status", ""))
        recipients.append(
            _DsnRecipient(
                # Original-Recipient is the address the engine sent to, before any forwarding.
                address=_typed_value(address).strip("<>"),
                action=fields["action"].split()[0].lower() if fields["action"] else "",
                status=status,
                diagnostic=_typed_value(fields.get("diagnostic-code", "")),
            )
        )
    return recipients


def _delivery_status_recipients(message: Message, text: str) -> list[_DsnRecipient]:
    """Read the per-recipient fields of the delivery-status part.

    When MIME parsing finds no such part with recipients (a wrong boundary in the Content-Type
    header, for one), the raw text before any returned message is searched instead, but only in
    a message that otherwise looks like a bounce.
    """
    for part in _parts(message):
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = _payload(part)
        if isinstance(payload, list):
            blocks = "\n\n".join(
                block.as_string() for block in payload if isinstance(block, Message)
            )
        else:
            blocks = _part_text(part)
        recipients = _dsn_recipients_from(blocks)
        if recipients:
            return recipients

    if _report_type(message) != "delivery-status" and not _looks_like_bounce(message):
        return []
    body = re.split(
        r"^Content-Type:[ \t]*(?:message/rfc822|text/rfc822-headers)",
        text,
        maxsplit=1,
        flags=re.IGNORECASE | re.MULTILINE,
    )[0]
    return _dsn_recipients_from(body)


def _classify_delivery_status(
    message: Message, text: str, dsn_recipients: list[_DsnRecipient]
) -> InboundMessage:
    failed = [r for r in dsn_recipients if r.action == "failed"]
    delayed = [r for r in dsn_recipients if r.action == "delayed"]
    original_message_id = _original_message_id(message, text)

    if failed:
        recipients = [_failed_recipient(r.address, r.status, r.diagnostic) for r in failed]
        return _bounce_message(recipients, original_message_id, "delivery status notification")

    if delayed:
        recipients = [
            _failed_recipient(r.address, r.status, r.diagnostic, delayed=True)[0] for r in delayed
        ]
        return InboundMessage(
            kind=InboundKind.DELAY_WARNING,
            subtype="delay-warning",
            recipients=tuple(recipients),
            original_message_id=original_message_id,
            reason=(
                f"delivery status notification with Action: delayed for {len(recipients)} "
                "recipient(s); the message may still be delivered"
            ),
        )

    actions = ", ".join(sorted({r.action for r in dsn_recipients}))
    return InboundMessage(
        kind=InboundKind.UNRELATED,
        subtype="delivery-report",
        original_message_id=original_message_id,
        reason=f"delivery status notification with no failed or delayed recipient ({actions})",
    )


# --- bounces without a delivery-status part ---------------------------------------------------

_DAEMON_SENDER = re.compile(
    r"^(mailer-daemon|mailerdaemon|mail-daemon|postmaster|mdaemon)$", re.IGNORECASE
)
_DAEMON_NAME = re.compile(r"mail delivery (system|subsystem)|mailer-daemon", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered mail|delivery status notification \((failure|delay)\)"
    r"|failure notice|returned mail|mail delivery failed|delivery fail|bounce notification"
    r"|non-?delivery|could not be delivered|delivery (has )?failed",
    re.IGNORECASE,
)
# Start of the copy of the returned message, which ends the notification.
_COPY_MARKER = re.compile(
    r"^.*(?:below this line is a copy of the message|this is a copy of the message"
    r"|original message follows)"
    r"|^(?:bounced e-mail:|-+ ?original message ?-+|original message headers)",
    re.IGNORECASE | re.MULTILINE,
)
_ADDRESS = r"[^\s<>()\[\]@\",;:]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+"
# Lines that name a failed recipient, by MTA:
#   qmail, Yahoo, Postfix, Sendmail  "<user@example.org>:" with the diagnostic below or after it
#   Exim                             "  user@example.org" indented by at most two spaces
#   Exchange 2003                    "user@example.org on Thu, 29 Apr 2010 ..."
#   German ISP notification          "target mail address: user@example.org"
_RECIPIENT_LINE = re.compile(
    rf"^(?:<(?P<bracketed>{_ADDRESS})>:?(?P<rest>.*)"
    rf"|[ ]{{0,2}}(?P<bare>{_ADDRESS})[ \t]*(?:on [A-Z][a-z]{{2}}, .*)?"
    rf"|(?:target|failed|original)? ?(?:mail )?(?:address|recipient)[ \t]*:[ \t]*<?"
    rf"(?P<labelled>{_ADDRESS})>?[ \t]*)$",
    re.IGNORECASE,
)
# Google's bounces put the remote server's reply after this line.
_RESPONSE_WAS = re.compile(r"^The response (was|from the remote server was):\s*$", re.M | re.I)


def _looks_like_bounce(message: Message) -> bool:
    name, address = parseaddr(_header(message, "From"))
    local_part = address.partition("@")[0]
    return bool(
        _DAEMON_SENDER.match(local_part)
        or _DAEMON_NAME.search(name)
        or _BOUNCE_SUBJECT.search(_header(message, "Subject"))
        or message.get("X-Failed-Recipients")
        or _report_type(message) == "delivery-status"
    )


def _notification_text(message: Message) -> str:
    """Return the text/plain parts before the returned copy, which form the notification."""
    texts = []
    for part in _parts(message):
        if part.get_content_type() == "text/plain":
            texts.append(_part_text(part))
        if texts and part.get_content_maintype() == "message":
            break
    text = "\n".join(texts)
    match = _COPY_MARKER.search(text)
    return text[: match.start()] if match else text


def _recipients_in_text(notification: str) -> list[tuple[str, str]]:
    """Read (address, diagnostic) pairs from a plain-text bounce, in the order they appear.

    The diagnostic is the rest of the address line and the lines below it, up to a blank line
    or the next recipient.
    """
    found: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in notification.splitlines():
        match = _RECIPIENT_LINE.match(line.rstrip())
        if match:
            address = match.group("bracketed") or match.group("bare") or match.group("labelled")
            current = []
            rest = (match.group("rest") or "").strip()
            if rest:
                current.append(rest)
            found.append((address, current))
            continue
        if not line.strip():
            current = None
        elif current is not None:
            current.append(line.strip())
    return [(address, " ".join(lines)) for address, lines in found]


def _status_in_text(diagnostic: str) -> str | None:
    status = parse_enhanced_status(diagnostic)
    if status is None:
        # The first code that follows a reply code anywhere in the text, as in "said: 550 5.1.1".
        match = re.search(
            r"(?<![\d.])[45]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})(?![\d.]*\d)", diagnostic
        )
        status = match.group(1) if match else None
    if status is None:
        match = _QMAIL_STATUS.search(diagnostic)
        status = match.group(1) if match else None
    return status


def _classify_plain_bounce(message: Message, text: str) -> InboundMessage:
    notification = _notification_text(message)
    pairs = _recipients_in_text(notification)

    # Exim and Gmail also list the failed recipients in X-Failed-Recipients.
    listed = {address.lower() for address, _ in pairs}
    response = _RESPONSE_WAS.split(notification, maxsplit=1)
    fallback = " ".join((response[-1] if len(response) > 1 else notification).split())
    for _, address in getaddresses([_header(message, "X-Failed-Recipients")]):
        if address and address.lower() not in listed:
            pairs.append((address, ""))
            listed.add(address.lower())

    original_message_id = _original_message_id(message, text)
    if not pairs:
        return InboundMessage(
            kind=InboundKind.SOFT_BOUNCE,
            subtype="unparsed-bounce",
            original_message_id=original_message_id,
            reason="looks like a bounce (sender or subject), but names no failed recipient",
        )

    recipients = []
    for address, diagnostic in pairs:
        # A recipient listed without its own text ("target mail address:", X-Failed-Recipients)
        # is classified by the whole notification, or by Gmail's "The response was:" part.
        diagnostic = diagnostic or fallback
        recipients.append(_failed_recipient(address, _status_in_text(diagnostic), diagnostic))
    return _bounce_message(recipients, original_message_id, "bounce notification")


# --- feedback reports (ARF) -------------------------------------------------------------------

# Feedback-Type values (RFC 5965 and RFC 6591) that are about the sender, not the recipient.
_SENDER_FEEDBACK = {
    "auth-failure": "dmarc-failure-report",
    "virus": "virus-report",
}


def _classify_feedback_report(message: Message, text: str) -> InboundMessage:
    report = _first_part(message, "message/feedback-report")
    fields: dict[str, str] = {}
    if report is not None:
        payload = _payload(report)
        if isinstance(payload, list):
            report_text = "\n".join(block.as_string() for block in payload)
        else:
            report_text = _part_text(report)
        for group in _field_groups(report_text):
            fields = {**group, **fields}
    feedback_type = fields.get("feedback-type", "").lower() or "unknown"
    addresses = [a for _, a in getaddresses([fields.get("original-rcpt-to", "")]) if a]
    original_message_id = _original_message_id(message, text)

    if feedback_type in _SENDER_FEEDBACK:
        # A DMARC failure report or a virus report is about the sender's mail, not a complaint by
        # the lead, so it is UNRELATED for the lead and sender_side marks it for a sender alert.
        subtype = _SENDER_FEEDBACK[feedback_type]
        kind = InboundKind.UNRELATED
        sender_side = True
        reason = f"feedback report of type {feedback_type}: a sender-side problem, not a complaint"
    elif feedback_type == "not-spam":
        subtype, kind, sender_side = "not-spam-report", InboundKind.UNRELATED, False
        reason = "feedback report of type not-spam"
    else:
        # With abuse, fraud, other and unknown types, the recipient objected to the message.
        subtype, kind, sender_side = "complaint", InboundKind.COMPLAINT, False
        reason = f"feedback report of type {feedback_type}: the recipient complained"

    recipients = tuple(
        FailedRecipient(
            address=address,
            status=None,
            reply_code=None,
            diagnostic=None,
            subtype=subtype,
            sender_side=sender_side,
        )
        for address in addresses
    )
    return InboundMessage(
        kind=kind,
        subtype=subtype,
        recipients=recipients,
        original_message_id=original_message_id,
        reason=reason,
    )


# --- auto-replies -----------------------------------------------------------------------------

_AUTO_REPLY_SUBJECT = re.compile(
    r"out of (the )?office|automatic reply|auto(matic)?[- ]?(reply|response)|autoreply"
    r"|abwesenheit|automatische antwort|r[ée]ponse automatique|absence du bureau"
    r"|respuesta autom[áa]tica|fuera de la oficina|risposta automatica|fuori sede"
    r"|afwezig|automatisch antwoord|^away\b|on (annual )?leave|on vacation|vacation reply",
    re.IGNORECASE,
)
_OUT_OF_OFFICE = re.compile(
    r"out of (the )?office|away (from|until)|on (annual )?leave|on vacation|abwesen"
    r"|absent|absence|fuera de la oficina|afwezig|returning|be back|r[ée]ponse automatique",
    re.IGNORECASE,
)
# Headers that Exchange, and bulk or list mail, also set on messages that are not auto-replies.
# They count only on a message that names a parent in In-Reply-To or References.
_WEAK_AUTO_HEADERS = ("X-Auto-Response-Suppress",)
_WEAK_PRECEDENCE = frozenset({"bulk", "junk", "list"})


def _auto_reply_signal(message: Message) -> str | None:
    """Name the header or subject that marks the message as an auto-reply, or return None."""
    auto_submitted = _header(message, "Auto-Submitted").split(";")[0].strip().lower()
    if auto_submitted and auto_submitted != "no":
        return f"Auto-Submitted: {auto_submitted}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Autoresponse"):
        if message.get(name) is not None:
            return name
    precedence = _header(message, "Precedence").lower()
    if precedence == "auto_reply":
        return "Precedence: auto_reply"
    subject = _header(message, "Subject")
    if _AUTO_REPLY_SUBJECT.search(subject):
        return f"subject {subject!r}"

    if _parent_message_id(message) is None:
        return None
    for name in _WEAK_AUTO_HEADERS:
        if message.get(name) is not None:
            return f"{name} on a reply"
    if precedence in _WEAK_PRECEDENCE:
        return f"Precedence: {precedence} on a reply"
    return None


def _classify_auto_reply(message: Message) -> InboundMessage | None:
    signal = _auto_reply_signal(message)
    if signal is None:
        return None

    subject = _header(message, "Subject")
    body = ""
    for part in _parts(message):
        if part.get_content_type() == "text/plain":
            body = _part_text(part)
            break
    out_of_office = bool(_OUT_OF_OFFICE.search(subject) or _OUT_OF_OFFICE.search(body))
    sent_at = _message_date(message)
    return_date = _return_date(f"{subject}\n{body}", sent_at) if sent_at else None

    _, address = parseaddr(_header(message, "From"))
    subtype = "out-of-office" if out_of_office else "auto-reply"
    recipients = ()
    if address:
        recipients = (
            FailedRecipient(
                address=address,
                status=None,
                reply_code=None,
                diagnostic=None,
                subtype=subtype,
                sender_side=False,
            ),
        )
    return InboundMessage(
        kind=InboundKind.AUTO_REPLY,
        subtype=subtype,
        recipients=recipients,
        original_message_id=_parent_message_id(message),
        return_date=return_date,
        reason=f"auto-reply marked by {signal}",
    )


def _message_date(message: Message) -> date | None:
    value = _header(message, "Date")
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).date()
    except (TypeError, ValueError, IndexError, OverflowError):
        # OverflowError: a UTC offset too large for timedelta, such as +99999999999999999999.
        return None


_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("jan", "january", "januar", "janvier", "enero"),
            ("feb", "february", "februar", "février", "fevrier", "febrero"),
            ("mar", "march", "märz", "maerz", "mars", "marzo"),
            ("apr", "april", "avril", "abril"),
            ("may", "mai", "mayo"),
            ("jun", "june", "juni", "juin", "junio"),
            ("jul", "july", "juli", "juillet", "julio"),
            ("aug", "august", "août", "aout", "agosto"),
            ("sep", "sept", "september", "septembre", "septiembre"),
            ("oct", "october", "oktober", "octobre", "octubre"),
            ("nov", "november", "novembre", "noviembre"),
            ("dec", "december", "dezember", "décembre", "decembre", "diciembre"),
        ),
        start=1,
    )
    for name in names
}
_MONTH = r"(?P<month>[A-Za-zäéû]{3,9})\.?"
_DAY = r"(?P<day>\d{1,2})(?:st|nd|rd|th|\.)?"
_YEAR = r"(?:,?\s+(?P<year>\d{4}))?"
# A date after a word that introduces a return: "until May 5", "back on 5 May 2024",
# "returning to the office on May 5th", "bis 05.06.2024", "until 2024-05-06".
_RETURN_CUE = (
    r"(?:until|till|back on|back|return(?:ing)?|returning to the office on|return on|bis|zurück"
    r"|retour le|jusqu'au)\b[^.\n]{0,40}?"
)
_RETURN_DATES = (
    re.compile(_RETURN_CUE + rf"\b{_MONTH}\s+{_DAY}{_YEAR}", re.IGNORECASE),
    re.compile(_RETURN_CUE + rf"\b{_DAY}\s+(?:of\s+)?{_MONTH}{_YEAR}", re.IGNORECASE),
    re.compile(_RETURN_CUE + r"\b(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})\b", re.I),
    re.compile(_RETURN_CUE + r"\b(?P<day>\d{1,2})\.(?P<month>\d{1,2})\.(?P<year>\d{4})?", re.I),
)


def _return_date(text: str, sent_at: date) -> date | None:
    """Read a stated return date. Without a year, take the first such date on or after the
    message's Date, so that "until January 5" sent in December means the next year.

    NOTE: best effort. Slash dates ("05/06") are skipped because their order is ambiguous.
    """
    for pattern in _RETURN_DATES:
        for match in pattern.finditer(text):
            month_text = match.group("month")
            month = int(month_text) if month_text.isdigit() else _MONTHS.get(month_text.lower())
            if month is None:
                continue
            day = int(match.group("day"))
            year_text = match.group("year")
            year = int(year_text) if year_text else sent_at.year
            try:
                found = date(year, month, day)
                if year_text is None and found < sent_at:
                    found = date(year + 1, month, day)
            except ValueError:
                continue
            return found
    return None
