from __future__ import annotations

import csv
from pathlib import Path

import pytest

from sequencer.smtp_replies import classify_smtp_reply, parse_enhanced_status

CORPUS_DIR = Path(__file__).resolve().parents[2] / "shared" / "corpus"
REPLIES_FILE = CORPUS_DIR / "smtp_replies.tsv"


def _corpus_rows() -> list[dict[str, str]]:
    if not REPLIES_FILE.is_file():
        return []
    with REPLIES_FILE.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _expected_kind(row: dict[str, str]) -> str:
    if row["class"] == "hard":
        return "hard"
    if row["expected_action"] == "SENDER_ALERT":
        return "sender"
    return "soft"


CORPUS_ROWS = _corpus_rows()
CORPUS_PARAMS = [pytest.param(row, id=row["id"]) for row in CORPUS_ROWS] or [
    pytest.param(
        None,
        marks=pytest.mark.skip(reason=f"SMTP reply corpus not found at {REPLIES_FILE}"),
        id="corpus-missing",
    )
]


@pytest.mark.parametrize("row", CORPUS_PARAMS)
def test_corpus_reply_kind_and_action(row: dict[str, str]) -> None:
    verdict = classify_smtp_reply(int(row["reply_code"]), row["reply_text"])

    assert verdict.kind == _expected_kind(row), row["notes"]
    assert verdict.action == row["expected_action"], row["notes"]


@pytest.mark.parametrize("row", CORPUS_PARAMS)
def test_corpus_enhanced_status_parsed(row: dict[str, str]) -> None:
    assert parse_enhanced_status(row["reply_text"]) == (row["enhanced_status"] or None)


@pytest.mark.parametrize(
    ("code", "text", "kind", "subtype"),
    [
        pytest.param(
            550,
            "550 5.1.1 <bounce@example.com>: Recipient address rejected: User unknown",
            "hard",
            "user-unknown",
            id="postfix-user-unknown",
        ),
        pytest.param(
            550,
            "5.1.1 The email account that you tried to reach does not exist.\n"
            "5.1.1 double-checking the recipient's email address",
            "hard",
            "user-unknown",
            id="aiosmtplib-joined-lines-without-code",
        ),
        pytest.param(
            550,
            "Requested action not taken: mailbox unavailable",
            "hard",
            "user-unknown",
            id="bare-550-mailbox-unavailable",
        ),
        pytest.param(
            550,
            "550 5.1.1 User unknown; not listed in Domino Directory",
            "hard",
            "user-unknown",
            id="not-listed-in-directory-is-not-blocklist",
        ),
        pytest.param(553, "553 sorry, that domain isn't in my list", "hard", None, id="bare-553"),
        pytest.param(
            556, "556 5.1.10 Recipient address has null MX", "hard", "bad-domain", id="null-mx"
        ),
        pytest.param(451, "451 4.7.1 Greylisted", "soft", "greylisted", id="greylisted-4.7.1"),
        pytest.param(
            421, "421 4.7.0 Try again later, closing connection.", "soft", None, id="gmail-421"
        ),
        pytest.param(
            552,
            "552 5.2.2 Mailbox size limit exceeded",
            "soft",
            "mailbox-full",
            id="mailbox-size-limit-is-not-message-size",
        ),
        pytest.param(
            552,
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "sender",
            "message-too-large",
            id="message-too-large",
        ),
        pytest.param(
            554,
            "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
            "sender",
            "blocked-blocklist",
            id="spamhaus-via-5.7.1",
        ),
        pytest.param(
            535,
            "535 5.7.8 Error: authentication failed: authentication failure",
            "sender",
            "smtp-auth-failure",
            id="smtp-auth-535",
        ),
        pytest.param(530, "530 Must issue a STARTTLS command first", "sender", None, id="bare-530"),
        pytest.param(
            554,
            "554 5.7.1 <ann@example.com>: Relay access denied",
            "sender",
            "relay-denied",
            id="relay-denied",
        ),
        pytest.param(
            553,
            "553 5.1.8 <me@nowhere.invalid>: Sender address rejected: Domain not found",
            "sender",
            "sender-address-rejected",
            id="sender-domain-not-found",
        ),
        pytest.param(
            550,
            "550 5.1.1 Postfix 2.10.1 says user unknown",
            "hard",
            "user-unknown",
            id="version-number-in-text",
        ),
    ],
)
def test_reply_classified(code: int, text: str, kind: str, subtype: str | None) -> None:
    verdict = classify_smtp_reply(code, text)

    assert verdict.kind == kind
    if subtype is not None:
        assert verdict.subtype == subtype


def test_success_code_rejected() -> None:
    with pytest.raises(ValueError, match="250"):
        classify_smtp_reply(250, "250 2.0.0 OK")


@pytest.mark.parametrize(
    ("text", "status"),
    [
        pytest.param("", None, id="empty"),
        pytest.param("550 : User unknown", None, id="no-enhanced-code"),
        pytest.param("550 User unknown, see 5.1.1 above", None, id="code-in-the-middle"),
        pytest.param("Server [192.0.2.25] version 5.1.1.3 ready", None, id="ip-and-version"),
        pytest.param("550-5.2.1 disabled\n550 5.2.1 see help", "5.2.1", id="multi-line"),
        pytest.param("4.2.0 try later", "4.2.0", id="without-reply-code"),
    ],
)
def test_enhanced_status_parsing(text: str, status: str | None) -> None:
    assert parse_enhanced_status(text) == status
