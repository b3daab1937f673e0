"""A local stand-in for a LinkedIn automation provider such as Unipile or HeyReach.

It accepts profile visits, invitations and messages over a small JSON API, sends nothing to
LinkedIn, and records every accepted action. Tests and demos point the LinkedIn activity at
it instead of a real provider.

Every request under /v1 needs the header `Authorization: Bearer <api key>`.

    POST /v1/profile-visits   {"profile_url", "idempotency_key"?}
    POST /v1/invitations      {"profile_url", "idempotency_key"?, "note"?}  note <= 300 chars
    POST /v1/messages         {"profile_url", "idempotency_key"?, "text"}
    GET  /v1/actions          the accepted actions, oldest first

An accepted action returns 201 {"id", "status"} with status "visited" or "sent". Errors
return {"error": CODE} and, where useful, a "detail" sentence. The profile slug (the part
after /in/, or the id in the other URL forms that `profile_slug` accepts) chooses a scripted
behaviour:

    contains "deactivated"  410 profile_deactivated on every request
    contains "ratelimited"  429 with Retry-After: 1 for the first 2 requests for that profile
    contains "flaky"        503 for the first request for that profile
    contains "slow"         the action is accepted at once, but the response waits 1 second
    anything else           accepted

A repeated idempotency key returns the first 201 response again and records no second action.
Only accepted actions are remembered, so a retry after a 429 or 503 is carried out.

Run it on its own with `python -m sequencer.linkedin_sandbox --port 8765`.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

DEFAULT_API_KEY = "sandbox-key"
MAX_NOTE_LENGTH = 300
RATE_LIMITED_REQUESTS = 2
RATE_LIMIT_RETRY_AFTER_SECONDS = 1
FLAKY_FAILURES = 1
SLOW_RESPONSE_DELAY_SECONDS = 1.0
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


class _SandboxState:
    """Accepted actions, stored responses by idempotency key, and per-profile request counts.

    The lock guards every field because `LinkedInSandbox.actions` reads them from the caller's
    thread while the server thread writes them.
    """

    def __init__(self, journal_path: Path | None) -> None:
        self.lock = threading.Lock()
        self.actions: list[dict[str, Any]] = []
        # idempotency key -> (request fingerprint, response body of the accepted action)
        self.responses: dict[str, tuple[str, dict[str, Any]]] = {}
        # (behaviour, profile slug) -> requests seen
        self.request_counts: dict[tuple[str, str], int] = {}
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


def _error(status: int, code: str, detail: str | None = None, **headers: str) -> JSONResponse:
    body: dict[str, str] = {"error": code}
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers or None)


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


def create_app(api_key: str = DEFAULT_API_KEY, *, journal_path: Path | None = None) -> FastAPI:
    """Build the sandbox API. When `journal_path` is given, each accepted action is appended
    to it as one JSON line."""
    if not api_key:
        raise ValueError("the sandbox API key must not be empty")
    app = FastAPI(title="LinkedIn provider sandbox", docs_url=None, redoc_url=None)
    state = _SandboxState(journal_path)
    app.state.sandbox = state
    expected_key = api_key.encode("utf-8")

    @app.middleware("http")
    async def require_api_key(request: Request, call_next: Any) -> Response:
        if not request.url.path.startswith("/v1/"):
            return await call_next(request)
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        supplied = credentials.strip().encode("utf-8")
        if scheme.lower() != "bearer" or not secrets.compare_digest(supplied, expected_key):
            logger.info("rejected a request to %s: missing or wrong API key", request.url.path)
            return _error(
                401,
                "unauthorized",
                "missing or wrong API key. Send the header Authorization: Bearer <key>",
                **{"WWW-Authenticate": "Bearer"},
            )
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
                return JSONResponse(stored_response, status_code=201)

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
            if key is not None:
                state.responses[key] = (fingerprint, response)
        logger.info("accepted %s action %s", action_type, action_id)
        if delay:
            await asyncio.sleep(delay)
        return JSONResponse(response, status_code=201)

    @app.post("/v1/profile-visits", status_code=201)
    async def visit_profile(body: _VisitRequest) -> JSONResponse:
        return await perform("profile_visit", "visited", body)

    @app.post("/v1/invitations", status_code=201)
    async def send_invitation(body: _InvitationRequest) -> JSONResponse:
        return await perform("invitation", "sent", body)

    @app.post("/v1/messages", status_code=201)
    async def send_message(body: _MessageRequest) -> JSONResponse:
        return await perform("message", "sent", body)

    @app.get("/v1/actions")
    async def list_actions() -> list[dict[str, Any]]:
        with state.lock:
            return [dict(action) for action in state.actions]

    return app


class LinkedInSandbox:
    """The sandbox API served by uvicorn on a background thread.

    Port 0 binds a free port, which `base_url` returns after `start()`. Also usable as a
    context manager.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        api_key: str = DEFAULT_API_KEY,
        journal_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.journal_path = journal_path
        self.app = create_app(api_key, journal_path=journal_path)
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
            lifespan="off",
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(args.api_key, journal_path=args.journal)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
