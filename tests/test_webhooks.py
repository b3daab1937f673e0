"""The LinkedIn webhook receiver, alone and fed by the provider sandbox.

The receiver app runs under uvicorn on a free 127.0.0.1 port with an `on_invitation` callback
that records each event. The end-to-end tests point a sandbox's webhook_url at it. The others
POST bodies signed by the test itself, so that they can send what the sandbox never would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.webhooks import (
    MAX_BODY_BYTES,
    InvitationEvent,
    WebhookRejected,
    create_webhook_app,
)

API_KEY = "test-key"
SECRET = "receiver-test-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROFILE = "https://www.linkedin.com/in/jane-doe"
WORKFLOW_ID = "lead-demo-0123456789abcdef"
# Generous, because a loaded machine may be slow to run the sandbox's background tasks.
DEADLINE_SECONDS = 15.0


class Recorder:
    """An `on_invitation` callback that records each event and raises the given errors first."""

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.errors = list(errors or [])
        self.lock = threading.Lock()
        self._events: list[InvitationEvent] = []

    async def __call__(self, event: InvitationEvent) -> str:
        with self.lock:
            self._events.append(event)
            error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return f"recorded {event.event_id}"

    @property
    def events(self) -> list[InvitationEvent]:
        with self.lock:
            return list(self._events)


class ServedApp:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture
def start_receiver() -> Iterator[Callable[..., tuple[ServedApp, Recorder]]]:
    started: list[ServedApp] = []

    def start(errors: list[Exception] | None = None) -> tuple[ServedApp, Recorder]:
        recorder = Recorder(errors)
        served = ServedApp(create_webhook_app(linkedin_secret=SECRET, on_invitation=recorder))
        started.append(served)
        return served, recorder

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def receiver(
    start_receiver: Callable[..., tuple[ServedApp, Recorder]],
) -> tuple[ServedApp, Recorder]:
    return start_receiver()


@pytest.fixture
def start_sandbox() -> Iterator[Callable[..., LinkedInSandbox]]:
    started: list[LinkedInSandbox] = []

    def start(webhook_url: str, **options: Any) -> LinkedInSandbox:
        options.setdefault("webhook_secret", SECRET)
        options.setdefault("accept_delay", 0)
        sandbox = LinkedInSandbox(
            port=0, api_key=API_KEY, webhook_url=webhook_url + "/webhooks/linkedin", **options
        )
        sandbox.start()
        started.append(sandbox)
        return sandbox

    yield start
    for sandbox in started:
        sandbox.stop()


def wait_for(condition: Callable[[], object], description: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_SECONDS} s waiting for {description}")
        time.sleep(0.02)


def invite(sandbox: LinkedInSandbox, profile_url: str = PROFILE, step: int = 3) -> dict[str, Any]:
    response = httpx.post(
        f"{sandbox.base_url}/v1/invitations",
        json={"profile_url": profile_url, "idempotency_key": f"{WORKFLOW_ID}:{step}"},
        headers=AUTH,
    )
    assert response.status_code == 201, response.text
    return response.json()


def delivery_outcome(sandbox: LinkedInSandbox) -> str | None:
    deliveries = sandbox.deliveries()
    return deliveries[0]["outcome"] if deliveries else None


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event_payload(**changes: Any) -> dict[str, Any]:
    payload = {
        "event_id": "7f0c1f9e-2b53-4d0a-9a53-0f3b8f6d2c11",
        "event": "invitation.accepted",
        "invitation_id": "act_0123456789abcdef0123",
        "profile_url": PROFILE,
        "idempotency_key": f"{WORKFLOW_ID}:3",
        "occurred_at": "2025-05-01T10:00:00+00:00",
    }
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not ...}


def post_signed(
    served: ServedApp, body: bytes, signature: str | bytes | None = None
) -> httpx.Response:
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    # bytes let a test send a header value that is not ASCII.
    headers["X-Sandbox-Signature"] = sign(body) if signature is None else signature
    return httpx.post(f"{served.url}/webhooks/linkedin", content=body, headers=headers)


def post_payload(served: ServedApp, payload: dict[str, Any]) -> httpx.Response:
    return post_signed(served, json.dumps(payload).encode())


@pytest.mark.parametrize(
    ("profile_url", "accepted", "event_type"),
    [
        (PROFILE, True, "invitation.accepted"),
        ("https://www.linkedin.com/in/jane-declines", False, "invitation.declined"),
    ],
    ids=["accepted", "declined"],
)
def test_sandbox_decision_reaches_engine(
    receiver: tuple[ServedApp, Recorder],
    start_sandbox: Callable[..., LinkedInSandbox],
    profile_url: str,
    accepted: bool,
    event_type: str,
) -> None:
    served, recorder = receiver
    sandbox = start_sandbox(served.url)

    created = invite(sandbox, profile_url, step=3)
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the webhook delivery")

    [event] = recorder.events
    [delivery] = sandbox.deliveries()
    assert event.event_id == delivery["event_id"]
    assert event.workflow_id == WORKFLOW_ID
    assert event.step == 3
    assert event.accepted is accepted
    assert event.invitation_id == created["id"]
    assert event.detail == event_type
    assert event.occurred_at == datetime.fromisoformat(delivery["payload"]["occurred_at"])
    assert event.occurred_at.utcoffset() is not None
    assert delivery["attempts"] == 1
    assert delivery["last_status"] == 200


def test_ignored_invitation_sends_nothing(
    receiver: tuple[ServedApp, Recorder], start_sandbox: Callable[..., LinkedInSandbox]
) -> None:
    served, recorder = receiver
    sandbox = start_sandbox(served.url)

    invite(sandbox, "https://www.linkedin.com/in/jane-ignores", step=2)
    control = invite(sandbox, PROFILE, step=4)
    # The control invitation, sent later with the same delay, shows that the delay has passed.
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the control invitation's webhook")

    assert [(event.invitation_id, event.step) for event in recorder.events] == [(control["id"], 4)]


def test_engine_503_makes_sandbox_retry(
    start_receiver: Callable[..., tuple[ServedApp, Recorder]],
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    served, recorder = start_receiver([WebhookRejected(503, "the engine is not ready")])
    sandbox = start_sandbox(served.url, webhook_retry_delay=0.05)

    invite(sandbox)
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the webhook delivery")

    first, second = recorder.events
    assert first.event_id == second.event_id
    assert first == second
    [delivery] = sandbox.deliveries()
    assert delivery["event_id"] == first.event_id
    assert delivery["attempts"] == 2
    assert delivery["last_status"] == 200


def test_engine_4xx_stops_sandbox_retries(
    start_receiver: Callable[..., tuple[ServedApp, Recorder]],
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    served, recorder = start_receiver([WebhookRejected(409, "the step is not waiting")])
    sandbox = start_sandbox(served.url, webhook_retry_delay=0.05)

    invite(sandbox)
    wait_for(lambda: delivery_outcome(sandbox) == "rejected", "the webhook to be rejected")

    [delivery] = sandbox.deliveries()
    assert delivery["attempts"] == 1
    assert delivery["last_status"] == 409
    assert len(recorder.events) == 1


def test_wrong_sandbox_secret_rejected(
    receiver: tuple[ServedApp, Recorder], start_sandbox: Callable[..., LinkedInSandbox]
) -> None:
    served, recorder = receiver
    sandbox = start_sandbox(served.url, webhook_secret="another-secret")

    invite(sandbox)
    wait_for(lambda: delivery_outcome(sandbox) == "rejected", "the webhook to be rejected")

    [delivery] = sandbox.deliveries()
    assert delivery["attempts"] == 1
    assert delivery["last_status"] == 401
    assert recorder.events == []


def test_decision_waits_for_reconnected_session(
    receiver: tuple[ServedApp, Recorder], start_sandbox: Callable[..., LinkedInSandbox]
) -> None:
    served, recorder = receiver
    sandbox = start_sandbox(served.url, accept_delay=1.0)
    created = invite(sandbox)
    sandbox.expire_session()
    rejected = httpx.post(
        f"{sandbox.base_url}/v1/invitations",
        json={"profile_url": "https://www.linkedin.com/in/john-doe"},
        headers=AUTH,
    )

    # Wait past the accept delay, so that the decision falls due while the session is expired.
    time.sleep(2.0)
    events_while_expired = recorder.events
    reconnected_at = datetime.now(UTC)
    sandbox.expire_session(False)
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the webhook delivery")

    assert rejected.status_code == 401
    assert rejected.json()["error"] == "session_expired"
    assert events_while_expired == []
    [event] = recorder.events
    assert event.invitation_id == created["id"]
    assert event.accepted is True
    assert event.occurred_at >= reconnected_at


def test_missing_signature_rejected(receiver: tuple[ServedApp, Recorder]) -> None:
    served, recorder = receiver

    response = httpx.post(f"{served.url}/webhooks/linkedin", json=event_payload())

    assert response.status_code == 401
    assert "X-Sandbox-Signature" in response.json()["error"]
    assert "missing" in response.json()["error"]
    assert recorder.events == []


@pytest.mark.parametrize(
    "signature",
    [
        sign(json.dumps(event_payload()).encode(), "another-secret"),
        sign(json.dumps(event_payload(event_id="other")).encode()),
        sign(json.dumps(event_payload()).encode()).removeprefix("sha256="),
        "sha256=",
        "sha256=zz",
        "sha256=é".encode(),
    ],
    ids=["other-secret", "other-body", "no-prefix", "empty-digest", "not-hex", "non-ascii"],
)
def test_wrong_signature_rejected(
    receiver: tuple[ServedApp, Recorder], signature: str | bytes
) -> None:
    served, recorder = receiver

    response = post_signed(served, json.dumps(event_payload()).encode(), signature)

    assert response.status_code == 401
    assert "invalid X-Sandbox-Signature" in response.json()["error"]
    assert recorder.events == []


def test_signature_failures_logged_sparingly(
    receiver: tuple[ServedApp, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    served, _ = receiver
    caplog.set_level(logging.DEBUG, logger="sequencer.webhooks")

    for _ in range(12):
        assert post_signed(served, b"{}", "sha256=00").status_code == 401

    failures = [record for record in caplog.records if "signature failure" in record.getMessage()]
    assert len(failures) == 12
    warnings = [record.getMessage() for record in failures if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "(signature failure 1)" in warnings[0]
    assert "(signature failure 10)" in warnings[1]
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("body", "expected_error"),
    [
        (b'{"event_id": ', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps(event_payload(event=...)).encode(), "event:"),
        (json.dumps(event_payload(event=5)).encode(), "event:"),
        (json.dumps(event_payload(event_id=...)).encode(), "event_id"),
        (json.dumps(event_payload(event_id="")).encode(), "event_id"),
        (json.dumps(event_payload(event_id="a\nb")).encode(), "event_id"),
        (json.dumps(event_payload(invitation_id=7)).encode(), "invitation_id"),
        (json.dumps(event_payload(idempotency_key=...)).encode(), "idempotency_key"),
        (json.dumps(event_payload(idempotency_key=None)).encode(), "idempotency_key"),
        (json.dumps(event_payload(occurred_at=...)).encode(), "occurred_at"),
        (json.dumps(event_payload(occurred_at="yesterday")).encode(), "occurred_at"),
        (json.dumps(event_payload(occurred_at="2025-05-01T10:00:00")).encode(), "occurred_at"),
    ],
    ids=[
        "truncated-json",
        "not-utf8",
        "array",
        "no-event",
        "numeric-event",
        "no-event-id",
        "empty-event-id",
        "event-id-with-newline",
        "numeric-invitation-id",
        "no-idempotency-key",
        "null-idempotency-key",
        "no-occurred-at",
        "invalid-occurred-at",
        "naive-occurred-at",
    ],
)
def test_malformed_payload_rejected(
    receiver: tuple[ServedApp, Recorder], body: bytes, expected_error: str
) -> None:
    served, recorder = receiver

    response = post_signed(served, body)

    assert response.status_code == 422
    assert expected_error in response.json()["error"]
    assert recorder.events == []


@pytest.mark.parametrize(
    "key",
    [
        WORKFLOW_ID,
        f"{WORKFLOW_ID}:",
        f"{WORKFLOW_ID}:0",
        f"{WORKFLOW_ID}:-1",
        f"{WORKFLOW_ID}:two",
        ":3",
        f"{WORKFLOW_ID}:1.5",
        f"{WORKFLOW_ID} :3",
    ],
    ids=["no-step", "empty-step", "zero", "negative", "word", "no-workflow", "fraction", "space"],
)
def test_invalid_idempotency_key_rejected(receiver: tuple[ServedApp, Recorder], key: str) -> None:
    served, recorder = receiver

    response = post_payload(served, event_payload(idempotency_key=key))

    assert response.status_code == 422
    assert repr(key) in response.json()["error"]
    assert "WORKFLOW_ID:STEP" in response.json()["error"]
    assert recorder.events == []


@pytest.mark.parametrize(
    ("key", "workflow_id", "step"),
    [
        (f"{WORKFLOW_ID}:3", WORKFLOW_ID, 3),
        ("wf:with:colons:12", "wf:with:colons", 12),
        ("wf:007", "wf", 7),
    ],
    ids=["plain", "colons-in-workflow-id", "leading-zeros"],
)
def test_valid_idempotency_key_parsed(
    receiver: tuple[ServedApp, Recorder], key: str, workflow_id: str, step: int
) -> None:
    served, recorder = receiver

    response = post_payload(served, event_payload(idempotency_key=key))

    assert response.status_code == 200
    [event] = recorder.events
    assert event.workflow_id == workflow_id
    assert event.step == step


def test_handled_event_returns_result(receiver: tuple[ServedApp, Recorder]) -> None:
    served, recorder = receiver

    response = post_payload(served, event_payload(invitation_id=..., extra_field="kept out"))

    assert response.status_code == 200
    assert response.json() == {"result": "recorded 7f0c1f9e-2b53-4d0a-9a53-0f3b8f6d2c11"}
    [event] = recorder.events
    assert event.accepted is True
    assert event.invitation_id is None
    assert event.occurred_at == datetime(2025, 5, 1, 10, tzinfo=UTC)


def test_withdrawn_invitation_not_accepted(receiver: tuple[ServedApp, Recorder]) -> None:
    served, recorder = receiver

    response = post_payload(served, event_payload(event="invitation.withdrawn"))

    assert response.status_code == 200
    [event] = recorder.events
    assert event.accepted is False
    assert event.detail == "invitation.withdrawn"


@pytest.mark.parametrize(
    "payload",
    [
        event_payload(event="message.received"),
        {"event": "account.disconnected", "account_id": "acc_1"},
    ],
    ids=["other-event", "other-shape"],
)
def test_unknown_event_ignored(receiver: tuple[ServedApp, Recorder], payload: dict) -> None:
    served, recorder = receiver

    response = post_payload(served, payload)

    assert response.status_code == 200
    assert response.json()["result"].startswith("ignored: ")
    assert payload["event"] in response.json()["result"]
    assert recorder.events == []


def test_engine_rejection_returns_its_status(
    start_receiver: Callable[..., tuple[ServedApp, Recorder]],
) -> None:
    served, recorder = start_receiver([WebhookRejected(409, "step 3 is not waiting")])

    response = post_payload(served, event_payload())

    assert response.status_code == 409
    assert response.json() == {"error": "step 3 is not waiting"}
    assert len(recorder.events) == 1


def test_engine_failure_returns_500(
    start_receiver: Callable[..., tuple[ServedApp, Recorder]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    served, recorder = start_receiver([RuntimeError("database is locked")])
    caplog.set_level(logging.INFO, logger="sequencer.webhooks")

    response = post_payload(served, event_payload())

    assert response.status_code == 500
    assert "7f0c1f9e-2b53-4d0a-9a53-0f3b8f6d2c11" in response.json()["error"]
    assert len(recorder.events) == 1
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "7f0c1f9e-2b53-4d0a-9a53-0f3b8f6d2c11" in errors[0].getMessage()


def test_oversized_body_rejected(receiver: tuple[ServedApp, Recorder]) -> None:
    served, recorder = receiver
    body = json.dumps(event_payload(padding="x" * MAX_BODY_BYTES)).encode()

    response = post_signed(served, body)

    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.json()["error"]
    assert recorder.events == []


def test_healthz_ok(receiver: tuple[ServedApp, Recorder]) -> None:
    served, _ = receiver

    response = httpx.get(f"{served.url}/healthz")

    assert response.status_code == 200


def test_empty_secret_rejected() -> None:
    with pytest.raises(ValueError, match="secret must not be empty"):
        create_webhook_app(linkedin_secret="", on_invitation=Recorder())


@pytest.mark.parametrize("status", [200, 302, 399, 600])
def test_rejection_needs_error_status(status: int) -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        WebhookRejected(status, "not an error")
