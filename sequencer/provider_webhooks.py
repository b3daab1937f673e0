"""Verify and parse the webhooks of email service providers: Amazon SES (through SNS), SendGrid,
Mailgun and Postmark.

Each provider reports bounces, complaints and other delivery events in its own JSON format. The
parsers turn every event into the engine's `InboundMessage`, one per recipient, wrapped in a
`MailEvent` with the key `"<provider>:<event id>"`. The engine claims each key once, so an event
that a provider sends again changes nothing. Nothing here uses Temporal or the database. The
only network access is the SNS certificate download and the SNS subscription confirmation,
both through a `Fetch` function that the caller can replace.

How each provider proves that a request comes from it:

    Amazon SES  an SNS message signed with RSA (SignatureVersion 1: SHA1withRSA, 2:
                SHA256withRSA) by the certificate at SigningCertURL, which must be served over
                HTTPS by sns.<region>.amazonaws.com (or .amazonaws.com.cn)
    SendGrid    an ECDSA P-256 signature (SHA-256) over the timestamp header and the raw body
    Mailgun     a hex HMAC-SHA256 of timestamp + token with the webhook signing key, and a
                timestamp no further than a tolerance from now
    Postmark    HTTP basic auth with the user name and password set in the webhook URL

None of them deduplicates: replaying a correctly signed request is harmless only because the
engine applies each event key once.

Errors:

    MailWebhookError
    ├── InvalidPayload          the body is not JSON, or a field is missing or of the wrong type
    ├── VerificationFailed      the request does not prove that the provider sent it
    │   └── TopicNotAllowed     a valid SNS message from a topic that is not configured
    └── FetchFailed             the SNS certificate or subscription URL could not be fetched
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from sequencer.inbound import FailedRecipient, InboundKind, InboundMessage
from sequencer.smtp_replies import classify_smtp_reply, parse_enhanced_status

SES = "Amazon SES"
SENDGRID = "SendGrid"
MAILGUN = "Mailgun"
POSTMARK = "Postmark"

SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
DEFAULT_MAILGUN_TOLERANCE = timedelta(minutes=15)
# How many Mailgun tokens a verifier remembers at most, to bound its memory.
MAX_MAILGUN_TOKENS = 100_000

# Limits of the default `fetch_https`. An SNS signing certificate is a few kilobytes.
FETCH_TIMEOUT_SECONDS = 10.0
MAX_FETCH_BYTES = 64 * 1024
# How many SNS signing certificates a verifier keeps, by URL.
CERTIFICATE_CACHE_SIZE = 8

# The SNS fields that make up the string to sign, in the order of the SNS developer guide
# ("Verifying the signature of an Amazon SNS message"). Subject is signed only when present.
NOTIFICATION_SIGNED_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_SIGNED_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
SNS_MESSAGE_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")

# The whole network location of an SNS URL: no user info, and no port other than 443.
_SNS_NETLOC = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?(:443)?", re.IGNORECASE | re.ASCII)
# Visible ASCII only, so that a logged or stored event id cannot forge log lines.
_EVENT_ID = re.compile(r"[\x21-\x7e]{1,200}")
_MESSAGE_ID = re.compile(r"<[^<>\s]+@[^<>\s]+>")
# A reply code at the start of a diagnostic or after "smtp;", a space or a colon.
_REPLY_CODE = re.compile(r"(?:^|(?<=[\s:;(]))([45]\d\d)(?=[ -]|$)")
# The subtypes that classify_smtp_reply gives a 5xx reply that no rule matched. For these, the
# provider's permanent verdict decides, and any other "soft" verdict keeps the bounce soft.
_UNSPECIFIC_PERMANENT = frozenset({"unclassified-permanent", "mailbox-or-system-status"})
_OUT_OF_OFFICE = re.compile(
    r"out of (the )?office|vacation|holiday|away|on leave|absent|abwesen|be back|returning",
    re.IGNORECASE,
)

Fetch = Callable[[str], Awaitable[bytes]]
"""GET an https URL and return the response body, raising any exception when that fails."""


class MailWebhookError(Exception):
    """A provider webhook request that the receiver cannot accept."""


class InvalidPayload(MailWebhookError):
    """The body is not JSON, or a field is missing or of the wrong type. The message names the
    provider and the field."""


class VerificationFailed(MailWebhookError):
    """The request does not prove that the provider sent it."""


class TopicNotAllowed(VerificationFailed):
    """A correctly signed SNS message from a topic that is not in the configured list."""


class FetchFailed(MailWebhookError):
    """The SNS signing certificate or subscription URL could not be fetched. A later retry
    may succeed."""


@dataclass(frozen=True)
class MailEvent:
    """One provider event about one recipient, in the form that `Sequencer.apply_inbound`
    takes.

    `key` is `"<provider>:<event id>"`, unique per event and recipient. `source` names the event
    for the engine's result lines and the logs, such as "sendgrid event <sg_event_id>".
    """

    key: str
    source: str
    message: InboundMessage


# --- JSON fields ------------------------------------------------------------------------------


def decode_json(body: bytes, provider: str) -> Any:
    """Decode a webhook body, raising InvalidPayload when it is not UTF-8 JSON."""
    try:
        return load_json(body)
    except ValueError as error:
        raise InvalidPayload(f"{provider} webhook: the body is {error}") from None


def load_json(document: str | bytes) -> Any:
    """Decode JSON as json.loads does, raising ValueError with a readable reason for every
    document that json.loads cannot decode."""
    try:
        return json.loads(document)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not valid JSON: {error}") from None
    except ValueError:
        # json.loads converts integers with int(), which rejects more digits than this limit.
        raise ValueError(
            f"not usable JSON: it has an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    except RecursionError:
        raise ValueError("not usable JSON: its arrays or objects nest too deeply") from None


class _Fields:
    """A JSON object of a provider's payload. Its accessors raise InvalidPayload naming the
    provider and the field's path."""

    def __init__(self, data: Any, provider: str, path: str = "") -> None:
        if not isinstance(data, dict):
            where = path or "the body"
            raise InvalidPayload(
                f"{provider} webhook: {where} must be a JSON object, not {_json_type(data)}"
            )
        self.data = data
        self.provider = provider
        self.path = path

    def __contains__(self, name: str) -> bool:
        return self.data.get(name) is not None

    def name(self, field: str) -> str:
        return f"{self.path}.{field}" if self.path else field

    def _invalid(self, field: str, problem: str) -> InvalidPayload:
        return InvalidPayload(f"{self.provider} webhook: {self.name(field)} {problem}")

    def text(self, field: str) -> str:
        value = self.optional_text(field)
        if not value:
            raise self._invalid(field, "is missing or empty")
        return value

    def optional_text(self, field: str) -> str | None:
        value = self.data.get(field)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._invalid(field, f"must be a string, not {_json_type(value)}")
        return value

    def optional_integer(self, field: str) -> int | None:
        """Read an integer that the provider may also send as a string of digits."""
        value = self.data.get(field)
        if value is None or value == "":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            try:
                return int(value)
            except ValueError:
                pass  # digits that int() rejects, such as "²", or more than 4300 of them
        raise self._invalid(field, f"must be an integer, not {_json_type(value)} {value!r:.40}")

    def event_id(self, field: str) -> str:
        """Read an event id: a string, or an integer as Postmark sends it."""
        value = self.data.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is None or value == "":
            raise self._invalid(field, "is missing or empty")
        if not isinstance(value, str):
            raise self._invalid(field, f"must be a string, not {_json_type(value)}")
        if not _EVENT_ID.fullmatch(value):
            raise self._invalid(field, "must be 1 to 200 visible ASCII characters")
        return value

    def object(self, field: str) -> _Fields:
        if field not in self:
            raise self._invalid(field, "is missing")
        return _Fields(self.data[field], self.provider, self.name(field))

    def optional_object(self, field: str) -> _Fields | None:
        return self.object(field) if field in self else None

    def objects(self, field: str) -> list[_Fields]:
        """Read a list of objects, raising when it is missing or empty."""
        value = self.data.get(field)
        if not isinstance(value, list) or not value:
            raise self._invalid(field, "must be a non-empty JSON array")
        return [
            _Fields(item, self.provider, f"{self.name(field)}[{i}]") for i, item in enumerate(value)
        ]


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# --- classification shared by the providers ---------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    """One failed recipient, with the kind of message it makes."""

    kind: InboundKind
    recipient: FailedRecipient


