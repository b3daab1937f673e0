"""Email provider webhooks: parsing of the shared corpus, request verification, the FastAPI
routes, and one bounce applied by the engine on the time-skipping server.

Every key, certificate and signature is made by the tests. SNS certificate downloads and
subscription confirmations go to a recording `fetch` function, so no request leaves the
machine, and the app is called in process through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from activities.email import EmailActivities, message_id_for
from activities.records import StoreActivities
from sequencer.config import load_settings
from sequencer.inbound import InboundKind, InboundMessage
from sequencer.provider_webhooks import (
    MAILGUN,
    POSTMARK,
    SENDGRID,
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    SES,
    InvalidPayload,
    MailEvent,
    MailgunWebhook,
    PostmarkWebhook,
    SendGridWebhook,
    SesWebhook,
    VerificationFailed,
    check_sns_url,
    decode_json,
    is_sns_envelope,
    parse_mailgun_event,
    parse_postmark_event,
    parse_sendgrid_events,
    parse_ses_notification,
    parse_sns_envelope,
    ses_events_from_envelope,
)
from sequencer.service import Sequencer
from sequencer.simulate import SimulatedChannels
from sequencer.smtp_sink import SmtpSink, read_mailbox
from sequencer.temporal import lead_worker
from sequencer.webhooks import (
    MAIL_MAX_BODY_BYTES,
    POSTMARK_CHALLENGE,
    create_webhook_app,
    mail_webhooks_from_settings,
)
from tests.conftest import CORPUS

WEBHOOKS_DIR = CORPUS / "webhooks"
TOPIC = "arn:aws:sns:us-west-2:123456789012:ses-feedback"
CERT_URL = "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-test.pem"
SUBSCRIBE_URL = "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&TopicArn=" + TOPIC
MAILGUN_KEY = "key-test-mailgun-signing"
MAILGUN_NOW = 1767225600
POSTMARK_USER = "postmark-hook"
POSTMARK_PASSWORD = "s3cret-postmark-password"
FINAL = {"completed", "stopped", "replied", "removed"}

# The engine's kinds that each (expected_class, expected_action) of the corpus allows.
EXPECTED_KINDS = {
    ("hard", "STOP_EMAIL"): {InboundKind.HARD_BOUNCE},
    ("soft", "RETRY_LATER"): {InboundKind.SOFT_BOUNCE, InboundKind.DELAY_WARNING},
    ("soft", "SENDER_ALERT"): {InboundKind.SOFT_BOUNCE},
    ("not-a-bounce", "UNSUBSCRIBE"): {InboundKind.COMPLAINT},
    ("not-a-bounce", "OOO"): {InboundKind.AUTO_REPLY},
    ("not-a-bounce", "IGNORE"): {InboundKind.UNRELATED},
}


# --- corpus -----------------------------------------------------------------------------------


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _corpus_params() -> list[Any]:
    params = []
    for row in _tsv_rows(WEBHOOKS_DIR / "amazonses" / "index.tsv"):
        params.append(pytest.param("amazonses", row["file"], row, id=f"ses-{row['file']}"))
    for row in _tsv_rows(WEBHOOKS_DIR / "sendgrid" / "expected.tsv"):
        params.append(pytest.param("sendgrid", row["index"], row, id=f"sendgrid-{row['index']}"))
    for provider in ("mailgun", "postmark"):
        for row in _tsv_rows(WEBHOOKS_DIR / provider / "expected.tsv"):
            if row["file"].endswith(".json"):
                params.append(
                    pytest.param(provider, row["file"], row, id=f"{provider}-{row['file']}")
                )
    if not params:
        reason = f"webhook corpus not found at {WEBHOOKS_DIR}"
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason=reason), id="missing")]
    return params


def _read_corpus(provider: str, name: str) -> bytes:
    if provider == "sendgrid":
        name = "event-batch-bounce-blocked-dropped-spamreport.json"
    return (WEBHOOKS_DIR / provider / name).read_bytes()


def _corpus_events(provider: str, name: str) -> list[MailEvent]:
    body = _read_corpus(provider, name)
    if provider == "amazonses":
        payload = decode_json(body, SES)
        if is_sns_envelope(payload):
            return ses_events_from_envelope(parse_sns_envelope(payload))
        return parse_ses_notification(payload)
    if provider == "sendgrid":
        return [parse_sendgrid_events(decode_json(body, SENDGRID))[int(name)]]
    if provider == "mailgun":
        return parse_mailgun_event(decode_json(body, MAILGUN))
    return parse_postmark_event(decode_json(body, POSTMARK))


@pytest.mark.parametrize(("provider", "name", "row"), _corpus_params())
def test_corpus_event_kind(provider: str, name: str, row: dict[str, str]) -> None:
    events = _corpus_events(provider, name)
    expected = EXPECTED_KINDS[(row["expected_class"], row["expected_action"])]
    assert len(events) == 1
    assert events[0].message.kind in expected


@pytest.mark.parametrize(("provider", "name", "row"), _corpus_params())
def test_corpus_event_recipient(provider: str, name: str, row: dict[str, str]) -> None:
    message = _corpus_events(provider, name)[0].message
    expected = row.get("recipient") or row.get("email")
    if row["expected_action"] == "IGNORE":
        assert message.recipients == ()
    else:
        assert [r.address for r in message.recipients] == [expected]


@pytest.mark.parametrize(("provider", "name", "row"), _corpus_params())
def test_corpus_event_sender_side(provider: str, name: str, row: dict[str, str]) -> None:
    message = _corpus_events(provider, name)[0].message
    sender_side = any(r.sender_side for r in message.recipients)
    assert sender_side == (row["expected_action"] == "SENDER_ALERT")


@pytest.mark.parametrize(("provider", "name", "row"), _corpus_params())
def test_corpus_event_key(provider: str, name: str, row: dict[str, str]) -> None:
    event = _corpus_events(provider, name)[0]
    prefix = {"amazonses": "ses:"}.get(provider, f"{provider}:")
    assert event.key.startswith(prefix)
    assert event.source.split()[0] in (provider, "ses")


def _skip_without_corpus() -> None:
    if not WEBHOOKS_DIR.is_dir():
        pytest.skip(f"webhook corpus not found at {WEBHOOKS_DIR}")


def test_sendgrid_corpus_keys_and_details() -> None:
    _skip_without_corpus()
    events = _corpus_events("sendgrid", "0") + _corpus_events("sendgrid", "2")
    batch = parse_sendgrid_events(decode_json(_read_corpus("sendgrid", "0"), SENDGRID))
    assert [e.key for e in batch] == [f"sendgrid:synthetic-event-000{i}" for i in range(1, 6)]
    first = events[0].message
    assert first.original_message_id == "<synthetic-1@example.net>"
    assert first.recipients[0].status == "5.1.1"
    assert first.recipients[0].reply_code == 550
    assert first.subtype == "user-unknown"
    assert events[1].message.kind == InboundKind.DELAY_WARNING
    assert batch[1].message.subtype == "blocked-blocklist"
    assert batch[3].message.kind == InboundKind.HARD_BOUNCE


def test_mailgun_corpus_message_id_bracketed() -> None:
    _skip_without_corpus()
    message = _corpus_events("mailgun", "failed-permanent.json")[0].message
    assert message.original_message_id == "<synthetic.20260101000000.1@mg.example.net>"
    assert message.recipients[0].status == "5.1.1"
    assert message.recipients[0].reply_code == 550


def test_postmark_autoresponder_is_not_bounce() -> None:
    _skip_without_corpus()
    message = _corpus_events("postmark", "bounce-autoresponder.json")[0].message
    assert message.kind == InboundKind.AUTO_REPLY
    assert message.subtype in ("out-of-office", "auto-reply")
    assert message.recipients[0].address == "lead.two@example.org"


def test_ses_corpus_envelope_keyed_by_sns_id() -> None:
    _skip_without_corpus()
    event = _corpus_events("amazonses", "json-amazonses-02.json")[0]
    assert event.key == "ses:02f86d9b-eecf-573d-b47d-3d1850750c30"
    assert event.message.recipients[0].diagnostic == "smtp; 550 5.1.1 user unknown"


def test_ses_corpus_message_id_from_headers() -> None:
    _skip_without_corpus()
    message = _corpus_events("amazonses", "json-amazonses-06.json")[0].message
    assert message.original_message_id == "<xxx.xx@xx..x>"


@pytest.mark.parametrize(
    "name", ["failed-permanent.json", "failed-temporary.json", "complained.json"]
)
def test_mailgun_corpus_signatures_rejected(name: str) -> None:
    _skip_without_corpus()
    payload = decode_json(_read_corpus("mailgun", name), MAILGUN)
    timestamp = int(payload["signature"]["timestamp"])
    webhook = MailgunWebhook(MAILGUN_KEY, clock=lambda: float(timestamp))
    with pytest.raises(VerificationFailed, match="does not match"):
        webhook.verify(payload)


# --- parsing rules ----------------------------------------------------------------------------


def _ses_bounce(recipients: list[dict[str, str]], bounce_type: str = "Permanent") -> dict:
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": recipients,
            "feedbackId": "feedback-1",
        },
        "mail": {
            "messageId": "ses-message-1",
            "headers": [{"name": "Message-ID", "value": "<camp.0123456789abcdef.1@acme.test>"}],
        },
    }


def test_ses_several_recipients_keyed_apart() -> None:
    notification = _ses_bounce(
        [
            {"emailAddress": "Ann@example.com", "status": "5.1.1", "diagnosticCode": "smtp; 550"},
            {"emailAddress": "bob@example.com", "status": "5.1.1", "diagnosticCode": "smtp; 550"},
        ]
    )
    events = parse_ses_notification(notification, sns_message_id="sns-1")
    assert [e.key for e in events] == ["ses:sns-1:ann@example.com", "ses:sns-1:bob@example.com"]
    assert events[0].message.original_message_id == "<camp.0123456789abcdef.1@acme.test>"


def test_ses_permanent_mailbox_full_is_soft() -> None:
    notification = _ses_bounce(
        [{"emailAddress": "ann@example.com", "diagnosticCode": "smtp; 552 5.2.2 mailbox full"}]
    )
    message = parse_ses_notification(notification)[0].message
    assert message.kind == InboundKind.SOFT_BOUNCE
    assert message.subtype == "mailbox-full"


def test_ses_permanent_expired_is_soft() -> None:
    diagnostic = "smtp; 451 4.4.7 Message expired in queue"
    notification = _ses_bounce([{"emailAddress": "ann@example.com", "diagnosticCode": diagnostic}])
    message = parse_ses_notification(notification)[0].message
    assert message.kind == InboundKind.SOFT_BOUNCE
    assert message.subtype == "expired"


def test_ses_permanent_unclear_reply_is_hard() -> None:
    diagnostic = "smtp; 550 Message rejected"
    notification = _ses_bounce([{"emailAddress": "ann@example.com", "diagnosticCode": diagnostic}])
    message = parse_ses_notification(notification)[0].message
    assert message.kind == InboundKind.HARD_BOUNCE
    assert message.recipients[0].reply_code == 550


def test_ses_permanent_blocklist_is_sender_side() -> None:
    diagnostic = "smtp; 550 5.7.1 Service unavailable; client host blocked using Spamhaus"
    notification = _ses_bounce([{"emailAddress": "ann@example.com", "diagnosticCode": diagnostic}])
    message = parse_ses_notification(notification)[0].message
    assert message.kind == InboundKind.SOFT_BOUNCE
    assert message.recipients[0].sender_side is True


def test_ses_transient_bounce_is_soft() -> None:
    notification = _ses_bounce([{"emailAddress": "ann@example.com"}], bounce_type="Transient")
    message = parse_ses_notification(notification)[0].message
    assert message.kind == InboundKind.SOFT_BOUNCE
    assert message.subtype == "temporary-failure"


def test_ses_delivery_delay_is_warning() -> None:
    notification = {
        "eventType": "DeliveryDelay",
        "mail": {"messageId": "ses-message-2"},
        "deliveryDelay": {
            "delayType": "TransientCommunicationFailure",
            "delayedRecipients": [
                {"emailAddress": "ann@example.com", "diagnosticCode": "smtp; 421 4.4.2 timeout"}
            ],
        },
    }
    message = parse_ses_notification(notification)[0].message
    assert message.kind == InboundKind.DELAY_WARNING
    assert message.recipients[0].sender_side is False


def test_ses_not_spam_complaint_ignored() -> None:
    notification = {
        "notificationType": "Complaint",
        "mail": {"messageId": "ses-message-3"},
        "complaint": {
            "complainedRecipients": [{"emailAddress": "ann@example.com"}],
            "complaintFeedbackType": "not-spam",
        },
    }
    assert parse_ses_notification(notification)[0].message.kind == InboundKind.UNRELATED


def test_ses_missing_recipient_names_field() -> None:
    notification = _ses_bounce([{"status": "5.1.1"}])
    with pytest.raises(InvalidPayload, match=r"Amazon SES webhook: .*emailAddress is missing"):
        parse_ses_notification(notification)


def test_ses_wrong_type_names_field() -> None:
    notification = _ses_bounce([{"emailAddress": 42}])
    with pytest.raises(
        InvalidPayload, match=r"bouncedRecipients\[0\]\.emailAddress must be a string"
    ):
        parse_ses_notification(notification)


def test_sendgrid_blocked_is_sender_side() -> None:
    event = {
        "email": "ann@example.com",
        "event": "bounce",
        "type": "blocked",
        "reason": "550 5.1.1 user unknown",
        "sg_event_id": "evt-blocked",
    }
    message = parse_sendgrid_events([event])[0].message
    assert message.kind == InboundKind.SOFT_BOUNCE
    assert message.recipients[0].sender_side is True


def test_sendgrid_open_event_ignored() -> None:
    events = parse_sendgrid_events([{"event": "open", "email": "ann@example.com"}])
    assert events[0].message.kind == InboundKind.UNRELATED


def test_sendgrid_missing_event_id_named() -> None:
    event = {"email": "ann@example.com", "event": "bounce"}
    with pytest.raises(InvalidPayload, match=r"SendGrid webhook: \[0\]\.sg_event_id is missing"):
        parse_sendgrid_events([event])


def test_sendgrid_body_must_be_array() -> None:
    with pytest.raises(InvalidPayload, match="must be a JSON array of events, not object"):
        parse_sendgrid_events({"event": "bounce"})


def test_mailgun_key_falls_back_to_token() -> None:
    payload = {
        "signature": {"timestamp": "1", "token": "token-abc", "signature": "00"},
        "event-data": {"event": "complained", "recipient": "ann@example.com"},
    }
    assert parse_mailgun_event(payload)[0].key == "mailgun:token-abc"


def test_mailgun_non_smtp_code_tolerated() -> None:
    payload = {
        "event-data": {
            "id": "evt-605",
            "event": "failed",
            "severity": "permanent",
            "recipient": "ann@example.com",
            "delivery-status": {
                "code": 605,
                "message": "Not delivering to previously bounced address",
            },
        }
    }
    message = parse_mailgun_event(payload)[0].message
    assert message.kind == InboundKind.HARD_BOUNCE
    assert message.recipients[0].reply_code is None


def test_mailgun_unknown_severity_rejected() -> None:
    payload = {
        "event-data": {
            "id": "evt-x",
            "event": "failed",
            "severity": "maybe",
            "recipient": "ann@example.com",
        }
    }
    with pytest.raises(InvalidPayload, match="Mailgun webhook: event-data.severity 'maybe'"):
        parse_mailgun_event(payload)


@pytest.mark.parametrize(
    ("bounce_type", "kind", "sender_side"),
    [
        ("HardBounce", InboundKind.HARD_BOUNCE, False),
        ("Transient", InboundKind.SOFT_BOUNCE, False),
        ("Blocked", InboundKind.SOFT_BOUNCE, True),
        ("DMARCPolicy", InboundKind.SOFT_BOUNCE, True),
        ("SpamComplaint", InboundKind.COMPLAINT, False),
        ("Subscribe", InboundKind.UNRELATED, False),
    ],
)
def test_postmark_bounce_type_mapping(
    bounce_type: str, kind: InboundKind, sender_side: bool
) -> None:
    record = {"RecordType": "Bounce", "ID": 7, "Type": bounce_type, "Email": "ann@example.com"}
    message = parse_postmark_event(record)[0].message
    assert message.kind == kind
    assert any(r.sender_side for r in message.recipients) == sender_side


def test_postmark_key_without_id() -> None:
    record = {"RecordType": "SpamComplaint", "MessageID": "abc-1", "Email": "ann@example.com"}
    assert parse_postmark_event(record)[0].key == "postmark:abc-1:SpamComplaint"


def test_postmark_missing_email_named() -> None:
    with pytest.raises(InvalidPayload, match="Postmark webhook: Email is missing"):
        parse_postmark_event({"RecordType": "Bounce", "ID": 7, "Type": "HardBounce"})


def test_non_json_body_rejected() -> None:
    with pytest.raises(InvalidPayload, match="Mailgun webhook: the body is not valid JSON"):
        decode_json(b"\xff{", MAILGUN)


# --- signing helpers --------------------------------------------------------------------------


def _certificate(key: rsa.RSAPrivateKey, *, days: int = 30, offset_days: int = -1) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test-only.invalid")])
    start = datetime.now(UTC) + timedelta(days=offset_days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _documented_string_to_sign(envelope: dict[str, str]) -> bytes:
    """Build the string to sign as the SNS developer guide lists it, apart from the code under
    test."""
    if envelope["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    return "".join(f"{n}\n{envelope[n]}\n" for n in names if n in envelope).encode()


def _sns_message(
    key: rsa.RSAPrivateKey,
    message: str,
    *,
    message_type: str = "Notification",
    version: str = "1",
    cert_url: str = CERT_URL,
    topic: str = TOPIC,
    subject: str | None = None,
    subscribe_url: str = SUBSCRIBE_URL,
) -> dict[str, str]:
    envelope = {
        "Type": message_type,
        "MessageId": f"sns-{uuid.uuid4()}",
        "TopicArn": topic,
        "Message": message,
        "Timestamp": "2026-01-01T00:00:00.000Z",
        "SignatureVersion": version,
        "SigningCertURL": cert_url,
    }
    if subject is not None:
        envelope["Subject"] = subject
    if message_type != "Notification":
        envelope["Token"] = "confirmation-token"
        envelope["SubscribeURL"] = subscribe_url
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = key.sign(_documented_string_to_sign(envelope), padding.PKCS1v15(), algorithm)
    envelope["Signature"] = base64.b64encode(signature).decode()
    return envelope


SES_BOUNCE = json.dumps(
    _ses_bounce(
        [
            {
                "emailAddress": "ann@example.com",
                "status": "5.1.1",
                "diagnosticCode": "smtp; 550 5.1.1 user unknown",
            }
        ]
    )
)


class RecordingFetch:
    """A `fetch` that serves the test certificate and records every URL it was asked for."""

    def __init__(self, certificate: bytes, error: Exception | None = None) -> None:
        self.certificate = certificate
        self.error = error
        self.urls: list[str] = []

    async def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if self.error is not None:
            raise self.error
        if url.endswith(".pem"):
            return self.certificate
        return b"<ConfirmSubscriptionResponse/>"


class Recorder:
    """An `on_mail_event` callback that records its calls and raises the given error once."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[InboundMessage, str, str]] = []

    async def __call__(self, message: InboundMessage, key: str, source: str) -> list[str]:
        self.calls.append((message, key, source))
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return [f"{source}: {message.kind.value}"]

    @property
    def keys(self) -> list[str]:
        return [key for _, key, _ in self.calls]


