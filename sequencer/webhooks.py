"""Receiver for provider webhooks: a LinkedIn provider's invitation events, and the bounces,
complaints and auto-replies that email service providers report.

LinkedIn

The provider (the local `sequencer.linkedin_sandbox`, or a real provider that sends the same
format) POSTs one JSON event per decision on an invitation to /webhooks/linkedin:

    {"event_id", "event", "invitation_id"?, "idempotency_key": "WORKFLOW_ID:STEP",
     "occurred_at": ISO 8601 with a UTC offset, ...}

with the header `X-Sandbox-Signature: sha256=<hex HMAC-SHA256 of the raw body>`. Other fields,
such as profile_url, are ignored. The app checks the signature, turns an invitation event into
an `InvitationEvent` and passes it to the engine's `on_invitation` callback. The response
status decides whether the provider retries:

    200  handled, or an event type that the engine does not use: the provider stops retrying
    401  the signature header is missing or wrong
    413  the body is larger than MAX_BODY_BYTES
    422  the body is not JSON, or a field is missing or invalid
    4xx or 5xx  on_invitation raised WebhookRejected with that status
    500  on_invitation raised another exception, so the provider retries

The receiver does not deduplicate events. A provider retries an event with the same event_id,
and the engine records each event_id once.

Email service providers

Each provider has its own route, which is off until its settings are given (see
`mail_webhooks_from_settings`). `sequencer.provider_webhooks` verifies each request and maps
every event to an `InboundMessage` per recipient, which goes to the engine's `on_mail_event`
callback with the event key "<provider>:<event id>":

    POST /webhooks/ses        Amazon SES notifications in signed SNS messages. A verified
                              SubscriptionConfirmation is confirmed by fetching its SubscribeURL.
    POST /webhooks/sendgrid   SendGrid's signed event webhook (ECDSA), a JSON array of events
    POST /webhooks/mailgun    Mailgun's JSON webhooks, signed with HMAC-SHA256
    POST /webhooks/postmark   Postmark's webhooks, with HTTP basic auth

    200  handled, with {"events", "ignored", "results"}. Deliveries, opens, clicks and other
         events that change nothing for a lead are counted as ignored and not passed on.
    401  the signature or credentials are missing or wrong, or a bare SES notification came
         without its SNS message, which cannot be verified (Postmark: with WWW-Authenticate)
    403  a correctly signed SNS message from a topic not in SEQUENCER_SES_TOPIC_ARNS
    404  the provider is not configured, and the message names the setting to set
    413  the body is larger than MAIL_MAX_BODY_BYTES
    422  the body is not JSON, or a field is missing or of the wrong type
    500  on_mail_event raised, so the provider retries. Events of a batch passed on before the
         failure are passed again on the retry, and the engine ignores their keys then.
    503  the SNS certificate or SubscribeURL could not be fetched, so SNS retries
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypedDict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from sequencer.config import Settings
from sequencer.inbound import InboundKind, InboundMessage
from sequencer.provider_webhooks import (
    MAILGUN,
    POSTMARK,
    SENDGRID,
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    SES,
    FetchFailed,
    InvalidPayload,
    MailEvent,
    MailgunWebhook,
    PostmarkWebhook,
    SendGridWebhook,
    SesWebhook,
    TopicNotAllowed,
    VerificationFailed,
    decode_json,
    is_sns_envelope,
    load_json,
    parse_mailgun_event,
    parse_postmark_event,
    parse_sendgrid_events,
    parse_sns_envelope,
    ses_events_from_envelope,
)

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sandbox-Signature"
MAX_BODY_BYTES = 64 * 1024
# NOTE: an estimate. SendGrid posts several events in one request, and its largest batch was
# not checked; a larger body is rejected with 413.
MAIL_MAX_BODY_BYTES = 1024 * 1024
POSTMARK_CHALLENGE = 'Basic realm="Sequencer webhooks"'

MailEventHandler = Callable[[InboundMessage, str, str], Awaitable[list[str]]]
"""The engine's `apply_inbound`, called as `on_mail_event(message, key, source)`. It returns
the result lines for the response."""

# Whether the lead is now connected, for each provider event that the engine uses.
INVITATION_EVENTS: dict[str, bool] = {
    "invitation.accepted": True,
    "invitation.declined": False,
    "invitation.withdrawn": False,
}

# The activity sends "WORKFLOW_ID:STEP_NUMBER". The workflow id runs to the last colon.
_IDEMPOTENCY_KEY = re.compile(r"(?P<workflow_id>[^\x00-\x20\x7f]+):(?P<step>[0-9]{1,9})")
# Visible ASCII only, so that a logged id cannot forge log lines.
_PROVIDER_ID = r"^[\x21-\x7e]+$"


class InvitationEvent(BaseModel):
    """A provider's report that an invitation was accepted, declined or withdrawn, reduced to
    what the engine needs."""

    event_id: str
    workflow_id: str
    step: int = Field(ge=1)
    accepted: bool
    occurred_at: datetime
    invitation_id: str | None = None
    # The provider's event type, such as invitation.withdrawn.
    detail: str | None = None


class WebhookRejected(Exception):
    """Raised by `on_invitation` so that the receiver responds with `status` and
    {"error": message}.

    The sandbox retries a 429 or 5xx and gives up on any other 4xx.
    """

    def __init__(self, status: int, message: str) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"WebhookRejected needs a 4xx or 5xx status, not {status}")
        super().__init__(message)
        self.status = status
        self.message = message


class _InvitationPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event_id: str = Field(min_length=1, max_length=200, pattern=_PROVIDER_ID)
    event: str
    invitation_id: str | None = Field(default=None, max_length=200, pattern=_PROVIDER_ID)
    idempotency_key: str = Field(min_length=1, max_length=500)
    occurred_at: AwareDatetime


class _InvalidPayload(Exception):
    """A webhook body that the receiver cannot use. The message names the field or value."""


class MailWebhooks(TypedDict, total=False):
    """The email provider routes to serve, as keyword arguments of `create_webhook_app`."""

    ses: SesWebhook
    sendgrid: SendGridWebhook
    mailgun: MailgunWebhook
    postmark: PostmarkWebhook


def mail_webhooks_from_settings(settings: Settings) -> MailWebhooks:
    """Build the verifiers of the email providers that the settings configure.

    Raises ValueError naming the setting when a value is invalid, or when only one of the two
    Postmark credentials is set.
    """
    webhooks: MailWebhooks = {}
    if settings.ses_webhook_enabled or settings.ses_topic_arns:
        try:
            webhooks["ses"] = SesWebhook(topic_arns=settings.ses_topic_arns)
        except ValueError as error:
            raise ValueError(f"SEQUENCER_SES_TOPIC_ARNS: {error}") from None
    if settings.sendgrid_public_key:
        try:
            webhooks["sendgrid"] = SendGridWebhook(settings.sendgrid_public_key)
        except ValueError as error:
            raise ValueError(f"SEQUENCER_SENDGRID_PUBLIC_KEY: {error}") from None
    if settings.mailgun_signing_key:
        webhooks["mailgun"] = MailgunWebhook(settings.mailgun_signing_key)
    user = settings.postmark_webhook_user
    password = settings.postmark_webhook_password
    if user or password:
        if not (user and password):
            raise ValueError(
                "set both SEQUENCER_POSTMARK_WEBHOOK_USER and SEQUENCER_POSTMARK_WEBHOOK_PASSWORD "
                "to receive Postmark webhooks, or neither"
            )
        try:
            webhooks["postmark"] = PostmarkWebhook(user, password)
        except ValueError as error:
            raise ValueError(f"SEQUENCER_POSTMARK_WEBHOOK_USER: {error}") from None
    return webhooks


def create_webhook_app(
    *,
    linkedin_secret: str,
    on_invitation: Callable[[InvitationEvent], Awaitable[str]],
    ses: SesWebhook | None = None,
    sendgrid: SendGridWebhook | None = None,
    mailgun: MailgunWebhook | None = None,
    postmark: PostmarkWebhook | None = None,
    on_mail_event: MailEventHandler | None = None,
) -> FastAPI:
    """Build the webhook receiver.

    `linkedin_secret` is the HMAC key shared with the provider. `on_invitation` records one
    event and returns a short result for the response. Raises ValueError when the secret is
    empty, because then any sender could forge events.

    `ses`, `sendgrid`, `mailgun` and `postmark` turn on the route of each email provider, whose
    events go to `on_mail_event`. Raises ValueError when a provider is given without it.
    """
    if not linkedin_secret:
        raise ValueError(
            "the LinkedIn webhook secret must not be empty, because it is what proves that "
            "an invitation event comes from the provider. Set it to the provider's webhook secret"
        )
    key = linkedin_secret.encode("utf-8")
    signature_failures = _FailureCounter()

    app = FastAPI(title="Sequencer webhooks", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks/linkedin")
    async def receive_linkedin(request: Request) -> JSONResponse:
        body = await _read_body(request)
        if body is None:
            logger.warning("rejected a LinkedIn webhook larger than %d bytes", MAX_BODY_BYTES)
            return _reject(413, f"the body is larger than {MAX_BODY_BYTES} bytes")

        problem = _signature_problem(request.headers.get(SIGNATURE_HEADER), body, key)
        if problem is not None:
            signature_failures.log(problem)
            return _reject(401, problem)

        try:
            payload = _parse_json_object(body)
            event_type = _event_type(payload)
            if event_type not in INVITATION_EVENTS:
                logger.info("ignored LinkedIn webhook event type %r", event_type[:100])
                return JSONResponse(
                    {"result": f"ignored: the event type {event_type[:100]!r} is not used"}
                )
            event = _invitation_event(payload, event_type)
        except _InvalidPayload as error:
            logger.warning("rejected an invalid LinkedIn webhook: %s", error)
            return _reject(422, str(error))

        return await _deliver(event, on_invitation)

    providers = {SES: ses, SENDGRID: sendgrid, MAILGUN: mailgun, POSTMARK: postmark}
    configured = [name for name, webhook in providers.items() if webhook is not None]
    if on_mail_event is None and configured:
        raise ValueError(
            f"webhooks of {', '.join(configured)} need an on_mail_event callback to pass "
            "their events to"
        )
    _add_mail_routes(app, _MailReceiver(on_mail_event), ses, sendgrid, mailgun, postmark)
    if ses is not None and not ses.topic_arns:
        logger.warning(
            "the Amazon SES webhook accepts every SNS topic: set SEQUENCER_SES_TOPIC_ARNS, "
            "because anyone can subscribe the receiver to a topic of their own"
        )
    return app


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """Return the raw body, or None when it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _signature_problem(header: str | None, body: bytes, key: bytes) -> str | None:
    """Return why the signature header does not prove the body, or None when it does."""
    if not header:
        return f"missing {SIGNATURE_HEADER} header: sign the body with HMAC-SHA256"
    expected = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    # Compare bytes, because compare_digest rejects str with non-ASCII characters.
    if not hmac.compare_digest(header.strip().encode("utf-8"), expected.encode("ascii")):
        return (
            f"invalid {SIGNATURE_HEADER} header: it does not match the body. Check that the "
            "provider and the receiver share the same webhook secret"
        )
    return None


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = load_json(body)
    except ValueError as error:
        raise _InvalidPayload(f"the body is {error}") from error
    if not isinstance(payload, dict):
        raise _InvalidPayload(f"the body must be a JSON object, not {type(payload).__name__}")
    return payload


