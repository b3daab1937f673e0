"""Receiver for a LinkedIn provider's webhooks, which report accepted and declined invitations.

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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Sandbox-Signature"
MAX_BODY_BYTES = 64 * 1024

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


def create_webhook_app(
    *,
    linkedin_secret: str,
    on_invitation: Callable[[InvitationEvent], Awaitable[str]],
) -> FastAPI:
    """Build the webhook receiver.

    `linkedin_secret` is the HMAC key shared with the provider. `on_invitation` records one
    event and returns a short result for the response. Raises ValueError when the secret is
    empty, because then any sender could forge events.
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

    return app


async def _read_body(request: Request) -> bytes | None:
    """Return the raw body, or None when it exceeds MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
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
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _InvalidPayload(f"the body is not valid JSON: {error}") from error
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


def _reject(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _FailureCounter:
    """Logs signature failures at WARNING for the 1st, 10th, 100th and so on, and the rest at
    DEBUG, so that a misconfigured or hostile sender cannot flood the log."""

    def __init__(self) -> None:
        self.count = 0

    def log(self, problem: str) -> None:
        self.count += 1
        level = logging.WARNING if _is_power_of_ten(self.count) else logging.DEBUG
        logger.log(
            level, "rejected LinkedIn webhook (signature failure %d): %s", self.count, problem
        )


def _is_power_of_ten(number: int) -> bool:
    while number >= 10 and number % 10 == 0:
        number //= 10
    return number == 1