async def _unused_invitation(event: Any) -> str:
    raise AssertionError("the LinkedIn route is not used here")


def _app(on_mail_event: Any, **providers: Any) -> Any:
    return create_webhook_app(
        linkedin_secret="linkedin-secret-unused",
        on_invitation=_unused_invitation,
        on_mail_event=on_mail_event,
        **providers,
    )


async def _post(
    app: Any, path: str, body: bytes | str | dict | list, headers: dict[str, str] | None = None
) -> httpx.Response:
    if not isinstance(body, bytes | str):
        body = json.dumps(body)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.post(
            path, content=body, headers={"Content-Type": "application/json", **(headers or {})}
        )


# --- Amazon SES through SNS -------------------------------------------------------------------


async def _post_ses(
    envelope: dict | bytes, fetch: RecordingFetch, recorder: Recorder, topics: tuple = ()
) -> httpx.Response:
    app = _app(recorder, ses=SesWebhook(topic_arns=topics, fetch=fetch))
    return await _post(app, "/webhooks/ses", envelope)


@pytest.mark.parametrize("version", ["1", "2"])
async def test_ses_signed_notification_accepted(rsa_key, version: str) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    envelope = _sns_message(rsa_key, SES_BOUNCE, version=version, subject="Bounce")
    response = await _post_ses(envelope, fetch, recorder, topics=(TOPIC,))
    assert response.status_code == 200
    assert recorder.keys == [f"ses:{envelope['MessageId']}"]
    assert recorder.calls[0][0].kind == InboundKind.HARD_BOUNCE
    assert recorder.calls[0][2] == f"ses message {envelope['MessageId']}"
    assert fetch.urls == [CERT_URL]
    assert response.json()["events"] == 1