def _event_type(payload: dict[str, Any]) -> str:
    event_type = payload.get("event")
    if not isinstance(event_type, str) or not event_type:
        raise _InvalidPayload("event: missing, or not a non-empty string")
    return event_type


def _invitation_event(payload: dict[str, Any], event_type: str) -> InvitationEvent:
    """Validate an invitation payload and convert it to the engine's event."""
    try:
        fields = _InvitationPayload.model_validate(payload)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = ".".join(str(part) for part in item["loc"])
            problems.append(f"{location}: {item['msg']}")
        raise _InvalidPayload("; ".join(problems)) from error

    workflow_id, step = _parse_idempotency_key(fields.idempotency_key)
    return InvitationEvent(
        event_id=fields.event_id,
        workflow_id=workflow_id,
        step=step,
        accepted=INVITATION_EVENTS[event_type],
        occurred_at=fields.occurred_at,
        invitation_id=fields.invitation_id,
        detail=event_type,
    )


def _parse_idempotency_key(value: str) -> tuple[str, int]:
    match = _IDEMPOTENCY_KEY.fullmatch(value)
    step = int(match["step"]) if match else 0
    if match is None or step < 1:
        raise _InvalidPayload(
            f"invalid idempotency_key {value!r}: expected WORKFLOW_ID:STEP with a positive "
            "integer STEP, as the LinkedIn activity sends it"
        )
    return match["workflow_id"], step