def _failure(
    address: str,
    *,
    permanent: bool,
    status: str | None,
    diagnostic: str | None,
    reply_code: int | None = None,
) -> _Failure:
    """Classify one failed delivery from the provider's verdict and the server's reply.

    The provider's permanent or temporary verdict decides between a hard and a soft bounce,
    with two exceptions taken from the reply text. A reply that blames the sender (blocklist,
    authentication, content) is a soft bounce with `sender_side`, so the lead is never
    unsubscribed. A reply that reads as passing (a full mailbox, greylisting, a 4xx code)
    stays soft even when the provider calls it permanent.
    """
    text = (diagnostic or "").strip()
    if reply_code is None or not 400 <= reply_code <= 599:
        # A provider may report its own refusal with a code that is not an SMTP reply code, so
        # the code is read from the text instead.
        reply_code = _reply_code(text)
    if status is None:
        status = parse_enhanced_status(text)

    if not text and status is None:
        subtype = "permanent-failure" if permanent else "temporary-failure"
        kind = InboundKind.HARD_BOUNCE if permanent else InboundKind.SOFT_BOUNCE
        return _Failure(kind, _recipient(address, subtype, status=None, reply_code=reply_code))

    if status is not None and parse_enhanced_status(text) is None:
        text = f"{status} {text}"
    code = reply_code
    if code is None:
        code = 550 if permanent else 450
    verdict = classify_smtp_reply(code, text)

    sender_side = verdict.kind == "sender"
    if sender_side or not permanent:
        kind = InboundKind.SOFT_BOUNCE
    elif verdict.kind == "soft" and verdict.subtype not in _UNSPECIFIC_PERMANENT:
        kind = InboundKind.SOFT_BOUNCE
    else:
        kind = InboundKind.HARD_BOUNCE
    recipient = FailedRecipient(
        address=address,
        status=status,
        reply_code=reply_code,
        diagnostic=diagnostic or None,
        subtype=verdict.subtype,
        sender_side=sender_side,
    )
    return _Failure(kind, recipient)


def _reply_code(text: str) -> int | None:
    match = _REPLY_CODE.search(text)
    return int(match.group(1)) if match else None


def _recipient(
    address: str,
    subtype: str,
    *,
    status: str | None = None,
    reply_code: int | None = None,
    diagnostic: str | None = None,
    sender_side: bool = False,
) -> FailedRecipient:
    return FailedRecipient(
        address=address,
        status=status,
        reply_code=reply_code,
        diagnostic=diagnostic or None,
        subtype=subtype,
        sender_side=sender_side,
    )