async def test_ses_tampered_message_rejected(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    envelope = _sns_message(rsa_key, SES_BOUNCE)
    envelope["Message"] = envelope["Message"].replace("ann@example.com", "bob@example.com")
    response = await _post_ses(envelope, fetch, recorder)
    assert response.status_code == 401
    assert "does not match" in response.json()["error"]
    assert recorder.calls == []


async def test_ses_wrong_certificate_rejected(rsa_key, other_rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(other_rsa_key)), Recorder()
    response = await _post_ses(_sns_message(rsa_key, SES_BOUNCE), fetch, recorder)
    assert response.status_code == 401
    assert recorder.calls == []


async def test_ses_expired_certificate_rejected(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key, offset_days=-40)), Recorder()
    response = await _post_ses(_sns_message(rsa_key, SES_BOUNCE), fetch, recorder)
    assert response.status_code == 401
    assert "not valid now" in response.json()["error"]
    assert recorder.calls == []


@pytest.mark.parametrize("field", ["Signature", "SignatureVersion", "SigningCertURL"])
async def test_ses_missing_signature_field_rejected(rsa_key, field: str) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    envelope = _sns_message(rsa_key, SES_BOUNCE)
    del envelope[field]
    response = await _post_ses(envelope, fetch, recorder)
    assert response.status_code == 401
    assert field in response.json()["error"]
    assert recorder.calls == []


