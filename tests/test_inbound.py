"""The inbound message classifier, against the bounce corpus and handcrafted messages."""

from __future__ import annotations

import csv
from collections import Counter
from datetime import date

import pytest

from activities.email import message_id_for
from sequencer.inbound import InboundKind, InboundMessage, classify_message
from tests.conftest import CORPUS

BOUNCES_DIR = CORPUS / "bounces"
INDEX_FILE = BOUNCES_DIR / "index.tsv"

# The kind each index class means. Rows of class not-a-bounce map by subtype.
KIND_OF_CLASS = {"hard": InboundKind.HARD_BOUNCE, "soft": InboundKind.SOFT_BOUNCE}
KIND_OF_SUBTYPE = {
    "delay-warning": InboundKind.DELAY_WARNING,
    "out-of-office": InboundKind.AUTO_REPLY,
    "complaint": InboundKind.COMPLAINT,
    "ordinary-message": InboundKind.UNRELATED,
    # A DMARC failure report is not a complaint by the lead, so it is UNRELATED with sender_side.
    "dmarc-failure-report": InboundKind.UNRELATED,
}

# Index subtypes that the classifier names differently, with the reason.
SUBTYPE_DIFFERENCES = {
    "lhost-postfix-06.eml": (
        "classify_smtp_reply names an unresolvable domain (5.4.4, 'Host not found') bad-domain, "
        "the index names it domain-not-found"
    ),
    "lhost-sendmail-10.eml": (
        "the classifier reports sender-host-rejected from the 4.7.1 'Client host rejected' "
        "reply, the index adds '-expired' for the queue expiry in the Status field (4.4.7)"
    ),
}


def _index_rows() -> list[dict[str, str]]:
    if not INDEX_FILE.is_file():
        return []
    with INDEX_FILE.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


INDEX_ROWS = _index_rows()
MISSING_CORPUS = pytest.param(
    None,
    marks=pytest.mark.skip(reason=f"bounce corpus not found at {INDEX_FILE}"),
    id="corpus-missing",
)
CORPUS_PARAMS = [pytest.param(row, id=row["file"]) for row in INDEX_ROWS] or [MISSING_CORPUS]
SUBTYPE_PARAMS = [
    pytest.param(
        row,
        id=row["file"],
        marks=(
            [pytest.mark.xfail(strict=True, reason=SUBTYPE_DIFFERENCES[row["file"]])]
            if row["file"] in SUBTYPE_DIFFERENCES
            else []
        ),
    )
    for row in INDEX_ROWS
] or [MISSING_CORPUS]


def _expected_kind(row: dict[str, str]) -> InboundKind:
    if row["class"] in KIND_OF_CLASS:
        return KIND_OF_CLASS[row["class"]]
    return KIND_OF_SUBTYPE[row["subtype"]]


def _split(value: str) -> list[str]:
    return [item for item in value.split(";") if item] if value else []


def _classify_file(row: dict[str, str]) -> InboundMessage:
    # Open read-only, as bytes, because the corpus files must stay byte-exact.
    return classify_message((BOUNCES_DIR / row["file"]).read_bytes())


@pytest.mark.parametrize("row", CORPUS_PARAMS)
def test_corpus_kind(row: dict[str, str]) -> None:
    verdict = _classify_file(row)

    assert verdict.kind == _expected_kind(row), f"{verdict.reason}; index notes: {row['notes']}"


@pytest.mark.parametrize("row", CORPUS_PARAMS)
def test_corpus_recipients(row: dict[str, str]) -> None:
    verdict = _classify_file(row)

    addresses = [recipient.address.lower() for recipient in verdict.recipients]
    assert addresses == [address.lower() for address in _split(row["recipient"])], row["notes"]


@pytest.mark.parametrize("row", CORPUS_PARAMS)
def test_corpus_status(row: dict[str, str]) -> None:
    if not row["status"]:
        pytest.skip("the index gives no status for this file")
    verdict = _classify_file(row)

    assert [recipient.status for recipient in verdict.recipients] == _split(row["status"])