def _failure_message(
    failure: _Failure, reason: str, original_message_id: str | None
) -> InboundMessage:
    recipient = failure.recipient
    side = "sender-side " if recipient.sender_side else ""
    return InboundMessage(
        kind=failure.kind,
        subtype=recipient.subtype,
        recipients=(recipient,),
        original_message_id=original_message_id,
        reason=f"{reason}: {side}{recipient.subtype}"
        + (f" (status {recipient.status})" if recipient.status else ""),
    )


def _sender_side_message(
    address: str,
    subtype: str,
    reason: str,
    original_message_id: str | None,
    *,
    status: str | None = None,
    diagnostic: str | None = None,
) -> InboundMessage:
    """Build a soft bounce for a refusal that blames the sender, so the lead stays subscribed."""
    recipient = _recipient(
        address,
        subtype,
        status=status,
        reply_code=_reply_code(diagnostic or ""),
        diagnostic=diagnostic,
        sender_side=True,
    )
    return _failure_message(
        _Failure(InboundKind.SOFT_BOUNCE, recipient), reason, original_message_id
    )


def _delay_message(
    address: str, diagnostic: str | None, reason: str, original_message_id: str | None
) -> InboundMessage:
    """Build a delay warning. A deferral that blames the sender keeps its subtype, so the
    engine records a sender alert."""
    failure = _failure(address, permanent=False, status=None, diagnostic=diagnostic)
    recipient = failure.recipient
    if not recipient.sender_side:
        recipient = _recipient(
            address,
            "delay-warning",
            status=recipient.status,
            reply_code=recipient.reply_code,
            diagnostic=diagnostic,
        )
    return InboundMessage(
        kind=InboundKind.DELAY_WARNING,
        subtype="delay-warning",
        recipients=(recipient,),
        original_message_id=original_message_id,
        reason=f"{reason}: the provider is still retrying, so the message may yet be delivered",
    )


def _complaint_message(
    address: str, reason: str, original_message_id: str | None
) -> InboundMessage:
    return InboundMessage(
        kind=InboundKind.COMPLAINT,
        subtype="complaint",
        recipients=(_recipient(address, "complaint"),),
        original_message_id=original_message_id,
        reason=f"{reason}: the recipient reported the message as spam",
    )


def _previously_bounced_message(
    address: str, diagnostic: str | None, reason: str, original_message_id: str | None
) -> InboundMessage:
    recipient = _recipient(address, "previously-bounced", diagnostic=diagnostic)
    return _failure_message(
        _Failure(InboundKind.HARD_BOUNCE, recipient), reason, original_message_id
    )


def _ignored_message(reason: str) -> InboundMessage:
    return InboundMessage(kind=InboundKind.UNRELATED, subtype="provider-event", reason=reason)


def _loose_event_id(value: Any) -> str:
    """Return the id of an event that is ignored, or "unknown" when it is not a usable id."""
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    return text if _EVENT_ID.fullmatch(text) else "unknown"


def _angle_message_id(value: str | None) -> str | None:
    """Return a Message-ID in angle brackets, or None when `value` is not one."""
    if value is None:
        return None
    value = value.strip()
    if value and not value.startswith("<"):
        value = f"<{value}>"
    return value if _MESSAGE_ID.fullmatch(value) else None


# --- Amazon SES through SNS -------------------------------------------------------------------


@dataclass(frozen=True)
class SnsEnvelope:
    """The fields of an SNS HTTP message that the receiver uses. `fields` contains every
    string field as sent, for the string to sign."""

    type: str
    message_id: str
    topic_arn: str
    message: str
    fields: dict[str, str]

    def get(self, name: str) -> str | None:
        return self.fields.get(name)


def is_sns_envelope(payload: Any) -> bool:
    """Return whether a decoded body is an SNS message rather than a bare SES notification."""
    return isinstance(payload, dict) and "Type" in payload and "TopicArn" in payload


def parse_sns_envelope(payload: Any) -> SnsEnvelope:
    """Read an SNS HTTP message (Notification, SubscriptionConfirmation or
    UnsubscribeConfirmation). Raises InvalidPayload naming a missing or mistyped field."""
    root = _Fields(payload, SES)
    message_type = root.text("Type")
    if message_type not in SNS_MESSAGE_TYPES:
        raise InvalidPayload(
            f"{SES} webhook: Type {message_type[:60]!r} is not one of "
            + ", ".join(SNS_MESSAGE_TYPES)
        )
    fields = {}
    for name, value in root.data.items():
        if isinstance(value, str):
            fields[name] = value
        elif name in NOTIFICATION_SIGNED_FIELDS + CONFIRMATION_SIGNED_FIELDS and value is not None:
            raise InvalidPayload(f"{SES} webhook: {name} must be a string, not {_json_type(value)}")
    return SnsEnvelope(
        type=message_type,
        message_id=root.event_id("MessageId"),
        topic_arn=root.text("TopicArn"),
        message=root.text("Message"),
        fields=fields,
    )


def sns_string_to_sign(envelope: SnsEnvelope) -> bytes:
    """Build the bytes that SNS signs: "Name\\nvalue\\n" for each signed field, in order.

    Raises VerificationFailed when a field that must be signed is missing.
    """
    names = (
        NOTIFICATION_SIGNED_FIELDS
        if envelope.type == "Notification"
        else CONFIRMATION_SIGNED_FIELDS
    )
    parts = []
    for name in names:
        value = envelope.get(name)
        if value is None:
            if name == "Subject":
                continue
            raise VerificationFailed(f"{SES} webhook: the SNS message has no {name} to verify")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