async def test_ses_unknown_signature_version_rejected(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    response = await _post_ses(_sns_message(rsa_key, SES_BOUNCE, version="3"), fetch, recorder)
    assert response.status_code == 401
    assert recorder.calls == []


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-west-2.amazonaws.com/cert.pem",
        "https://sns.us-west-2.amazonaws.com.attacker.test/cert.pem",
        "https://attacker.test/sns.us-west-2.amazonaws.com/cert.pem",
        "https://sns.us-west-2.amazonaws.com@attacker.test/cert.pem",
        "https://sns.us-west-2.amazonaws.com:8443/cert.pem",
        "https://s3.us-west-2.amazonaws.com/cert.pem",
        "https://169.254.169.254/latest/meta-data/",
        "https://attacker.test\\@sns.us-west-2.amazonaws.com/cert.pem",
        "https://\u017fns.us-west-2.amazonaws.com/cert.pem",
        "https://sns.us-west-2.amazonaws.com\t.attacker.test/cert.pem",
    ],
)
async def test_ses_bad_certificate_host_not_fetched(rsa_key, url: str) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    response = await _post_ses(_sns_message(rsa_key, SES_BOUNCE, cert_url=url), fetch, recorder)
    assert response.status_code == 401
    assert fetch.urls == []
    assert recorder.calls == []


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.eu-central-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem",
        "https://SNS.US-EAST-1.AMAZONAWS.COM/x.pem",
    ],
)
def test_sns_url_check_accepts_aws(url: str) -> None:
    check_sns_url(url, "SigningCertURL")


