"""A local stand-in for a LinkedIn automation provider such as Unipile or HeyReach.

It accepts profile visits, invitations and messages over a small JSON API, sends nothing to
LinkedIn, and records every accepted action. Tests and demos point the LinkedIn activity at
it instead of a real provider.

Every request under /v1 and /sandbox needs the header `Authorization: Bearer <api key>`.

    POST /v1/profile-visits   {"profile_url", "idempotency_key"?}
    POST /v1/invitations      {"profile_url", "idempotency_key"?, "note"?}  note <= 300 chars
    POST /v1/messages         {"profile_url", "idempotency_key"?, "text"}
    GET  /v1/invitations/ID   the invitation: {"id", "invitation_status", "profile_url",
                              "idempotency_key", "note"?, "created_at", "responded_at"}
    GET  /v1/account          200 {"status": "connected"}, or 401 session_expired
    GET  /v1/actions          the accepted actions, oldest first
    POST /sandbox/session     {"expired": true | false}  log the LinkedIn account out or in

An accepted action returns 201 {"id", "status"} with status "visited" or "sent". An accepted
invitation also returns "invitation_status": "pending", and its id is the invitation id.
Errors return {"error": CODE} and, where useful, a "detail" sentence. The profile slug (the
part after /in/, or the id in the other URL forms that `profile_slug` accepts) chooses a
scripted behaviour:

    contains "deactivated"  410 profile_deactivated on every request
    contains "ratelimited"  429 with Retry-After: 1 for the first 2 requests for that profile
    contains "flaky"        503 for the first request for that profile
    contains "slow"         the action is accepted at once, but the response waits 1 second
    contains "declines"     an invitation is declined `accept_delay` seconds after it is sent
    contains "ignores"      an invitation stays pending for ever
    anything else           accepted, and an invitation is accepted after `accept_delay` seconds

A repeated idempotency key returns the first 201 response again and records no second action.
For an invitation, the replayed response carries the current invitation_status. Only accepted
actions are remembered, so a retry after a 429 or 503 is carried out.

Session expiry models a LinkedIn account that the provider has been logged out of. While the
session is expired, every /v1 request except GET /v1/actions returns 401
{"error": "session_expired", "detail"}. Leads still accept and decline invitations, but the
sandbox records each decision, and sends its webhook, only once the session is connected again,
so occurred_at is then the time of reconnection.

Webhooks: when `webhook_url` is set, each accepted or declined invitation is POSTed there as JSON

    {"event_id": UUID, "event": "invitation.accepted" | "invitation.declined",
     "invitation_id", "profile_url", "idempotency_key", "occurred_at": ISO 8601 UTC}

with the header `X-Sandbox-Signature: sha256=<hex HMAC-SHA256 of the body with the webhook
secret>`. A connection error, a timeout, a 429 or a 5xx is retried with the same event_id and
body after 0.5 s, then 1 s, 2 s and so on, for at most 6 attempts (the defaults of
`webhook_retry_delay` and `webhook_max_attempts`). Any other response that is not 2xx ends the
delivery. Deliveries run as tasks on the server's event loop, and stopping the
server cancels the ones still waiting.

Run it on its own with `python -m sequencer.linkedin_sandbox --port 8765`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import http
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

DEFAULT_API_KEY = "sandbox-key"
MAX_NOTE_LENGTH = 300
RATE_LIMITED_REQUESTS = 2
RATE_LIMIT_RETRY_AFTER_SECONDS = 1
FLAKY_FAILURES = 1
SLOW_RESPONSE_DELAY_SECONDS = 1.0
DEFAULT_ACCEPT_DELAY_SECONDS = 3.0
# Delay before the first webhook retry, doubled before each later one.
WEBHOOK_RETRY_DELAY_SECONDS = 0.5
WEBHOOK_MAX_ATTEMPTS = 6
# Connect, read and write timeout of each webhook attempt.
WEBHOOK_TIMEOUT_SECONDS = 5.0
SIGNATURE_HEADER = "X-Sandbox-Signature"
# How often a lead's decision that fell due during session expiry checks for reconnection.
SESSION_POLL_SECONDS = 0.1
STARTUP_TIMEOUT_SECONDS = 10.0
# Seconds that stop() lets a delayed response finish before uvicorn cancels it.
GRACEFUL_SHUTDOWN_SECONDS = 3


class _ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile_url: str = Field(min_length=1, max_length=2000)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)


class _VisitRequest(_ActionRequest):
    pass


class _InvitationRequest(_ActionRequest):
    note: str | None = Field(default=None, max_length=MAX_NOTE_LENGTH)


class _MessageRequest(_ActionRequest):
    text: str = Field(min_length=1, max_length=8000)


class _SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expired: StrictBool


INVITATION_PENDING = "pending"
INVITATION_ACCEPTED = "accepted"
INVITATION_DECLINED = "declined"

SESSION_EXPIRED_DETAIL = (
    "the LinkedIn account is logged out at the provider. Reconnect it "
    '(POST /sandbox/session with {"expired": false}) and retry the request'
)


class _SandboxState:
    """Accepted actions, invitations, webhook deliveries, stored responses by idempotency key,
    per-profile request counts and the session flag.

    The lock guards every field because `LinkedInSandbox` methods read and write them from the
    caller's thread while the server thread uses them.
    """

    def __init__(self, journal_path: Path | None) -> None:
        self.lock = threading.Lock()
        self.actions: list[dict[str, Any]] = []
        # idempotency key -> (request fingerprint, response body of the accepted action)
        self.responses: dict[str, tuple[str, dict[str, Any]]] = {}
        # (behaviour, profile slug) -> requests seen
        self.request_counts: dict[tuple[str, str], int] = {}
        # invitation id, which is the action id -> the body of GET /v1/invitations/ID
        self.invitations: dict[str, dict[str, Any]] = {}
        # one record per webhook event, oldest first, as LinkedInSandbox.deliveries() returns
        self.deliveries: list[dict[str, Any]] = []
        self.session_expired = False
        self.journal_path = journal_path
        if journal_path is not None:
            # Open once now so that a missing folder fails at startup, not on the first action.
            with journal_path.open("a", encoding="utf-8"):
                pass

    def count_request(self, behaviour: str, slug: str) -> int:
        key = (behaviour, slug)
        self.request_counts[key] = self.request_counts.get(key, 0) + 1
        return self.request_counts[key]

    def record(self, action: dict[str, Any]) -> None:
        self.actions.append(action)
        if self.journal_path is not None:
            with self.journal_path.open("a", encoding="utf-8") as journal:
                journal.write(json.dumps(action, ensure_ascii=False) + "\n")

    def set_session_expired(self, expired: bool) -> None:
        with self.lock:
            self.session_expired = expired
        logger.info("LinkedIn session is %s", "expired" if expired else "connected")


class _BackgroundTasks:
    """Tasks that outlive the request that started them: scheduled invitation decisions and
    webhook deliveries. The app's lifespan cancels the ones still running when the server stops.

    Only the server's event loop touches this object, so it needs no lock.
    """

    def __init__(self) -> None:
        # Strong references, because the event loop keeps only weak ones to running tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            logger.info(
                "cancelled %d background tasks (invitation decisions, webhook deliveries)",
                len(tasks),
            )


def sign_webhook_body(body: bytes, secret: str) -> str:
    """Return the X-Sandbox-Signature header value for a webhook body: sha256=<hex HMAC>."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class _WebhookSender:
    """Sends signed invitation events to the webhook URL and records every attempt."""

    def __init__(
        self,
        state: _SandboxState,
        *,
        url: str,
        secret: str | None,
        retry_delay: float,
        max_attempts: int,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"invalid webhook_url {url!r}: expected http://HOST:PORT/PATH or https://HOST/PATH"
            )
        if not secret:
            raise ValueError(
                "webhook_secret must not be empty when webhook_url is set, because every "
                "webhook is signed with it"
            )
        _check_seconds("webhook_retry_delay", retry_delay)
        if max_attempts < 1:
            raise ValueError(f"webhook_max_attempts must be at least 1, not {max_attempts}")
        self.state = state
        self.url = url
        self.secret = secret
        self.retry_delay = retry_delay
        self.max_attempts = max_attempts

    async def deliver(self, delivery: dict[str, Any]) -> None:
        """POST one event until the receiver accepts or rejects it, the attempts run out or
        the task is cancelled. Every retry sends the same body, and so the same event_id."""
        event_id = delivery["event_id"]
        body = json.dumps(delivery["payload"], separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_webhook_body(body, self.secret),
        }
        delay = self.retry_delay
        try:
            # trust_env=False keeps proxy variables meant for the user's own traffic from
            # rerouting a webhook meant for a local receiver.
            async with httpx.AsyncClient(
                timeout=WEBHOOK_TIMEOUT_SECONDS, trust_env=False
            ) as client:
                for attempt in range(1, self.max_attempts + 1):
                    status, error = await self._post(client, body, headers)
                    with self.state.lock:
                        delivery["attempts"] = attempt
                        delivery["last_status"] = status
                        delivery["last_error"] = error

                    if status is not None and 200 <= status < 300:
                        self._finish(delivery, "delivered")
                        logger.info(
                            "delivered webhook event %s (%s) in %d attempt(s)",
                            event_id,
                            delivery["event"],
                            attempt,
                        )
                        return
                    if status is not None and status != 429 and status < 500:
                        self._finish(delivery, "rejected")
                        logger.warning(
                            "webhook receiver rejected event %s with HTTP %s, so the sandbox "
                            "does not retry it",
                            event_id,
                            status,
                        )
                        return
                    problem = error or f"HTTP {status}"
                    if attempt == self.max_attempts:
                        self._finish(delivery, "failed")
                        logger.warning(
                            "gave up on webhook event %s after %d attempts, the last one "
                            "failed with %s",
                            event_id,
                            attempt,
                            problem,
                        )
                        return

                    logger.info(
                        "webhook event %s attempt %d of %d failed with %s, retrying in %.1f s",
                        event_id,
                        attempt,
                        self.max_attempts,
                        problem,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay *= 2
        except asyncio.CancelledError:
            self._finish(delivery, "cancelled")
            logger.info("cancelled webhook event %s because the sandbox is stopping", event_id)
            raise

    async def _post(
        self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str]
    ) -> tuple[int | None, str | None]:
        """Return the HTTP status, or None and the error when no response arrived."""
        try:
            response = await client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as error:
            return None, f"{type(error).__name__}: {error}"
        return response.status_code, None

    def _finish(self, delivery: dict[str, Any], outcome: str) -> None:
        with self.state.lock:
            delivery["outcome"] = outcome