async def _deliver(
    event: InvitationEvent, on_invitation: Callable[[InvitationEvent], Awaitable[str]]
) -> JSONResponse:
    """Pass the event to the engine and turn its result or error into the response."""
    try:
        result = await on_invitation(event)
    except WebhookRejected as error:
        logger.warning(
            "LinkedIn webhook event %s for workflow %s step %s rejected with HTTP %s: %s",
            event.event_id,
            event.workflow_id,
            event.step,
            error.status,
            error.message,
        )
        return _reject(error.status, error.message)
    except Exception:
        # The provider retries a 500, so the event is not lost.
        logger.exception(
            "recording LinkedIn webhook event %s for workflow %s step %s failed",
            event.event_id,
            event.workflow_id,
            event.step,
        )
        return _reject(500, f"recording event {event.event_id} failed, retry later")

    logger.info(
        "LinkedIn webhook event %s (%s) for workflow %s step %s: %s",
        event.event_id,
        event.detail,
        event.workflow_id,
        event.step,
        result,
    )
    return JSONResponse({"result": result})


def _reject(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _FailureCounter:
    """Logs a provider's signature failures at WARNING for the 1st, 10th, 100th and so on, and
    the rest at DEBUG, so that a misconfigured or hostile sender cannot flood the log."""

    def __init__(self, provider: str = "LinkedIn", failure: str = "signature failure") -> None:
        self.count = 0
        self.provider = provider
        self.failure = failure

    def log(self, problem: str) -> None:
        self.count += 1
        level = logging.WARNING if _is_power_of_ten(self.count) else logging.DEBUG
        logger.log(
            level,
            "rejected %s webhook (%s %d): %s",
            self.provider,
            self.failure,
            self.count,
            problem,
        )


def _is_power_of_ten(number: int) -> bool:
    while number >= 10 and number % 10 == 0:
        number //= 10
    return number == 1


# --- email providers --------------------------------------------------------------------------

# The setting that turns on each provider's route, for the 404 message.
_PROVIDER_SETTINGS = {
    SES: "SEQUENCER_SES_ENABLED=true or SEQUENCER_SES_TOPIC_ARNS",
    SENDGRID: "SEQUENCER_SENDGRID_PUBLIC_KEY",
    MAILGUN: "SEQUENCER_MAILGUN_SIGNING_KEY",
    POSTMARK: "SEQUENCER_POSTMARK_WEBHOOK_USER and SEQUENCER_POSTMARK_WEBHOOK_PASSWORD",
}


class _Received:
    """The outcome of a provider request: events for the engine, or a result without events."""

    def __init__(self, events: list[MailEvent] | None = None, result: str | None = None) -> None:
        self.events = events or []
        self.result = result


_ReadEvents = Callable[[Request, bytes], Awaitable[_Received]]


class _MailReceiver:
    """The steps that every email provider route shares: size limit, verification and parsing
    errors as statuses, and delivery of each event to the engine."""

    def __init__(self, on_mail_event: MailEventHandler | None) -> None:
        # None only when no provider is configured, so every route responds with 404.
        self.on_mail_event = on_mail_event
        self.failures = {
            SES: _FailureCounter(SES),
            SENDGRID: _FailureCounter(SENDGRID),
            MAILGUN: _FailureCounter(MAILGUN),
            POSTMARK: _FailureCounter(POSTMARK, "authentication failure"),
        }

    async def receive(
        self,
        provider: str,
        request: Request,
        read_events: _ReadEvents | None,
        challenge: str | None = None,
    ) -> JSONResponse:
        on_mail_event = self.on_mail_event
        if read_events is None or on_mail_event is None:
            return _reject(
                404,
                f"the {provider} webhook is not configured: set {_PROVIDER_SETTINGS[provider]}",
            )
        body = await _read_body(request, MAIL_MAX_BODY_BYTES)
        if body is None:
            logger.warning(
                "rejected a %s webhook larger than %d bytes", provider, MAIL_MAX_BODY_BYTES
            )
            return _reject(413, f"the body is larger than {MAIL_MAX_BODY_BYTES} bytes")

        try:
            received = await read_events(request, body)
        except TopicNotAllowed as error:
            logger.warning("rejected a %s webhook: %s", provider, error)
            return _reject(403, str(error))
        except VerificationFailed as error:
            self.failures[provider].log(str(error))
            headers = {"WWW-Authenticate": challenge} if challenge else None
            return _reject(401, str(error), headers)
        except InvalidPayload as error:
            logger.warning("rejected an invalid %s webhook: %s", provider, error)
            return _reject(422, str(error))
        except FetchFailed as error:
            logger.warning(
                "could not verify a %s webhook, so it will be retried: %s", provider, error
            )
            return _reject(503, f"{error}. Retry later")

        if received.result is not None:
            return JSONResponse({"result": received.result})
        return await _deliver_mail_events(provider, received.events, on_mail_event)


async def _deliver_mail_events(
    provider: str, events: list[MailEvent], on_mail_event: MailEventHandler
) -> JSONResponse:
    """Pass each event that concerns a lead to the engine, in order, and stop at the first
    failure so that the provider retries the whole request."""
    results: list[str] = []
    ignored = 0
    for event in events:
        message = event.message
        if message.kind == InboundKind.UNRELATED:
            ignored += 1
            logger.debug("ignored %s: %s", event.source, message.reason)
            continue
        try:
            lines = await on_mail_event(message, event.key, event.source)
        except WebhookRejected as error:
            logger.warning(
                "%s rejected with HTTP %s: %s", event.source, error.status, error.message
            )
            return _reject(error.status, error.message)
        except Exception:
            # The provider retries a 500, and the engine skips the events already applied.
            logger.exception("recording %s (%s) failed", event.source, message.kind.value)
            return _reject(500, f"recording {event.source} failed, retry later")
        # The result lines name leads by address, so only their number is logged.
        logger.info(
            "%s webhook %s: %s (%s), %d result line(s)",
            provider,
            event.source,
            message.kind.value,
            message.subtype,
            len(lines),
        )
        results.extend(lines)
    return JSONResponse({"events": len(events), "ignored": ignored, "results": results})


def _add_mail_routes(
    app: FastAPI,
    receiver: _MailReceiver,
    ses: SesWebhook | None,
    sendgrid: SendGridWebhook | None,
    mailgun: MailgunWebhook | None,
    postmark: PostmarkWebhook | None,
) -> None:
    """Add the route of each email provider. A provider that is not configured gets 404."""

    @app.post("/webhooks/ses")
    async def receive_ses(request: Request) -> JSONResponse:
        reader = _ses_reader(ses) if ses is not None else None
        return await receiver.receive(SES, request, reader)

    @app.post("/webhooks/sendgrid")
    async def receive_sendgrid(request: Request) -> JSONResponse:
        reader = _sendgrid_reader(sendgrid) if sendgrid is not None else None
        return await receiver.receive(SENDGRID, request, reader)

    @app.post("/webhooks/mailgun")
    async def receive_mailgun(request: Request) -> JSONResponse:
        reader = _mailgun_reader(mailgun) if mailgun is not None else None
        return await receiver.receive(MAILGUN, request, reader)

    @app.post("/webhooks/postmark")
    async def receive_postmark(request: Request) -> JSONResponse:
        reader = _postmark_reader(postmark) if postmark is not None else None
        return await receiver.receive(POSTMARK, request, reader, challenge=POSTMARK_CHALLENGE)


def _ses_reader(ses: SesWebhook) -> _ReadEvents:
    async def read(request: Request, body: bytes) -> _Received:
        payload = decode_json(body, SES)
        if not is_sns_envelope(payload):
            raise VerificationFailed(
                f"{SES} webhook: the body is not an SNS message, so it cannot be verified. "
                "Subscribe the endpoint to the SNS topic with raw message delivery turned off"
            )
        envelope = parse_sns_envelope(payload)
        await ses.verify(envelope)

        if envelope.type == "SubscriptionConfirmation":
            await ses.confirm_subscription(envelope)
            logger.info("confirmed the SNS subscription to topic %s", envelope.topic_arn)
            return _Received(result=f"confirmed the subscription to {envelope.topic_arn}")
        if envelope.type == "UnsubscribeConfirmation":
            logger.info(
                "SNS topic %s reports that it unsubscribed the receiver", envelope.topic_arn
            )
            return _Received(result="unsubscribe confirmation received; nothing changed")
        return _Received(ses_events_from_envelope(envelope))

    return read


def _sendgrid_reader(sendgrid: SendGridWebhook) -> _ReadEvents:
    async def read(request: Request, body: bytes) -> _Received:
        sendgrid.verify(
            request.headers.get(SENDGRID_SIGNATURE_HEADER),
            request.headers.get(SENDGRID_TIMESTAMP_HEADER),
            body,
        )
        return _Received(parse_sendgrid_events(decode_json(body, SENDGRID)))

    return read


def _mailgun_reader(mailgun: MailgunWebhook) -> _ReadEvents:
    async def read(request: Request, body: bytes) -> _Received:
        payload = decode_json(body, MAILGUN)
        mailgun.verify(payload)
        return _Received(parse_mailgun_event(payload))

    return read


def _postmark_reader(postmark: PostmarkWebhook) -> _ReadEvents:
    async def read(request: Request, body: bytes) -> _Received:
        postmark.verify(request.headers.get("Authorization"))
        return _Received(parse_postmark_event(decode_json(body, POSTMARK)))

    return read