async def test_ses_unlisted_topic_forbidden(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    envelope = _sns_message(rsa_key, SES_BOUNCE, topic="arn:aws:sns:us-west-2:999:other")
    response = await _post_ses(envelope, fetch, recorder, topics=(TOPIC,))
    assert response.status_code == 403
    assert fetch.urls == []
    assert recorder.calls == []


async def test_ses_bare_notification_rejected(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    response = await _post_ses(SES_BOUNCE.encode(), fetch, recorder)
    assert response.status_code == 401
    assert "not an SNS message" in response.json()["error"]
    assert recorder.calls == []


async def test_ses_corpus_envelope_rejected(rsa_key) -> None:
    _skip_without_corpus()
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    body = _read_corpus("amazonses", "json-amazonses-02.json")
    response = await _post_ses(body, fetch, recorder)
    assert response.status_code == 401
    assert fetch.urls == [json.loads(body)["SigningCertURL"]]
    assert recorder.calls == []


async def test_ses_subscription_confirmed(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    envelope = _sns_message(rsa_key, "Confirm it", message_type="SubscriptionConfirmation")
    response = await _post_ses(envelope, fetch, recorder, topics=(TOPIC,))
    assert response.status_code == 200
    assert fetch.urls == [CERT_URL, SUBSCRIBE_URL]
    assert recorder.calls == []


async def test_ses_subscription_bad_host_not_fetched(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    envelope = _sns_message(
        rsa_key,
        "Confirm it",
        message_type="SubscriptionConfirmation",
        subscribe_url="https://attacker.test/?Action=ConfirmSubscription",
    )
    response = await _post_ses(envelope, fetch, recorder)
    assert response.status_code == 401
    assert fetch.urls == [CERT_URL]


async def test_ses_unsubscribe_confirmation_changes_nothing(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    envelope = _sns_message(rsa_key, "Bye", message_type="UnsubscribeConfirmation")
    response = await _post_ses(envelope, fetch, recorder)
    assert response.status_code == 200
    assert fetch.urls == [CERT_URL]
    assert recorder.calls == []


async def test_ses_certificate_fetch_failure_retried(rsa_key) -> None:
    fetch = RecordingFetch(_certificate(rsa_key), error=httpx.ConnectTimeout("timed out"))
    recorder = Recorder()
    response = await _post_ses(_sns_message(rsa_key, SES_BOUNCE), fetch, recorder)
    assert response.status_code == 503
    assert recorder.calls == []


async def test_ses_certificate_cached(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    app = _app(recorder, ses=SesWebhook(fetch=fetch))
    for _ in range(3):
        response = await _post(app, "/webhooks/ses", _sns_message(rsa_key, SES_BOUNCE))
        assert response.status_code == 200
    assert fetch.urls == [CERT_URL]
    assert len(recorder.calls) == 3


async def test_ses_delivery_ignored(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    delivery = json.dumps({"notificationType": "Delivery", "mail": {"messageId": "m-1"}})
    response = await _post_ses(_sns_message(rsa_key, delivery), fetch, recorder)
    assert response.status_code == 200
    assert response.json() == {"events": 1, "ignored": 1, "results": []}
    assert recorder.calls == []


async def test_ses_malformed_inner_message(rsa_key) -> None:
    fetch, recorder = RecordingFetch(_certificate(rsa_key)), Recorder()
    response = await _post_ses(_sns_message(rsa_key, "not json"), fetch, recorder)
    assert response.status_code == 422
    assert "Message is not a JSON SES notification" in response.json()["error"]


# --- SendGrid ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _sendgrid_public_key(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _sendgrid_headers(
    key: ec.EllipticCurvePrivateKey, body: bytes, timestamp: str = "1767225600"
) -> dict[str, str]:
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        SENDGRID_SIGNATURE_HEADER: base64.b64encode(signature).decode(),
        SENDGRID_TIMESTAMP_HEADER: timestamp,
    }


SENDGRID_BATCH = json.dumps(
    [
        {
            "email": "ann@example.com",
            "event": "bounce",
            "type": "bounce",
            "status": "5.1.1",
            "reason": "550 5.1.1 user unknown",
            "smtp-id": "<camp.0123456789abcdef.1@acme.test>",
            "sg_event_id": "sg-1",
        },
        {"email": "ann@example.com", "event": "open", "sg_event_id": "sg-2"},
    ]
).encode()


async def test_sendgrid_signed_batch_accepted(ec_key) -> None:
    recorder = Recorder()
    app = _app(recorder, sendgrid=SendGridWebhook(_sendgrid_public_key(ec_key)))
    response = await _post(
        app, "/webhooks/sendgrid", SENDGRID_BATCH, _sendgrid_headers(ec_key, SENDGRID_BATCH)
    )
    assert response.status_code == 200
    assert recorder.keys == ["sendgrid:sg-1"]
    assert response.json()["ignored"] == 1
    assert response.json()["results"] == ["sendgrid event sg-1: hard_bounce"]


async def test_sendgrid_corpus_batch_accepted(ec_key) -> None:
    _skip_without_corpus()
    body = _read_corpus("sendgrid", "0")
    recorder = Recorder()
    app = _app(recorder, sendgrid=SendGridWebhook(_sendgrid_public_key(ec_key)))
    response = await _post(app, "/webhooks/sendgrid", body, _sendgrid_headers(ec_key, body))
    assert response.status_code == 200
    assert len(recorder.calls) == 5


async def test_sendgrid_pem_key_accepted(ec_key) -> None:
    pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    webhook = SendGridWebhook(pem.decode())
    headers = _sendgrid_headers(ec_key, SENDGRID_BATCH)
    webhook.verify(
        headers[SENDGRID_SIGNATURE_HEADER], headers[SENDGRID_TIMESTAMP_HEADER], SENDGRID_BATCH
    )


@pytest.mark.parametrize("case", ["tampered-body", "other-timestamp", "wrong-key", "not-base64"])
async def test_sendgrid_bad_signature_rejected(ec_key, case: str) -> None:
    recorder = Recorder()
    headers = _sendgrid_headers(ec_key, SENDGRID_BATCH)
    body = SENDGRID_BATCH
    if case == "tampered-body":
        body = SENDGRID_BATCH.replace(b"ann@", b"bob@")
    elif case == "other-timestamp":
        headers[SENDGRID_TIMESTAMP_HEADER] = "1767225601"
    elif case == "wrong-key":
        headers = _sendgrid_headers(ec.generate_private_key(ec.SECP256R1()), SENDGRID_BATCH)
    else:
        headers[SENDGRID_SIGNATURE_HEADER] = "%%%"
    app = _app(recorder, sendgrid=SendGridWebhook(_sendgrid_public_key(ec_key)))
    response = await _post(app, "/webhooks/sendgrid", body, headers)
    assert response.status_code == 401
    assert recorder.calls == []


@pytest.mark.parametrize("header", [SENDGRID_SIGNATURE_HEADER, SENDGRID_TIMESTAMP_HEADER])
async def test_sendgrid_missing_header_rejected(ec_key, header: str) -> None:
    recorder = Recorder()
    headers = _sendgrid_headers(ec_key, SENDGRID_BATCH)
    del headers[header]
    app = _app(recorder, sendgrid=SendGridWebhook(_sendgrid_public_key(ec_key)))
    response = await _post(app, "/webhooks/sendgrid", SENDGRID_BATCH, headers)
    assert response.status_code == 401
    assert header in response.json()["error"]
    assert recorder.calls == []


async def test_sendgrid_signed_malformed_event(ec_key) -> None:
    recorder = Recorder()
    body = json.dumps([{"event": "bounce", "sg_event_id": "sg-9"}]).encode()
    app = _app(recorder, sendgrid=SendGridWebhook(_sendgrid_public_key(ec_key)))
    response = await _post(app, "/webhooks/sendgrid", body, _sendgrid_headers(ec_key, body))
    assert response.status_code == 422
    assert response.json()["error"] == "SendGrid webhook: [0].email is missing or empty"
    assert recorder.calls == []


@pytest.mark.parametrize("key", ["not base64!", base64.b64encode(b"junk").decode(), ""])
def test_sendgrid_invalid_public_key(key: str) -> None:
    with pytest.raises(ValueError, match="invalid SendGrid public key"):
        SendGridWebhook(key)


def test_sendgrid_rsa_public_key_rejected(rsa_key) -> None:
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="expected an ECDSA P-256 public key"):
        SendGridWebhook(base64.b64encode(der).decode())


# --- Mailgun ----------------------------------------------------------------------------------


def _mailgun_payload(
    *,
    key: str = MAILGUN_KEY,
    timestamp: int = MAILGUN_NOW,
    event_id: str = "mg-1",
    recipient: str = "ann@example.com",
    message_id: str = "camp.0123456789abcdef.1@acme.test",
) -> dict[str, Any]:
    token = f"token-{uuid.uuid4().hex}"
    signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": str(timestamp), "token": token, "signature": signature},
        "event-data": {
            "id": event_id,
            "event": "failed",
            "severity": "permanent",
            "reason": "bounce",
            "recipient": recipient,
            "delivery-status": {
                "code": 550,
                "enhanced-code": "5.1.1",
                "message": "5.1.1 The email account that you tried to reach does not exist.",
                "description": "",
            },
            "message": {"headers": {"message-id": message_id}},
        },
    }


def _mailgun_app(recorder: Recorder, now: float = MAILGUN_NOW) -> Any:
    return _app(recorder, mailgun=MailgunWebhook(MAILGUN_KEY, clock=lambda: now))


async def test_mailgun_signed_event_accepted() -> None:
    recorder = Recorder()
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", _mailgun_payload())
    assert response.status_code == 200
    assert recorder.keys == ["mailgun:mg-1"]
    message = recorder.calls[0][0]
    assert message.kind == InboundKind.HARD_BOUNCE
    assert message.original_message_id == "<camp.0123456789abcdef.1@acme.test>"


@pytest.mark.parametrize("field", ["token", "timestamp"])
async def test_mailgun_tampered_signature_rejected(field: str) -> None:
    recorder = Recorder()
    payload = _mailgun_payload()
    payload["signature"][field] += "1"
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", payload)
    assert response.status_code == 401
    assert recorder.calls == []


async def test_mailgun_replayed_token_other_event() -> None:
    recorder = Recorder()
    app = _mailgun_app(recorder)
    payload = _mailgun_payload()
    first = await _post(app, "/webhooks/mailgun", payload)
    retried = await _post(app, "/webhooks/mailgun", payload)
    payload["event-data"]["recipient"] = "bob@example.com"
    altered = await _post(app, "/webhooks/mailgun", payload)
    assert first.status_code == 200
    assert retried.status_code == 200
    assert altered.status_code == 401
    assert "used before with another event" in altered.json()["error"]
    assert len(recorder.calls) == 2


def test_mailgun_tokens_forgotten_after_tolerance() -> None:
    now = [float(MAILGUN_NOW)]
    webhook = MailgunWebhook(MAILGUN_KEY, clock=lambda: now[0])
    payload = _mailgun_payload()
    webhook.verify(payload)
    now[0] += 16 * 60
    fresh = _mailgun_payload(timestamp=int(now[0]))
    webhook.verify(fresh)
    assert list(webhook._tokens) == [fresh["signature"]["token"]]


async def test_mailgun_wrong_key_rejected() -> None:
    recorder = Recorder()
    payload = _mailgun_payload(key="another-signing-key")
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", payload)
    assert response.status_code == 401
    assert recorder.calls == []


async def test_mailgun_missing_signature_rejected() -> None:
    recorder = Recorder()
    payload = _mailgun_payload()
    del payload["signature"]
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", payload)
    assert response.status_code == 401
    assert "no signature object" in response.json()["error"]
    assert recorder.calls == []


@pytest.mark.parametrize(("offset", "status"), [(-16 * 60, 401), (16 * 60, 401), (-14 * 60, 200)])
async def test_mailgun_timestamp_tolerance(offset: int, status: int) -> None:
    recorder = Recorder()
    payload = _mailgun_payload(timestamp=MAILGUN_NOW + offset)
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", payload)
    assert response.status_code == status
    assert len(recorder.calls) == (1 if status == 200 else 0)


async def test_mailgun_signed_malformed_event() -> None:
    recorder = Recorder()
    payload = _mailgun_payload()
    del payload["event-data"]["recipient"]
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", payload)
    assert response.status_code == 422
    assert response.json()["error"] == "Mailgun webhook: event-data.recipient is missing or empty"


async def test_mailgun_non_json_rejected() -> None:
    recorder = Recorder()
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", b"event=failed")
    assert response.status_code == 422


# --- Postmark ---------------------------------------------------------------------------------


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


POSTMARK_BOUNCE = {
    "RecordType": "Bounce",
    "ID": 42,
    "Type": "HardBounce",
    "Email": "ann@example.com",
    "Details": "smtp;550 5.1.1 user unknown",
}


def _postmark_app(recorder: Recorder) -> Any:
    return _app(recorder, postmark=PostmarkWebhook(POSTMARK_USER, POSTMARK_PASSWORD))


async def test_postmark_basic_auth_accepted() -> None:
    recorder = Recorder()
    headers = _basic(POSTMARK_USER, POSTMARK_PASSWORD)
    response = await _post(_postmark_app(recorder), "/webhooks/postmark", POSTMARK_BOUNCE, headers)
    assert response.status_code == 200
    assert recorder.keys == ["postmark:42"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        _basic(POSTMARK_USER, "wrong-password"),
        _basic("someone-else", POSTMARK_PASSWORD),
        _basic(POSTMARK_USER + ":" + POSTMARK_PASSWORD, ""),
        {"Authorization": f"Bearer {POSTMARK_PASSWORD}"},
        {"Authorization": "Basic !!!"},
    ],
    ids=["missing", "wrong-password", "wrong-user", "shifted-colon", "bearer", "not-base64"],
)
async def test_postmark_bad_credentials_rejected(headers: dict[str, str]) -> None:
    recorder = Recorder()
    response = await _post(_postmark_app(recorder), "/webhooks/postmark", POSTMARK_BOUNCE, headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == POSTMARK_CHALLENGE
    assert recorder.calls == []


async def test_postmark_malformed_record() -> None:
    recorder = Recorder()
    headers = _basic(POSTMARK_USER, POSTMARK_PASSWORD)
    response = await _post(_postmark_app(recorder), "/webhooks/postmark", {"ID": 1}, headers)
    assert response.status_code == 422
    assert response.json()["error"] == "Postmark webhook: RecordType is missing or empty"


def test_postmark_settings_validated() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        PostmarkWebhook(POSTMARK_USER, "")


# --- routes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "setting"),
    [
        ("/webhooks/ses", "SEQUENCER_SES_TOPIC_ARNS"),
        ("/webhooks/sendgrid", "SEQUENCER_SENDGRID_PUBLIC_KEY"),
        ("/webhooks/mailgun", "SEQUENCER_MAILGUN_SIGNING_KEY"),
        ("/webhooks/postmark", "SEQUENCER_POSTMARK_WEBHOOK_PASSWORD"),
    ],
)
async def test_unconfigured_provider_not_found(path: str, setting: str) -> None:
    recorder = Recorder()
    response = await _post(_app(recorder), path, b"[]")
    assert response.status_code == 404
    assert setting in response.json()["error"]


async def test_app_without_providers_not_found() -> None:
    app = create_webhook_app(
        linkedin_secret="linkedin-secret-unused", on_invitation=_unused_invitation
    )
    response = await _post(app, "/webhooks/mailgun", b"{}")
    assert response.status_code == 404
    assert "SEQUENCER_MAILGUN_SIGNING_KEY" in response.json()["error"]


async def test_oversized_body_rejected() -> None:
    recorder = Recorder()
    body = b"[" + b" " * MAIL_MAX_BODY_BYTES + b"]"
    response = await _post(_mailgun_app(recorder), "/webhooks/mailgun", body)
    assert response.status_code == 413
    assert recorder.calls == []


async def test_callback_failure_returns_500() -> None:
    recorder = Recorder(error=RuntimeError("database is locked"))
    app = _mailgun_app(recorder)
    payload = _mailgun_payload()
    failed = await _post(app, "/webhooks/mailgun", payload)
    retried = await _post(app, "/webhooks/mailgun", payload)
    assert failed.status_code == 500
    assert "retry later" in failed.json()["error"]
    assert retried.status_code == 200
    assert recorder.keys == ["mailgun:mg-1", "mailgun:mg-1"]


def test_provider_without_callback_rejected() -> None:
    with pytest.raises(ValueError, match="need an on_mail_event callback"):
        create_webhook_app(
            linkedin_secret="linkedin-secret-unused",
            on_invitation=_unused_invitation,
            mailgun=MailgunWebhook(MAILGUN_KEY),
        )


async def test_secrets_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="sequencer.webhooks")
    recorder = Recorder()
    await _post(_mailgun_app(recorder), "/webhooks/mailgun", _mailgun_payload(key="wrong"))
    await _post(_postmark_app(recorder), "/webhooks/postmark", POSTMARK_BOUNCE, _basic("u", "p"))
    await _post(_mailgun_app(recorder), "/webhooks/mailgun", _mailgun_payload())
    assert "rejected Mailgun webhook (signature failure 1)" in caplog.text
    assert MAILGUN_KEY not in caplog.text
    assert POSTMARK_PASSWORD not in caplog.text
    assert "ann@example.com" not in caplog.text


# --- settings ---------------------------------------------------------------------------------


def test_settings_read_provider_variables(ec_key, tmp_path: Path) -> None:
    settings = load_settings(
        {
            "SEQUENCER_HOME": str(tmp_path),
            "SEQUENCER_SES_TOPIC_ARNS": f" {TOPIC} ,arn:aws:sns:eu-west-1:1:other,",
            "SEQUENCER_SENDGRID_PUBLIC_KEY": _sendgrid_public_key(ec_key),
            "SEQUENCER_MAILGUN_SIGNING_KEY": MAILGUN_KEY,
            "SEQUENCER_POSTMARK_WEBHOOK_USER": POSTMARK_USER,
            "SEQUENCER_POSTMARK_WEBHOOK_PASSWORD": POSTMARK_PASSWORD,
        }
    )
    assert settings.ses_topic_arns == (TOPIC, "arn:aws:sns:eu-west-1:1:other")
    assert settings.ses_webhook_enabled is False
    assert MAILGUN_KEY not in repr(settings)
    assert POSTMARK_PASSWORD not in repr(settings)
    webhooks = mail_webhooks_from_settings(settings)
    assert sorted(webhooks) == ["mailgun", "postmark", "sendgrid", "ses"]
    assert webhooks["ses"].topic_arns == {TOPIC, "arn:aws:sns:eu-west-1:1:other"}


def test_settings_default_to_no_providers(tmp_path: Path) -> None:
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path)})
    assert mail_webhooks_from_settings(settings) == {}