def _error(status: int, code: str, detail: str | None = None, **headers: str) -> JSONResponse:
    body: dict[str, str] = {"error": code}
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers or None)


def _check_seconds(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


def profile_slug(profile_url: str) -> str | None:
    """Return the lower-cased slug of a LinkedIn profile URL, or None for any other URL.

    Besides /in/<slug>, the sandbox accepts the forms that a real provider resolves: Sales
    Navigator /sales/lead/<id>, legacy /pub/<name>/... and /profile/view?id=<member id>. For
    those, the slug is the id or name.
    """
    parts = urlsplit(profile_url.strip())
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https"):
        return None
    if host != "linkedin.com" and not host.endswith(".linkedin.com"):
        return None

    segments = [unquote(segment).lower() for segment in parts.path.split("/") if segment]
    if segments[:1] in (["in"], ["pub"]) and len(segments) >= 2:
        slug = segments[1]
    elif segments[:1] == ["sales"] and len(segments) >= 3 and segments[1] in ("lead", "people"):
        # A copied Sales Navigator id may be followed by search context: ID,NAME_SEARCH,abcd.
        slug = segments[2].split(",")[0]
    elif segments[:2] == ["profile", "view"]:
        slug = parse_qs(parts.query).get("id", [""])[0]
    else:
        return None
    return slug.strip().lower() or None


def _scripted_decision(slug: str) -> bool | None:
    """Return True when the lead accepts an invitation, False when they decline it, and None
    when they never respond."""
    if "declines" in slug:
        return False
    if "ignores" in slug:
        return None
    return True


def _new_invitation(action: dict[str, Any]) -> dict[str, Any]:
    invitation = {
        "id": action["id"],
        "invitation_status": INVITATION_PENDING,
        "profile_url": action["profile_url"],
        "idempotency_key": action.get("idempotency_key"),
        "created_at": action["created_at"],
        "responded_at": None,
    }
    if "note" in action:
        invitation["note"] = action["note"]
    return invitation


async def _decide_invitation(
    state: _SandboxState,
    sender: _WebhookSender | None,
    invitation_id: str,
    accepted: bool,
    delay: float,
) -> None:
    """Accept or decline an invitation after `delay` seconds, then send its webhook event.

    While the session is expired the provider cannot see LinkedIn, so a decision that falls due
    then waits until the session is connected again.
    """
    await asyncio.sleep(delay)
    new_status = INVITATION_ACCEPTED if accepted else INVITATION_DECLINED
    delivery: dict[str, Any] | None = None
    while True:
        with state.lock:
            if not state.session_expired:
                occurred_at = datetime.now(UTC).isoformat()
                invitation = state.invitations[invitation_id]
                invitation["invitation_status"] = new_status
                invitation["responded_at"] = occurred_at
                if sender is not None:
                    delivery = _new_delivery(invitation, new_status, occurred_at)
                    state.deliveries.append(delivery)
                break
        await asyncio.sleep(SESSION_POLL_SECONDS)

    logger.info("invitation %s is %s", invitation_id, new_status)
    if sender is not None and delivery is not None:
        await sender.deliver(delivery)


def _new_delivery(invitation: dict[str, Any], status: str, occurred_at: str) -> dict[str, Any]:
    event_id = str(uuid.uuid4())
    event = f"invitation.{status}"
    payload = {
        "event_id": event_id,
        "event": event,
        "invitation_id": invitation["id"],
        "profile_url": invitation["profile_url"],
        "idempotency_key": invitation["idempotency_key"],
        "occurred_at": occurred_at,
    }
    return {
        "event_id": event_id,
        "event": event,
        "invitation_id": invitation["id"],
        "payload": payload,
        "attempts": 0,
        "last_status": None,
        "last_error": None,
        "outcome": "pending",
    }


def create_app(
    api_key: str = DEFAULT_API_KEY,
    *,
    journal_path: Path | None = None,
    accept_delay: float = DEFAULT_ACCEPT_DELAY_SECONDS,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    webhook_retry_delay: float = WEBHOOK_RETRY_DELAY_SECONDS,
    webhook_max_attempts: int = WEBHOOK_MAX_ATTEMPTS,
) -> FastAPI:
    """Build the sandbox API.

    When `journal_path` is given, each accepted action is appended to it as one JSON line.
    Leads accept or decline invitations `accept_delay` seconds after they are sent. When
    `webhook_url` is given, each decision is POSTed there, signed with `webhook_secret`, which
    must then be set. A failed delivery is retried after `webhook_retry_delay` seconds, doubled
    each time, for at most `webhook_max_attempts` attempts. Raises ValueError for an invalid
    argument.
    """
    if not api_key:
        raise ValueError("the sandbox API key must not be empty")
    _check_seconds("accept_delay", accept_delay)
    state = _SandboxState(journal_path)
    sender = None
    if webhook_url is not None:
        sender = _WebhookSender(
            state,
            url=webhook_url,
            secret=webhook_secret,
            retry_delay=webhook_retry_delay,
            max_attempts=webhook_max_attempts,
        )
    background = _BackgroundTasks()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await background.cancel_all()

    app = FastAPI(
        title="LinkedIn provider sandbox", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.sandbox = state
    expected_key = api_key.encode("utf-8")

    @app.middleware("http")
    async def check_credentials(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if not path.startswith(("/v1/", "/sandbox/")):
            return await call_next(request)
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        supplied = credentials.strip().encode("utf-8")
        if scheme.lower() != "bearer" or not secrets.compare_digest(supplied, expected_key):
            logger.info("rejected a request to %s: missing or wrong API key", path)
            return _error(
                401,
                "unauthorized",
                "missing or wrong API key. Send the header Authorization: Bearer <key>",
                **{"WWW-Authenticate": "Bearer"},
            )

        # GET /v1/actions inspects the sandbox itself, not the LinkedIn account.
        if path.startswith("/v1/") and path != "/v1/actions":
            with state.lock:
                expired = state.session_expired
            if expired:
                logger.info("rejected a request to %s: the LinkedIn session is expired", path)
                return _error(401, "session_expired", SESSION_EXPIRED_DETAIL)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def reject_invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            location = ".".join(str(part) for part in item["loc"] if part != "body")
            if item["type"] == "json_invalid":
                problems.append("the body is not valid JSON")
            elif item["type"] == "string_too_long" and location == "note":
                problems.append(f"note: at most {MAX_NOTE_LENGTH} characters")
            else:
                problems.append(f"{location}: {item['msg']}" if location else item["msg"])
        return _error(422, "invalid_request", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def report_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = http.HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
        return JSONResponse({"error": code}, status_code=error.status_code)

    async def perform(action_type: str, done_status: str, body: _ActionRequest) -> JSONResponse:
        slug = profile_slug(body.profile_url)
        if slug is None:
            return _error(
                422,
                "invalid_profile_url",
                "profile_url must be a LinkedIn profile URL such as "
                "https://www.linkedin.com/in/jane-doe",
            )
        fields = body.model_dump(exclude={"idempotency_key"}, exclude_none=True)
        fingerprint = json.dumps([action_type, fields], sort_keys=True)
        delay = 0.0
        with state.lock:
            key = body.idempotency_key
            if key is not None and key in state.responses:
                stored_fingerprint, stored_response = state.responses[key]
                if stored_fingerprint != fingerprint:
                    return _error(
                        422,
                        "idempotency_key_reused",
                        "this idempotency_key was already used for a different request",
                    )
                logger.info(
                    "replayed action %s for a repeated idempotency key", stored_response["id"]
                )
                response = dict(stored_response)
                invitation = state.invitations.get(response["id"])
                if invitation is not None:
                    response["invitation_status"] = invitation["invitation_status"]
                return JSONResponse(response, status_code=201)

            if "deactivated" in slug:
                return _error(410, "profile_deactivated", "the profile no longer exists")
            if (
                "ratelimited" in slug
                and state.count_request("ratelimited", slug) <= RATE_LIMITED_REQUESTS
            ):
                return _error(
                    429,
                    "rate_limited",
                    "too many actions for this account, retry after the Retry-After delay",
                    **{"Retry-After": str(RATE_LIMIT_RETRY_AFTER_SECONDS)},
                )
            if "flaky" in slug and state.count_request("flaky", slug) <= FLAKY_FAILURES:
                return _error(
                    503, "service_unavailable", "temporary provider failure, retry the request"
                )
            if "slow" in slug:
                delay = SLOW_RESPONSE_DELAY_SECONDS

            action_id = f"act_{uuid.uuid4().hex[:20]}"
            response = {"id": action_id, "status": done_status}
            action = {
                "id": action_id,
                "type": action_type,
                "status": done_status,
                "created_at": datetime.now(UTC).isoformat(),
                **body.model_dump(exclude_none=True),
            }
            state.record(action)
            decision = None
            if action_type == "invitation":
                response["invitation_status"] = INVITATION_PENDING
                state.invitations[action_id] = _new_invitation(action)
                decision = _scripted_decision(slug)
            if key is not None:
                state.responses[key] = (fingerprint, response)
        logger.info("accepted %s action %s", action_type, action_id)

        if decision is not None:
            background.spawn(
                _decide_invitation(state, sender, action_id, decision, accept_delay),
                name=f"decide-invitation-{action_id}",
            )
        if delay:
            await asyncio.sleep(delay)
        return JSONResponse(response, status_code=201)

    @app.post("/v1/profile-visits", status_code=201)
    async def visit_profile(body: _VisitRequest) -> JSONResponse:
        return await perform("profile_visit", "visited", body)

    @app.post("/v1/invitations", status_code=201)
    async def send_invitation(body: _InvitationRequest) -> JSONResponse:
        return await perform("invitation", "sent", body)

    @app.get("/v1/invitations/{invitation_id}")
    async def get_invitation(invitation_id: str) -> JSONResponse:
        with state.lock:
            invitation = state.invitations.get(invitation_id)
            found = dict(invitation) if invitation is not None else None
        if found is None:
            return _error(404, "not_found", f"no invitation has the id {invitation_id!r}")
        return JSONResponse(found)

    @app.post("/v1/messages", status_code=201)
    async def send_message(body: _MessageRequest) -> JSONResponse:
        return await perform("message", "sent", body)

    @app.get("/v1/account")
    async def get_account() -> dict[str, str]:
        # While the session is expired, check_credentials returns 401 before this runs.
        return {"status": "connected"}

    @app.get("/v1/actions")
    async def list_actions() -> list[dict[str, Any]]:
        with state.lock:
            return [dict(action) for action in state.actions]

    @app.post("/sandbox/session")
    async def set_session(body: _SessionRequest) -> dict[str, bool]:
        state.set_session_expired(body.expired)
        return {"expired": body.expired}

    return app


class LinkedInSandbox:
    """The sandbox API served by uvicorn on a background thread.

    Port 0 binds a free port, which `base_url` returns after `start()`. Also usable as a
    context manager. The other keyword arguments are those of `create_app`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        api_key: str = DEFAULT_API_KEY,
        journal_path: Path | None = None,
        accept_delay: float = DEFAULT_ACCEPT_DELAY_SECONDS,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_retry_delay: float = WEBHOOK_RETRY_DELAY_SECONDS,
        webhook_max_attempts: int = WEBHOOK_MAX_ATTEMPTS,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.journal_path = journal_path
        self.app = create_app(
            api_key,
            journal_path=journal_path,
            accept_delay=accept_delay,
            webhook_url=webhook_url,
            webhook_secret=webhook_secret,
            webhook_retry_delay=webhook_retry_delay,
            webhook_max_attempts=webhook_max_attempts,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._failure: BaseException | None = None

    @property
    def base_url(self) -> str:
        """The server's URL, such as http://127.0.0.1:8765, with the bound port."""
        if self.port == 0:
            raise RuntimeError("the sandbox picks its port in start(), so call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def actions(self) -> list[dict[str, Any]]:
        """Copies of the accepted actions, oldest first."""
        state: _SandboxState = self.app.state.sandbox
        with state.lock:
            return [dict(action) for action in state.actions]

    def deliveries(self) -> list[dict[str, Any]]:
        """Return copies of the webhook delivery records, oldest event first.

        Each record has event_id, event, invitation_id, payload (the JSON body sent), attempts,
        last_status and last_error. last_status is the HTTP status of the last attempt, or None
        when it got no response. outcome is one of pending, delivered, rejected (a 4xx other
        than 429), failed (out of attempts) or cancelled (the sandbox stopped).
        """
        state: _SandboxState = self.app.state.sandbox
        with state.lock:
            return [
                {**delivery, "payload": dict(delivery["payload"])} for delivery in state.deliveries
            ]

    def expire_session(self, expired: bool = True) -> None:
        """Log the LinkedIn account out (True) or in again (False), as POST /sandbox/session
        does."""
        state: _SandboxState = self.app.state.sandbox
        state.set_session_expired(expired)

    def start(self) -> None:
        """Bind the port and serve on a background thread, returning once connections are
        accepted. Raises OSError when the port is taken."""
        if self._thread is not None:
            raise RuntimeError("the sandbox is already running, so call stop() before start()")
        family = socket.AF_INET6 if _is_ipv6(self.host) else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
        except OSError as error:
            listener.close()
            raise OSError(
                error.errno,
                f"cannot bind the LinkedIn sandbox to {self.host}:{self.port}: {error.strerror}. "
                "Choose another port, or port 0 for any free port.",
            ) from error
        self.port = listener.getsockname()[1]
        self._socket = listener

        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            # The lifespan shutdown cancels scheduled invitation decisions and webhook deliveries.
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        self._server = uvicorn.Server(config)
        self._failure = None
        self._thread = threading.Thread(
            target=self._serve, name=f"linkedin-sandbox-{self.port}", daemon=True
        )
        self._thread.start()

        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                failure = self._failure
                self.stop()
                raise RuntimeError(
                    f"the LinkedIn sandbox did not start on {self.host}:{self.port}"
                ) from failure
            time.sleep(0.01)
        logger.info("LinkedIn sandbox listening on %s", self.base_url)

    def _serve(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as error:  # noqa: BLE001 - start() reports it to the caller
            self._failure = error
            logger.exception("LinkedIn sandbox on port %s stopped with an error", self.port)

    def stop(self) -> None:
        """Stop serving and wait for the thread to end. Does nothing when not running."""
        if self._thread is None or self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=GRACEFUL_SHUTDOWN_SECONDS + 5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._thread = None
        self._server = None
        self._socket = None
        logger.info("LinkedIn sandbox on port %s stopped", self.port)

    def __enter__(self) -> LinkedInSandbox:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sequencer.linkedin_sandbox",
        description="Serve a local stand-in for a LinkedIn automation provider.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765, help="TCP port to listen on")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SEQUENCER_LINKEDIN_API_KEY", DEFAULT_API_KEY),
        help="API key that clients must send as a Bearer token "
        f"(default: $SEQUENCER_LINKEDIN_API_KEY, else {DEFAULT_API_KEY})",
    )
    parser.add_argument(
        "--journal", type=Path, help="file to which each accepted action is appended as JSON"
    )
    parser.add_argument(
        "--accept-delay",
        type=float,
        default=DEFAULT_ACCEPT_DELAY_SECONDS,
        help="seconds after which an invitation is accepted or declined "
        f"(default: {DEFAULT_ACCEPT_DELAY_SECONDS})",
    )
    parser.add_argument(
        "--webhook-url",
        help="URL to which accepted and declined invitations are POSTed (default: none)",
    )
    parser.add_argument(
        "--webhook-secret",
        default=os.environ.get("SEQUENCER_LINKEDIN_WEBHOOK_SECRET"),
        help="HMAC-SHA256 key that signs each webhook, required with --webhook-url "
        "(default: $SEQUENCER_LINKEDIN_WEBHOOK_SECRET, which keeps it out of the process list)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        app = create_app(
            args.api_key,
            journal_path=args.journal,
            accept_delay=args.accept_delay,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
        )
    except ValueError as error:
        parser.error(str(error))
    uvicorn.run(app, host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