@pytest.mark.parametrize("row", CORPUS_PARAMS)
def test_corpus_sender_side(row: dict[str, str]) -> None:
    verdict = _classify_file(row)

    expected = row["expected_action"] == "SENDER_ALERT"
    assert [r.sender_side for r in verdict.recipients] == [expected] * len(verdict.recipients)
    assert verdict.recipients or not expected, "a sender alert needs a recipient to carry it"


@pytest.mark.parametrize("row", SUBTYPE_PARAMS)
def test_corpus_subtype(row: dict[str, str]) -> None:
    verdict = _classify_file(row)

    assert verdict.subtype == row["subtype"], verdict.reason


@pytest.mark.parametrize("row", CORPUS_PARAMS)
def test_corpus_original_message_id(row: dict[str, str]) -> None:
    verdict = _classify_file(row)

    if verdict.kind in (InboundKind.UNRELATED, InboundKind.AUTO_REPLY) and not verdict.recipients:
        assert verdict.original_message_id is None
        return
    if row["file"] in ("lhost-exchange2003-01.eml", "lhost-office365-13.eml"):
        # Neither contains the original Message-ID, because Exchange 2003 quotes no headers and
        # the Office 365 report's message/rfc822 part has no Message-ID field.
        assert verdict.original_message_id is None
        return
    if verdict.kind == InboundKind.AUTO_REPLY:
        return  # the corpus auto-replies carry no In-Reply-To or References
    assert verdict.original_message_id is not None
    assert verdict.original_message_id.startswith("<")


def test_corpus_accuracy_per_class() -> None:
    if not INDEX_ROWS:
        pytest.skip(f"bounce corpus not found at {INDEX_FILE}")
    totals: Counter[str] = Counter()
    correct: Counter[str] = Counter()
    subtype_correct: Counter[str] = Counter()
    for row in INDEX_ROWS:
        verdict = _classify_file(row)
        totals[row["class"]] += 1
        correct[row["class"]] += verdict.kind == _expected_kind(row)
        subtype_correct[row["class"]] += verdict.subtype == row["subtype"]

    print()
    for name in sorted(totals):
        print(
            f"{name:>13}: kind {correct[name]}/{totals[name]}, "
            f"subtype {subtype_correct[name]}/{totals[name]}"
        )
    assert correct == totals


def test_dmarc_report_not_complaint() -> None:
    if not INDEX_ROWS:
        pytest.skip(f"bounce corpus not found at {INDEX_FILE}")
    verdict = classify_message((BOUNCES_DIR / "arf-18.eml").read_bytes())

    assert verdict.kind == InboundKind.UNRELATED
    assert verdict.subtype == "dmarc-failure-report"
    assert verdict.recipients[0].sender_side


def test_corpus_out_of_office_return_date() -> None:
    if not INDEX_ROWS:
        pytest.skip(f"bounce corpus not found at {INDEX_FILE}")
    verdict = classify_message((BOUNCES_DIR / "rfc3834-01.eml").read_bytes())

    # "returning to the office on May 5th", in a message dated 29 April 2005.
    assert verdict.return_date == date(2005, 5, 5)


# --- handcrafted messages ---------------------------------------------------------------------

ENGINE_ID = message_id_for("spring", "lead@example.org", 1, "alice@sender.example")