def test_settings_ses_enabled_flag(tmp_path: Path) -> None:
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_SES_ENABLED": "yes"})
    assert list(mail_webhooks_from_settings(settings)) == ["ses"]
    with pytest.raises(ValueError, match="SEQUENCER_SES_ENABLED: 'maybe' is not a boolean"):
        load_settings({"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_SES_ENABLED": "maybe"})


def test_settings_half_postmark_rejected(tmp_path: Path) -> None:
    env = {"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_POSTMARK_WEBHOOK_USER": POSTMARK_USER}
    with pytest.raises(ValueError, match="set both SEQUENCER_POSTMARK_WEBHOOK_USER"):
        mail_webhooks_from_settings(load_settings(env))


def test_settings_bad_sendgrid_key_named(tmp_path: Path) -> None:
    env = {"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_SENDGRID_PUBLIC_KEY": "abc"}
    with pytest.raises(ValueError, match="SEQUENCER_SENDGRID_PUBLIC_KEY: invalid SendGrid"):
        mail_webhooks_from_settings(load_settings(env))


def test_settings_bad_topic_arn_named(tmp_path: Path) -> None:
    env = {"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_SES_TOPIC_ARNS": "ses-feedback"}
    with pytest.raises(ValueError, match="SEQUENCER_SES_TOPIC_ARNS: invalid SNS topic ARN"):
        mail_webhooks_from_settings(load_settings(env))