def check_sns_url(url: str, field: str) -> None:
    """Raise VerificationFailed unless `url` is https on an SNS host of AWS.

    The check runs before anything is fetched, so that a forged message cannot make the
    receiver request another host.
    """
    problem = None
    if not url.isascii() or any(c.isspace() or c == "\\" for c in url):
        problem = "contains white space, a backslash or a non-ASCII character"
    else:
        parts = urlsplit(url)
        if parts.scheme != "https":
            problem = "is not an https URL"
        elif not _SNS_NETLOC.fullmatch(parts.netloc):
            problem = "is not on a host sns.<region>.amazonaws.com or sns.<region>.amazonaws.com.cn"
    if problem is not None:
        raise VerificationFailed(f"{SES} webhook: {field} {url[:120]!r} {problem}")


async def fetch_https(url: str) -> bytes:
    """GET an https URL with httpx, without following redirects, and return the body.

    Raises httpx.HTTPError when the request fails or the status is not 2xx, and ValueError when
    the body is larger than MAX_FETCH_BYTES.
    """
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, follow_redirects=False) as client:
        async with client.stream("GET", url) as response:
            response.raise_for_status()
            chunks = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_FETCH_BYTES:
                    raise ValueError(
                        f"the response of {url} is larger than {MAX_FETCH_BYTES} bytes"
                    )
                chunks.append(chunk)
    return b"".join(chunks)