def _raw(headers: str, body: str = "Hello.\n") -> bytes:
    return (headers.strip() + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")


def test_human_reply_threaded_by_in_reply_to() -> None:
    raw = _raw(
        f"""
From: Lead <lead@example.org>
To: Alice <alice@sender.example>
Subject: Re: Quick question
Date: Tue, 14 May 2024 10:00:00 +0000
Message-ID: <reply-1@example.org>
In-Reply-To: {ENGINE_ID}
References: {ENGINE_ID}
""",
        "Sounds good, let's talk on Thursday.\n",
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.HUMAN_REPLY
    assert verdict.original_message_id == ENGINE_ID
    assert verdict.recipients == ()


def test_reply_uses_last_reference() -> None:
    first = message_id_for("spring", "lead@example.org", 1, "alice@sender.example")
    second = message_id_for("spring", "lead@example.org", 2, "alice@sender.example")
    raw = _raw(
        f"""
From: lead@example.org
To: alice@sender.example
Subject: Re: Following up
References: {first} {second}
"""
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.HUMAN_REPLY
    assert verdict.original_message_id == second


def test_auto_submitted_auto_reply() -> None:
    raw = _raw(
        f"""
From: Lead <lead@example.org>
To: alice@sender.example
Subject: Out of Office: Quick question
Date: Fri, 20 Dec 2024 09:00:00 +0100
Auto-Submitted: auto-replied
In-Reply-To: {ENGINE_ID}
""",
        "I am away until January 6 with no access to email.\n",
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.AUTO_REPLY
    assert verdict.subtype == "out-of-office"
    assert verdict.original_message_id == ENGINE_ID
    assert [r.address for r in verdict.recipients] == ["lead@example.org"]
    # No year is given, so the first 6 January after the message's Date: the next year.
    assert verdict.return_date == date(2025, 1, 6)


def test_auto_submitted_no_is_a_human_reply() -> None:
    raw = _raw(
        f"""
From: lead@example.org
To: alice@sender.example
Subject: Re: Quick question
Auto-Submitted: no
In-Reply-To: {ENGINE_ID}
"""
    )

    assert classify_message(raw).kind == InboundKind.HUMAN_REPLY


def test_german_subject_auto_reply() -> None:
    raw = _raw(
        """
From: lead@example.de
To: alice@sender.example
Subject: =?utf-8?q?Abwesenheitsnotiz=3A_Kurze_Frage?=
Date: Mon, 05 Aug 2024 08:00:00 +0200
""",
        "Ich bin bis 19.08.2024 nicht im Büro.\n",
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.AUTO_REPLY
    assert verdict.return_date == date(2024, 8, 19)


def test_bulk_mail_without_thread_is_unrelated() -> None:
    raw = _raw(
        """
From: news@vendor.example
To: alice@sender.example
Subject: Our May newsletter
Precedence: bulk
"""
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.UNRELATED
    assert verdict.subtype == "ordinary-message"


def test_plain_message_is_unrelated() -> None:
    raw = _raw(
        """
From: someone@example.net
To: alice@sender.example
Subject: Partnership idea
Date: Tue, 14 May 2024 10:00:00 +0000
Message-ID: <idea-1@example.net>
"""
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.UNRELATED
    assert verdict.original_message_id is None
    assert verdict.recipients == ()


def test_dsn_keeps_failed_recipients_only() -> None:
    raw = _raw(
        """
From: MAILER-DAEMON@mx.sender.example
To: alice@sender.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"
""",
        f"""--b
Content-Type: text/plain

Delivery failed for one recipient.

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.example

Final-Recipient: rfc822; ok@example.org
Action: delivered
Status: 2.0.0

Final-Recipient: rfc822; gone@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown

--b
Content-Type: text/rfc822-headers

From: alice@sender.example
To: gone@example.org
Message-ID: {ENGINE_ID}

--b--
""",
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.HARD_BOUNCE
    assert [r.address for r in verdict.recipients] == ["gone@example.org"]
    assert verdict.recipients[0].reply_code == 550
    assert verdict.recipients[0].subtype == "user-unknown"
    assert verdict.original_message_id == ENGINE_ID


def test_dsn_blocklist_is_sender_side_soft() -> None:
    raw = _raw(
        """
From: MAILER-DAEMON@mx.sender.example
To: alice@sender.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"
""",
        """--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.example

Final-Recipient: rfc822; lead@example.org
Action: failed
Status: 5.7.1
Diagnostic-Code: smtp; 554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked
    using zen.spamhaus.org

--b--
""",
    )

    verdict = classify_message(raw)

    assert verdict.kind == InboundKind.SOFT_BOUNCE
    assert verdict.subtype == "blocked-blocklist"
    assert verdict.recipients[0].sender_side


def test_empty_message_is_unrelated() -> None:
    assert classify_message(b"").kind == InboundKind.UNRELATED


def test_undecodable_bytes_do_not_raise() -> None:
    raw = b"From: \xff\xfe@example.org\r\nSubject: =?bogus?q?x?=\r\n\r\n\xff\xff\r\n"

    assert classify_message(raw).kind == InboundKind.UNRELATED