# --- through the engine -----------------------------------------------------------------------


@pytest.fixture
async def engine(
    time_skipping_env, tmp_path, monkeypatch
) -> AsyncIterator[tuple[Sequencer, SmtpSink]]:
    """A Sequencer on the shared test server whose email steps go to a loopback SMTP sink."""
    monkeypatch.setattr("sequencer.service.TASK_QUEUE", f"provider-webhooks-{uuid.uuid4()}")
    import sequencer.service as service_module

    settings = load_settings({"SEQUENCER_HOME": str(tmp_path / "home")})
    service = Sequencer(settings, client=time_skipping_env.client)
    records = StoreActivities(service.store)
    channels = SimulatedChannels({})

    async def is_suppressed(address: str) -> bool:
        return await asyncio.to_thread(service.store.is_suppressed, address)

    email = EmailActivities(is_suppressed=is_suppressed, timeout=10.0)
    with SmtpSink(tmp_path / "mailbox", port=0, outage_seconds=0) as sink:
        async with lead_worker(
            time_skipping_env.client,
            service_module.TASK_QUEUE,
            [
                email.send_email,
                channels.linkedin_step,
                records.create_task,
                records.record_activity,
            ],
            end_accounts=True,
        ):
            yield service, sink
            # A workflow left running stops the shared test server's clock for later tests.
            for _ in range(100):
                rows = [
                    row
                    for campaign in service.store.list_campaigns()
                    for row in service.store.list_enrollments(campaign.id)
                ]
                if all(row.status in FINAL for row in rows):
                    break
                await time_skipping_env.sleep(0.1)
            else:
                for row in rows:
                    if row.status not in FINAL:
                        handle = time_skipping_env.client.get_workflow_handle(row.workflow_id)
                        await handle.terminate("the test is over")
                pytest.fail(f"workflows still running after the test: {rows}")
    service.close()


