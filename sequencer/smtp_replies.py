"""Classify the failure replies of an SMTP server into what the engine does next.

    hard    the recipient address is bad (user unknown, account disabled, moved): STOP_EMAIL
    soft    a condition that may pass (a 4xx reply, a full mailbox, a recipient receiving too
            much mail, greylisting): RETRY_LATER
    sender  the sending side is at fault (blocklisted IP, SPF/DKIM/DMARC failure, content
            rejected as spam, a malformed or oversized message, bad credentials): SENDER_ALERT.
            This includes 4xx replies that blame the sender, such as Microsoft's 4.7.650
            deferral of a sending IP with a poor reputation.

The enhanced status code (RFC 3463, `X.Y.Z`) is read from the reply text. Phrases in the text
win over the codes, because servers reuse codes loosely. Gmail sends 5.2.1 both for a disabled
account and for a recipient receiving mail too fast. Some servers send 5.1.0 when the sender's
domain is listed by Spamhaus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ReplyKind = Literal["hard", "soft", "sender"]
ReplyAction = Literal["STOP_EMAIL", "RETRY_LATER", "SENDER_ALERT"]

ACTION_OF: dict[ReplyKind, ReplyAction] = {
    "hard": "STOP_EMAIL",
    "soft": "RETRY_LATER",
    "sender": "SENDER_ALERT",
}


@dataclass(frozen=True)
class SmtpReplyClass:
    """The verdict on one SMTP failure reply. `subtype` is a short kebab-case cause."""

    kind: ReplyKind
    subtype: str
    action: ReplyAction


# An enhanced status code at the start of a line or right after a reply code ("550 5.1.1",
# "550-5.1.1"), so that version numbers or IP addresses later in the text are not taken for one.
_ENHANCED_STATUS = re.compile(
    r"(?:^|(?<=\d\d\d[ -]))\s*([245]\.\d{1,3}\.\d{1,3})(?![\d.]*\d)", re.MULTILINE
)
# The "550-5.1.1 " prefixes that multi-line replies repeat on every line, even when unfolded.
_LINE_PREFIX = re.compile(
    r"(?:^|(?<=\s))[245]\d\d(?:-|\s(?=[245]\.\d))(?:[245]\.\d{1,3}\.\d{1,3}\s)?"
    r"|^\s*[245]\d\d\s"
    r"|^\s*[245]\.\d{1,3}\.\d{1,3}\s",
    re.MULTILINE,
)


@dataclass(frozen=True)
class _Rule:
    subtype: str
    codes: frozenset[str] = frozenset()
    text: re.Pattern[str] | None = None

    def matches(self, status: str | None, text: str) -> bool:
        if status is not None and status in self.codes:
            return True
        return self.text is not None and self.text.search(text) is not None


def _phrases(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_GREYLISTED = _Rule("greylisted", text=_phrases(r"grey ?list|gray ?list"))

# Conditions of the recipient's mailbox that pass with time, even when sent with a 5xx code.
_TEMPORARY_RECIPIENT_RULES = (
    _Rule(
        "mailbox-full",
        frozenset({"4.2.2", "5.2.2"}),
        _phrases(
            r"mailbox (is )?full|quota|out of storage|storage (space|allocation)"
            r"|insufficient storage|mailbox size limit|mailbox is over"
        ),
    ),
    _Rule(
        "recipient-rate-limited",
        text=_phrases(r"receiving mail (at a rate|too quickly)|receiving too much mail"),
    ),
)

# Problems of the sending side: its IP or domain, its authentication, its message, its account.
_SENDER_RULES = (
    _Rule(
        "sender-auth-failure",
        # 5.7.20 to 5.7.26 report failed DKIM, SPF or reverse DNS checks. Gmail defers
        # unauthenticated mail with 4.7.26, and Microsoft rejects it with 5.7.509 (DMARC) and
        # 5.7.515 (authentication level).
        frozenset({f"5.7.{n}" for n in range(20, 27)} | {"5.7.509", "5.7.515", "4.7.26"}),
        _phrases(r"\b(spf|dkim|dmarc)\b|unauthenticated|sender is not authenticated"),
    ),
    _Rule(
        "sender-reverse-dns",
        text=_phrases(
            r"reverse (dns|hostname|lookup)|\bptr\b|cannot find your (reverse )?hostname"
        ),
    ),
    _Rule(
        "blocked-blocklist",
        # Microsoft 5.7.606 to 5.7.649: access denied, banned sending IP.
        frozenset({f"5.7.{n}" for n in range(606, 650)} | {"5.7.511"}),
        _phrases(
            r"black ?list|block ?list|blocked using|spamhaus|spamcop|\bsorbs\b|\bdnsbl\b|\brbl\b"
            r"|banned sending|\b(ip|address|domain|host|sender) (is |was |has been )?listed\b"
        ),
    ),
    _Rule(
        "sender-reputation-deferral",
        # Microsoft rate-limits a sending IP with a poor reputation with 4.7.650 and 4.7.651.
        # Gmail sends 4.7.28 and 5.7.28 for an unusual rate of unsolicited mail.
        frozenset({"4.7.650", "4.7.651", "4.7.28", "5.7.28"}),
        _phrases(r"reputation|unusual rate|unexpected volume|user complaints"),
    ),
    _Rule(
        "message-not-rfc5322",
        frozenset({f"5.6.{n}" for n in range(10)}),
        _phrases(
            r"rfc ?(5322|2822|822)|malformed|non-?compliant|not compliant|duplicate header"
            r"|multiple \S+ headers|bare (lf|linefeed)"
        ),
    ),
    _Rule(
        "message-too-large",
        frozenset({"5.2.3", "5.3.4", "4.3.4"}),
        _phrases(r"too (large|big)|(message|mail) size|exceeds? (the )?(maximum|size)"),
    ),
    _Rule(
        "content-rejected-spam",
        text=_phrases(r"\bspam\b|content (rejected|filter)|message content|phish|virus|malware"),
    ),
    _Rule(
        "sender-address-rejected",
        # RFC 3463 5.1.7 and 5.1.8 report a bad sender mailbox or domain.
        frozenset({"5.1.7", "5.1.8"}),
        _phrases(r"sender address rejected|sender (domain|address) (does not exist|unknown)"),
    ),
    _Rule(
        "relay-denied",
        text=_phrases(r"relay(ing)? (access )?(denied|not permitted|prohibited)|unable to relay"),
    ),
    _Rule(
        "smtp-auth-failure",
        frozenset({"5.7.8"}),  # authentication credentials invalid
        _phrases(
            r"authentication (required|credentials|failed|unsuccessful)"
            r"|(username|password) (and password )?(not accepted|incorrect|invalid)"
        ),
    ),
)

# The recipient address is bad: the step fails and the address is unsubscribed.
_HARD_RULES = (
    _Rule(
        "user-unknown",
        frozenset({"5.1.1", "5.1.3"}),
        _phrases(
            r"user unknown|unknown (user|recipient)|recipient unknown|no such (user|recipient"
            r"|mailbox|account|address)|does not exist|doesn't exist|(user|recipient|mailbox) not"
            r" found|recipnotfound|invalid (recipient|mailbox|address|user)|mailbox unavailable"
            r"|inactive (email )?(address|account|mailbox|user)|recipient address rejected"
            r"|address rejected|no mailbox here"
        ),
    ),
    _Rule(
        "account-disabled",
        frozenset({"5.2.1", "5.7.13"}),
        _phrases(
            r"(account|mailbox|user|address|recipient)( \S+)? (is |has been )?(disabled"
            r"|deactivated|suspended|closed|inactive)|disabled (recipient|user|account)"
        ),
    ),
    _Rule(
        "recipient-moved",
        # 5.1.6 is a mailbox that has moved, and 5.7.17 and 5.7.18 report a new mailbox or
        # domain owner.
        frozenset({"5.1.6", "5.7.17", "5.7.18"}),
        _phrases(
            r"not our (user|customer)|no longer (exists|active|valid|available|here)"
            r"|(user|mailbox|address|recipient) (has )?moved"
        ),
    ),
    _Rule(
        "bad-domain",
        # 5.1.2 is a bad destination system, 5.4.4 a domain that cannot be routed to and 5.1.10
        # a domain that publishes a null MX record.
        frozenset({"5.1.2", "5.1.10", "5.4.4"}),
        _phrases(r"domain (not found|does not exist)|host (not found|unknown)|null mx"),
    ),
)

# Verdicts for 5xx reply codes that come without an enhanced status code or a telling phrase.
_HARD_REPLY_CODES = {
    551: "recipient-moved",  # user not local
    553: "mailbox-name-not-allowed",
    521: "domain-does-not-accept-mail",
    556: "domain-does-not-accept-mail",
    525: "account-disabled",  # sent with 5.7.13, user account disabled
}
_SENDER_REPLY_CODES = {
    530: "smtp-auth-failure",  # authentication required
    534: "smtp-auth-failure",  # authentication mechanism too weak
    535: "smtp-auth-failure",  # authentication credentials invalid
    538: "smtp-auth-failure",  # encryption required for the authentication mechanism
    554: "transaction-failed",  # usually a policy refusal of the connection or the message
}
_POLICY = _phrases(r"polic(y|ies)|prohibited|not (permitted|authorized|allowed)|administrative")


def parse_enhanced_status(text: str) -> str | None:
    """Return the first enhanced status code (`5.1.1`) of a reply, or None when it has none."""
    match = _ENHANCED_STATUS.search(text)
    return match.group(1) if match else None


def _plain_text(text: str) -> str:
    """Drop the code prefixes that multi-line replies repeat, so phrases read as one sentence."""
    text = _LINE_PREFIX.sub(" ", text)
    return " ".join(text.split())


def classify_smtp_reply(code: int, text: str) -> SmtpReplyClass:
    """Classify a 4xx or 5xx SMTP reply, given its code and text (with or without the code).

    Raises ValueError for codes outside 400 to 599, which are not failures.
    """
    if not 400 <= code <= 599:
        raise ValueError(
            f"invalid SMTP failure reply code {code}: only 4xx and 5xx replies can be classified"
        )
    status = parse_enhanced_status(text)
    if status is not None and status.startswith("2."):
        status = None
    plain = _plain_text(text)
    kind, subtype = _classify(code, status, plain)
    return SmtpReplyClass(kind=kind, subtype=subtype, action=ACTION_OF[kind])


def _classify(code: int, status: str | None, text: str) -> tuple[ReplyKind, str]:
    if _GREYLISTED.matches(status, text):
        return "soft", _GREYLISTED.subtype
    for rule in _TEMPORARY_RECIPIENT_RULES:
        if rule.matches(status, text):
            return "soft", rule.subtype
    for rule in _SENDER_RULES:
        if rule.matches(status, text):
            return "sender", rule.subtype

    # The enhanced code's class wins over the reply code: "554 4.4.7 Message expired" is
    # temporary.
    temporary = status.startswith("4.") if status is not None else code < 500
    if temporary:
        return "soft", _temporary_subtype(code, status, text)

    for rule in _HARD_RULES:
        if rule.matches(status, text):
            return "hard", rule.subtype
    return _classify_unmatched_permanent(code, status, text)


def _temporary_subtype(code: int, status: str | None, text: str) -> str:
    if (status is not None and status.endswith(".4.7")) or re.search(r"expired", text, re.I):
        return "expired"
    if status in ("4.3.1", "4.4.5") or re.search(
        r"insufficient (disk|system) (space|storage)", text, re.I
    ):
        return "remote-system-full"
    if code == 421:
        return "service-unavailable"
    if re.search(r"rate limit|too many", text, re.I):
        return "rate-limited"
    return "temporary-failure"


def _classify_unmatched_permanent(
    code: int, status: str | None, text: str
) -> tuple[ReplyKind, str]:
    """Classify a 5xx reply that no rule matched, by the subject of its enhanced code or its
    reply code.

    An unclear mailbox or system status is soft: retries end in a failed step anyway, and a
    hard verdict would unsubscribe an address that may be valid.
    """
    if status is not None:
        subject = status.split(".")[1]
        if subject == "1":
            return "hard", "bad-address"
        if subject in ("5", "6", "7"):
            # Protocol, message content and security policy: the sender must fix something.
            return "sender", {"5": "protocol-error", "6": "message-not-rfc5322"}.get(
                subject, "policy-rejected"
            )
        return "soft", "mailbox-or-system-status"

    if code in _HARD_REPLY_CODES:
        return "hard", _HARD_REPLY_CODES[code]
    if code in _SENDER_REPLY_CODES:
        return "sender", _SENDER_REPLY_CODES[code]
    if 500 <= code <= 504:
        return "sender", "protocol-error"
    if code == 552:
        return "soft", "mailbox-full"  # RFC 5321: exceeded storage allocation
    if _POLICY.search(text):
        return "sender", "policy-rejected"
    return "soft", "unclassified-permanent"