class SesWebhook:
    """Settings and verification of Amazon SES notifications delivered by SNS over HTTPS.

    `topic_arns` lists the SNS topics whose messages are accepted. An empty list accepts every
    topic, which lets anyone who can publish to an SNS topic subscribe the receiver and post
    signed but invented bounces. `fetch` downloads signing certificates and confirms
    subscriptions. Tests replace it so that nothing leaves the machine.
    """

    def __init__(self, *, topic_arns: Iterable[str] = (), fetch: Fetch = fetch_https) -> None:
        arns = frozenset(arn.strip() for arn in topic_arns if arn.strip())
        for arn in arns:
            if not arn.startswith("arn:"):
                raise ValueError(
                    f"invalid SNS topic ARN {arn!r}: expected arn:aws:sns:REGION:ACCOUNT:TOPIC"
                )
        self.topic_arns = arns
        self._fetch = fetch
        self._certificates: OrderedDict[str, x509.Certificate] = OrderedDict()

    async def verify(self, envelope: SnsEnvelope) -> None:
        """Check the topic, then the signature. Raises TopicNotAllowed, VerificationFailed, or
        FetchFailed when the certificate cannot be downloaded."""
        if self.topic_arns and envelope.topic_arn not in self.topic_arns:
            raise TopicNotAllowed(
                f"{SES} webhook: SNS topic {envelope.topic_arn[:200]!r} is not in "
                "SEQUENCER_SES_TOPIC_ARNS"
            )

        version = envelope.get("SignatureVersion")
        if version is None:
            raise VerificationFailed(f"{SES} webhook: the SNS message has no SignatureVersion")
        algorithm: hashes.HashAlgorithm
        if version == "1":
            algorithm = hashes.SHA1()  # SNS SignatureVersion 1 is SHA1withRSA
        elif version == "2":
            algorithm = hashes.SHA256()
        else:
            raise VerificationFailed(
                f"{SES} webhook: unsupported SNS SignatureVersion {version[:20]!r}, expected 1 or 2"
            )
        encoded = envelope.get("Signature")
        if not encoded:
            raise VerificationFailed(f"{SES} webhook: the SNS message has no Signature")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise VerificationFailed(f"{SES} webhook: Signature is not valid base64") from None

        certificate_url = envelope.get("SigningCertURL")
        if not certificate_url:
            raise VerificationFailed(f"{SES} webhook: the SNS message has no SigningCertURL")
        check_sns_url(certificate_url, "SigningCertURL")
        key = await self._public_key(certificate_url)
        try:
            key.verify(signature, sns_string_to_sign(envelope), padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            raise VerificationFailed(
                f"{SES} webhook: the SNS signature does not match the message signed by "
                f"{certificate_url[:120]}"
            ) from None

    async def confirm_subscription(self, envelope: SnsEnvelope) -> None:
        """Confirm a verified SubscriptionConfirmation by fetching its SubscribeURL."""
        url = envelope.get("SubscribeURL")
        if not url:
            raise InvalidPayload(f"{SES} webhook: SubscriptionConfirmation has no SubscribeURL")
        check_sns_url(url, "SubscribeURL")
        try:
            await self._fetch(url)
        except Exception as error:
            raise FetchFailed(
                f"{SES} webhook: confirming the subscription to {envelope.topic_arn[:200]} "
                f"failed: {type(error).__name__}: {error}"
            ) from error

    async def _public_key(self, url: str) -> rsa.RSAPublicKey:
        """Return the key of the certificate at `url`, downloaded once and kept while valid."""
        certificate = self._certificates.get(url)
        if certificate is None:
            try:
                pem = await self._fetch(url)
            except Exception as error:
                raise FetchFailed(
                    f"{SES} webhook: downloading the SNS certificate {url[:120]} failed: "
                    f"{type(error).__name__}: {error}"
                ) from error
            try:
                certificate = x509.load_pem_x509_certificate(pem)
            except ValueError:
                raise VerificationFailed(
                    f"{SES} webhook: {url[:120]} did not return a PEM X.509 certificate"
                ) from None
            self._certificates[url] = certificate
            if len(self._certificates) > CERTIFICATE_CACHE_SIZE:
                self._certificates.popitem(last=False)
        else:
            self._certificates.move_to_end(url)

        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            del self._certificates[url]
            raise VerificationFailed(
                f"{SES} webhook: the certificate at {url[:120]} is not valid now"
            )
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise VerificationFailed(
                f"{SES} webhook: the certificate at {url[:120]} has no RSA key"
            )
        return key


def ses_events_from_envelope(envelope: SnsEnvelope) -> list[MailEvent]:
    """Parse the SES notification carried by a verified SNS Notification."""
    try:
        notification = load_json(envelope.message)
    except ValueError as error:
        raise InvalidPayload(
            f"{SES} webhook: Message is not a JSON SES notification: {error}"
        ) from None
    return parse_ses_notification(notification, sns_message_id=envelope.message_id)


def parse_ses_notification(
    notification: Any, *, sns_message_id: str | None = None
) -> list[MailEvent]:
    """Parse one SES notification (the JSON inside an SNS message) into one event per recipient.

    Both forms are read: `notificationType` (feedback notifications) and `eventType` (event
    publishing). The key is "ses:<SNS MessageId>" when the notification came in an SNS message,
    with ":<address>" appended when it names several recipients. Without one, it is built from
    the feedbackId (or mail.messageId), the type and the recipient.
    """
    root = _Fields(notification, SES)
    type_field = "eventType" if "eventType" in root else "notificationType"
    notification_type = root.text(type_field)
    mail = root.object("mail")
    pairs = _ses_messages(root, notification_type, _ses_message_id(mail))

    if pairs is None:
        # Delivery, Send, Open, Click, Reject, Rendering Failure, Subscription and the
        # AmazonSnsSubscriptionSucceeded test notification change nothing for a lead.
        reason = f"SES {notification_type[:60]!r} notification: nothing to apply"
        message = _ignored_message(reason)
        return [_ses_event(root, mail, sns_message_id, notification_type, None, message)]

    several = len(pairs) > 1
    return [
        _ses_event(
            root,
            mail,
            sns_message_id,
            notification_type,
            address if several or sns_message_id is None else None,
            message,
        )
        for address, message in pairs
    ]


def _ses_messages(
    root: _Fields, notification_type: str, original_message_id: str | None
) -> list[tuple[str, InboundMessage]] | None:
    """Map each recipient of a bounce, complaint or delivery delay, or return None for the
    other notification types."""
    if notification_type == "Bounce":
        details = root.object("bounce")
        entries = details.objects("bouncedRecipients")
        bounce_type = details.optional_text("bounceType") or "unknown"
        subtype = details.optional_text("bounceSubType") or "unknown"
        reason = f"SES bounce ({bounce_type}/{subtype})"
        pairs = []
        for entry in entries:
            address = entry.text("emailAddress")
            failure = _failure(
                address,
                permanent=bounce_type.lower() == "permanent",
                status=entry.optional_text("status"),
                diagnostic=entry.optional_text("diagnosticCode"),
            )
            pairs.append((address, _failure_message(failure, reason, original_message_id)))
        return pairs

    if notification_type == "Complaint":
        details = root.object("complaint")
        feedback_type = details.optional_text("complaintFeedbackType") or "unspecified"
        pairs = []
        for entry in details.objects("complainedRecipients"):
            address = entry.text("emailAddress")
            pairs.append((address, _ses_complaint(address, feedback_type, original_message_id)))
        return pairs

    if notification_type == "DeliveryDelay":
        details = root.object("deliveryDelay")
        reason = f"SES delivery delay ({details.optional_text('delayType') or 'unspecified'})"
        pairs = []
        for entry in details.objects("delayedRecipients"):
            address = entry.text("emailAddress")
            diagnostic = entry.optional_text("diagnosticCode")
            pairs.append(
                (address, _delay_message(address, diagnostic, reason, original_message_id))
            )
        return pairs

    return None


def _ses_complaint(
    address: str, feedback_type: str, original_message_id: str | None
) -> InboundMessage:
    """Map an SES complaint by its complaintFeedbackType, the ARF Feedback-Type (RFC 5965)."""
    if feedback_type == "not-spam":
        return _ignored_message("SES complaint of type not-spam: the recipient did not object")
    if feedback_type in ("virus", "auth-failure"):
        return InboundMessage(
            kind=InboundKind.UNRELATED,
            subtype=f"{feedback_type}-report",
            recipients=(),
            original_message_id=original_message_id,
            reason=f"SES complaint of type {feedback_type}: a report about the sender",
        )
    return _complaint_message(address, f"SES complaint ({feedback_type})", original_message_id)


def _ses_event(
    root: _Fields,
    mail: _Fields,
    sns_message_id: str | None,
    notification_type: str,
    address: str | None,
    message: InboundMessage,
) -> MailEvent:
    if sns_message_id is not None:
        key = f"ses:{sns_message_id}"
        source = f"ses message {sns_message_id}"
    else:
        details_field = {"Bounce": "bounce", "Complaint": "complaint"}.get(notification_type)
        details = root.optional_object(details_field) if details_field else None
        feedback_id = details.optional_text("feedbackId") if details else None
        event_id = feedback_id or mail.event_id("messageId")
        key = f"ses:{event_id}:{notification_type}"
        source = f"ses notification {event_id}"
    if address is not None:
        key = f"{key}:{address.lower()}"
    return MailEvent(key=key, source=source, message=message)


def _ses_message_id(mail: _Fields) -> str | None:
    """Read the sent message's Message-ID from mail.headers, else mail.commonHeaders."""
    headers = mail.data.get("headers")
    if isinstance(headers, list):
        for header in headers:
            if isinstance(header, dict) and str(header.get("name", "")).lower() == "message-id":
                value = header.get("value")
                found = _angle_message_id(value if isinstance(value, str) else None)
                if found:
                    return found
    common = mail.optional_object("commonHeaders")
    return _angle_message_id(common.optional_text("messageId")) if common else None


# --- SendGrid ---------------------------------------------------------------------------------


class SendGridWebhook:
    """Settings and verification of SendGrid's signed event webhook.

    `public_key` is the verification key that SendGrid shows: a base64 DER SubjectPublicKeyInfo
    of a P-256 key. A PEM block is accepted too. Raises ValueError when it is not such a key.
    """

    def __init__(self, public_key: str) -> None:
        self._key = _sendgrid_public_key(public_key)

    def verify(self, signature: str | None, timestamp: str | None, body: bytes) -> None:
        """Check the signature headers against the raw body. Raises VerificationFailed."""
        if not signature:
            raise VerificationFailed(
                f"{SENDGRID} webhook: missing {SENDGRID_SIGNATURE_HEADER} header"
            )
        if not timestamp:
            raise VerificationFailed(
                f"{SENDGRID} webhook: missing {SENDGRID_TIMESTAMP_HEADER} header"
            )
        try:
            decoded = base64.b64decode(signature.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise VerificationFailed(
                f"{SENDGRID} webhook: {SENDGRID_SIGNATURE_HEADER} is not valid base64"
            ) from None
        try:
            self._key.verify(decoded, timestamp.encode("utf-8") + body, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise VerificationFailed(
                f"{SENDGRID} webhook: the signature does not match the timestamp and body. Check "
                "SEQUENCER_SENDGRID_PUBLIC_KEY against the key SendGrid shows"
            ) from None


def _sendgrid_public_key(text: str) -> ec.EllipticCurvePublicKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ValueError(
            "invalid SendGrid public key: expected the base64 verification key that SendGrid "
            "shows for the signed event webhook"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("invalid SendGrid public key: expected an ECDSA P-256 public key")
    return key


def parse_sendgrid_events(payload: Any) -> list[MailEvent]:
    """Parse a SendGrid event webhook body, a JSON array of events, one recipient each."""
    if not isinstance(payload, list):
        raise InvalidPayload(
            f"{SENDGRID} webhook: the body must be a JSON array of events, not "
            + _json_type(payload)
        )
    return [_sendgrid_event(_Fields(item, SENDGRID, f"[{i}]")) for i, item in enumerate(payload)]


_SENDGRID_USED_EVENTS = frozenset({"bounce", "dropped", "deferred", "spamreport"})


def _sendgrid_event(fields: _Fields) -> MailEvent:
    event = fields.text("event")
    if event not in _SENDGRID_USED_EVENTS:
        # processed, delivered, open, click, unsubscribe and the group events.
        # NOTE: an unsubscribe through SendGrid's link is ignored, because the engine has no
        # inbound kind for it. Suppress the address with `sequencer unsubscribe` meanwhile.
        event_id = _loose_event_id(fields.data.get("sg_event_id"))
        message = _ignored_message(f"SendGrid {event[:60]!r} event: nothing to apply")
        return MailEvent(f"sendgrid:{event_id}", f"sendgrid event {event_id}", message)

    event_id = fields.event_id("sg_event_id")
    address = fields.text("email")
    original_message_id = _angle_message_id(fields.optional_text("smtp-id"))
    if event == "bounce":
        message = _sendgrid_bounce(fields, address, original_message_id)
    elif event == "dropped":
        drop_reason = fields.optional_text("reason") or ""
        if drop_reason.strip().lower() == "bounced address":
            # SendGrid did not send because the address bounced before.
            message = _previously_bounced_message(
                address,
                drop_reason,
                "SendGrid dropped event (Bounced Address)",
                original_message_id,
            )
        else:
            message = _ignored_message(
                f"SendGrid dropped event ({drop_reason[:80] or 'no reason'}): nothing to apply"
            )
    elif event == "deferred":
        message = _delay_message(
            address,
            fields.optional_text("response"),
            "SendGrid deferred event",
            original_message_id,
        )
    else:
        message = _complaint_message(address, "SendGrid spamreport event", original_message_id)
    return MailEvent(f"sendgrid:{event_id}", f"sendgrid event {event_id}", message)


def _sendgrid_bounce(
    fields: _Fields, address: str, original_message_id: str | None
) -> InboundMessage:
    bounce_type = (fields.optional_text("type") or "bounce").lower()
    status = fields.optional_text("status")
    diagnostic = fields.optional_text("reason")
    classification = fields.optional_text("bounce_classification")
    reason = f"SendGrid bounce event (type {bounce_type}, {classification or 'unclassified'})"
    failure = _failure(address, permanent=True, status=status, diagnostic=diagnostic)
    if bounce_type == "blocked" and not failure.recipient.sender_side:
        # SendGrid's "blocked" is a refusal of the sending IP or domain, not of the address.
        return _sender_side_message(
            address, "blocked", reason, original_message_id, status=status, diagnostic=diagnostic
        )
    return _failure_message(failure, reason, original_message_id)


# --- Mailgun ----------------------------------------------------------------------------------


class MailgunWebhook:
    """Settings and verification of Mailgun's JSON webhooks.

    `signing_key` is the account's HTTP webhook signing key. A timestamp further than
    `tolerance` from `clock()` (seconds since the epoch) is rejected, so a captured request
    cannot be replayed later.

    Mailgun signs only the timestamp and token, not the event. So that a captured request
    cannot be sent again with another event inside the tolerance, each token is remembered
    with a digest of its event-data, and the same token with a different event is rejected.
    NOTE: the tokens are kept in this object's memory, so receivers in several processes do
    not see each other's tokens.
    """

    def __init__(
        self,
        signing_key: str,
        *,
        tolerance: timedelta = DEFAULT_MAILGUN_TOLERANCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not signing_key:
            raise ValueError("the Mailgun webhook signing key must not be empty")
        if tolerance <= timedelta(0):
            raise ValueError(f"invalid Mailgun timestamp tolerance {tolerance}: must be positive")
        self._key = signing_key.encode("utf-8")
        self.tolerance = tolerance
        self._clock = clock
        # Token -> (when it may be forgotten, digest of its event-data), oldest first.
        self._tokens: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def verify(self, payload: Any) -> None:
        """Check `signature.{timestamp, token, signature}` of a decoded body. Raises
        VerificationFailed."""
        block = payload.get("signature") if isinstance(payload, dict) else None
        if not isinstance(block, dict):
            raise VerificationFailed(f"{MAILGUN} webhook: the body has no signature object")
        values = {}
        for name in ("timestamp", "token", "signature"):
            value = block.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and name == "timestamp":
                value = str(value)
            if not isinstance(value, str) or not value:
                raise VerificationFailed(
                    f"{MAILGUN} webhook: signature.{name} is missing or not a string"
                )
            values[name] = value

        expected = hmac.new(
            self._key, (values["timestamp"] + values["token"]).encode("utf-8"), hashlib.sha256
        ).hexdigest()
        # Compare bytes, because compare_digest rejects str with non-ASCII characters.
        if not hmac.compare_digest(
            values["signature"].strip().lower().encode("utf-8"), expected.encode("ascii")
        ):
            raise VerificationFailed(
                f"{MAILGUN} webhook: signature.signature does not match. Check "
                "SEQUENCER_MAILGUN_SIGNING_KEY against Mailgun's HTTP webhook signing key"
            )

        now = self._clock()
        try:
            timestamp = int(values["timestamp"])
            age = float(now - timestamp)
        except ValueError:
            raise VerificationFailed(
                f"{MAILGUN} webhook: signature.timestamp is not an integer"
            ) from None
        except OverflowError:
            raise VerificationFailed(
                f"{MAILGUN} webhook: signature.timestamp is too large to be a Unix time"
            ) from None
        tolerance = self.tolerance.total_seconds()
        if abs(age) > tolerance:
            raise VerificationFailed(
                f"{MAILGUN} webhook: signature.timestamp is {age:.0f} s from now, more than "
                f"{tolerance:.0f} s. Check the receiver's clock"
            )

        self._check_token(values["token"], payload.get("event-data"), now, timestamp + tolerance)

    def _check_token(self, token: str, event_data: Any, now: float, forget_at: float) -> None:
        """Remember the token's event, and raise VerificationFailed when the token came before
        with another event. A retry of the same request passes."""
        while self._tokens and (
            next(iter(self._tokens.values()))[0] < now or len(self._tokens) > MAX_MAILGUN_TOKENS
        ):
            self._tokens.popitem(last=False)

        canonical = json.dumps(event_data, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        seen = self._tokens.get(token)
        if seen is not None and not hmac.compare_digest(seen[1], digest):
            raise VerificationFailed(
                f"{MAILGUN} webhook: signature.token was used before with another event, so "
                "the request was altered after Mailgun signed it"
            )
        self._tokens[token] = (forget_at, digest)


def parse_mailgun_event(payload: Any) -> list[MailEvent]:
    """Parse a Mailgun webhook body (`signature` and `event-data`) into at most one event."""
    root = _Fields(payload, MAILGUN)
    data = root.object("event-data")
    event = data.text("event")
    if event not in ("failed", "complained"):
        # accepted, delivered, opened, clicked, unsubscribed and stored.
        message = _ignored_message(f"Mailgun {event[:60]!r} event: nothing to apply")
        event_id = _loose_event_id(data.data.get("id"))
        return [MailEvent(f"mailgun:{event_id}", f"mailgun event {event_id}", message)]

    if "id" in data:
        event_id = data.event_id("id")
    else:
        event_id = root.object("signature").event_id("token")
    address = data.text("recipient")
    message_headers = data.optional_object("message")
    headers = message_headers.optional_object("headers") if message_headers else None
    original_message_id = (
        _angle_message_id(headers.optional_text("message-id")) if headers else None
    )

    if event == "complained":
        message = _complaint_message(address, "Mailgun complained event", original_message_id)
    else:
        severity = data.text("severity")
        if severity not in ("permanent", "temporary"):
            raise InvalidPayload(
                f"{MAILGUN} webhook: event-data.severity {severity[:40]!r} is not permanent or "
                "temporary"
            )
        status_fields = data.optional_object("delivery-status")
        code = enhanced = diagnostic = None
        if status_fields is not None:
            code = status_fields.optional_integer("code")
            enhanced = status_fields.optional_text("enhanced-code")
            texts = (
                status_fields.optional_text("message"),
                status_fields.optional_text("description"),
            )
            diagnostic = " ".join(text.strip() for text in texts if text and text.strip()) or None
        failure = _failure(
            address,
            permanent=severity == "permanent",
            status=enhanced,
            diagnostic=diagnostic,
            reply_code=code,
        )
        reason = f"Mailgun failed event ({severity}, {data.optional_text('reason') or 'no reason'})"
        message = _failure_message(failure, reason, original_message_id)
    return [MailEvent(f"mailgun:{event_id}", f"mailgun event {event_id}", message)]


# --- Postmark ---------------------------------------------------------------------------------


class PostmarkWebhook:
    """Settings and verification of Postmark webhooks, which authenticate with HTTP basic auth
    (the user name and password in the webhook URL)."""

    def __init__(self, user: str, password: str) -> None:
        if not user or not password:
            raise ValueError("the Postmark webhook user name and password must not be empty")
        if ":" in user:
            raise ValueError("the Postmark webhook user name must not contain a colon")
        self._user = user.encode("utf-8")
        self._password = password.encode("utf-8")

    def verify(self, authorization: str | None) -> None:
        """Check an Authorization header. Raises VerificationFailed."""
        if not authorization:
            raise VerificationFailed(f"{POSTMARK} webhook: missing Authorization header")
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            raise VerificationFailed(f"{POSTMARK} webhook: the Authorization scheme is not Basic")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise VerificationFailed(
                f"{POSTMARK} webhook: the Basic credentials are not valid base64"
            ) from None
        user, separator, password = decoded.partition(b":")
        # Compare both parts every time, so the time taken does not tell which one was wrong.
        user_matches = hmac.compare_digest(user, self._user)
        password_matches = hmac.compare_digest(password, self._password)
        if not (separator and user_matches & password_matches):
            raise VerificationFailed(
                f"{POSTMARK} webhook: wrong user name or password. Check "
                "SEQUENCER_POSTMARK_WEBHOOK_USER and SEQUENCER_POSTMARK_WEBHOOK_PASSWORD"
            )


# Postmark bounce types (the Type field), as the postmark npm package 4.0.2 names them.
_POSTMARK_HARD = frozenset({"HardBounce", "BadEmailAddress"})
_POSTMARK_SOFT = frozenset({"Transient", "SoftBounce", "DnsError", "Unknown"})
_POSTMARK_SENDER_SIDE = {
    "Blocked": "blocked",
    "DMARCPolicy": "sender-auth-failure",
    "SpamNotification": "content-rejected-spam",
    "VirusNotification": "content-rejected-virus",
}


def parse_postmark_event(payload: Any) -> list[MailEvent]:
    """Parse a Postmark webhook body, one record about one recipient."""
    fields = _Fields(payload, POSTMARK)
    record_type = fields.text("RecordType")
    if record_type not in ("Bounce", "SpamComplaint"):
        # Delivery, Open, Click and SubscriptionChange.
        message = _ignored_message(f"Postmark {record_type[:60]!r} record: nothing to apply")
        event_id = _loose_event_id(fields.data.get("ID") or fields.data.get("MessageID"))
        return [MailEvent(f"postmark:{event_id}", f"postmark event {event_id}", message)]

    if "ID" in fields:
        event_id = fields.event_id("ID")
    else:
        event_id = f"{fields.event_id('MessageID')}:{record_type}"
    address = fields.text("Email")
    if record_type == "SpamComplaint":
        message = _complaint_message(address, "Postmark SpamComplaint record", None)
    else:
        message = _postmark_bounce(fields, address)
    return [MailEvent(f"postmark:{event_id}", f"postmark event {event_id}", message)]


def _postmark_bounce(fields: _Fields, address: str) -> InboundMessage:
    """Map a Postmark Bounce record by its Type. Postmark has no Message-ID of the sent message
    in the record, so the engine matches the lead by address."""
    bounce_type = fields.text("Type")
    details = fields.optional_text("Details")
    description = fields.optional_text("Description")
    reason = f"Postmark {bounce_type} bounce"

    if bounce_type == "AutoResponder":
        text = " ".join(
            part for part in (description, details, fields.optional_text("Subject")) if part
        )
        subtype = "out-of-office" if _OUT_OF_OFFICE.search(text) else "auto-reply"
        return InboundMessage(
            kind=InboundKind.AUTO_REPLY,
            subtype=subtype,
            recipients=(_recipient(address, subtype),),
            reason=f"{reason}: the recipient's server answered automatically",
        )
    if bounce_type == "SpamComplaint":
        return _complaint_message(address, reason, None)
    if bounce_type in _POSTMARK_SENDER_SIDE:
        return _sender_side_message(
            address, _POSTMARK_SENDER_SIDE[bounce_type], reason, None, diagnostic=details
        )
    if bounce_type in _POSTMARK_HARD or bounce_type in _POSTMARK_SOFT:
        failure = _failure(
            address,
            permanent=bounce_type in _POSTMARK_HARD,
            status=None,
            diagnostic=details or None,
        )
        return _failure_message(failure, reason, None)
    # Unsubscribe, Subscribe, AddressChange, ManuallyDeactivated, SMTPApiError and the others
    # are not about a delivery to the lead.
    return _ignored_message(f"{reason}: nothing to apply")