async def _wait_until(time_skipping_env, condition, description: str) -> None:
    for _ in range(150):
        if condition():
            return
        await time_skipping_env.sleep(0.1)
    pytest.fail(f"timed out waiting until {description}")


async def test_mailgun_bounce_applied_once(engine, time_skipping_env, tmp_path: Path) -> None:
    service, sink = engine
    campaign_file = tmp_path / "esp-bounce.yaml"
    campaign_file.write_text(
        yaml.safe_dump(
            {
                "name": "esp-bounce",
                "sender": {"email": "rep@acme.test", "smtp_url": sink.smtp_url},
                "steps": [
                    {
                        "type": "email",
                        "subject": "Hi {{first_name}}",
                        "body": "Hello",
                        "wait_after": "2d",
                    },
                    {"type": "call", "instructions": "Call Ann"},
                ],
            }
        )
    )
    leads = tmp_path / "esp-bounce.csv"
    leads.write_text("email,first_name,phone\nann@example.com,Ann,+33612345678\n")
    await service.launch(campaign_file, leads)
    await _wait_until(
        time_skipping_env,
        lambda: service.activity("esp-bounce", "ann@example.com").steps[0].status.value == "sent",
        "step 1 is sent",
    )

    delivered = read_mailbox(sink.mailbox_dir)
    assert len(delivered) == 1
    sent_id = str(delivered[0]["Message-ID"])
    assert sent_id == message_id_for("esp-bounce", "ann@example.com", 1, "rep@acme.test")

    # Mailgun reports the Message-ID without angle brackets.
    payload = _mailgun_payload(
        event_id="mg-e2e-1", timestamp=int(time.time()), message_id=sent_id.strip("<>")
    )
    app = _app(service.apply_inbound, mailgun=MailgunWebhook(MAILGUN_KEY))
    response = await _post(app, "/webhooks/mailgun", payload)
    assert response.status_code == 200
    results = response.json()["results"]
    assert results[0] == "mailgun event mg-e2e-1: hard_bounce (user-unknown)"
    assert any("step 1 marked bounced" in line for line in results)

    report = service.activity("esp-bounce", "ann@example.com")
    assert report.steps[0].status.value == "bounced"
    assert "5.1.1" in (report.steps[0].detail or "")
    assert report.enrollment.unsubscribed is True
    # The call runs at once, without the 2 days of wait.
    await _wait_until(
        time_skipping_env, lambda: service.tasks("open", "esp-bounce"), "the call task opens"
    )
    log_before = [
        (e.seq, e.kind, e.status, e.step)
        for e in service.activity("esp-bounce", "ann@example.com").log
    ]

    again = await _post(app, "/webhooks/mailgun", payload)
    assert again.status_code == 200
    assert again.json()["results"] == [
        "mailgun event mg-e2e-1: hard_bounce (user-unknown): applied before; nothing changed"
    ]
    log_after = [
        (e.seq, e.kind, e.status, e.step)
        for e in service.activity("esp-bounce", "ann@example.com").log
    ]
    assert log_after == log_before

    task = service.tasks("open", "esp-bounce")[0]
    await service.close_task(task.id, "done")
