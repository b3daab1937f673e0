"""Invitations, webhooks and session expiry in the LinkedIn provider sandbox.

Each test runs its own sandbox under uvicorn on a free 127.0.0.1 port. Webhooks go to a
recording HTTP server from the standard library, also on 127.0.0.1, that responds with scripted
statuses, so these tests check the sandbox's deliveries independently of our receiver.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.linkedin import LinkedInActivities
from sequencer.campaign import LinkedInInviteStep, LinkedInVisitStep
from sequencer.channels import StepStatus
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE
from sequencer.linkedin_sandbox import LinkedInSandbox, create_app, main
from sequencer.models import Lead, StepInput

API_KEY = "test-key"
SECRET = "webhook-test-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROFILE = "https://www.linkedin.com/in/jane-doe"
DECLINING_PROFILE = "https://www.linkedin.com/in/jane-declines"
IGNORING_PROFILE = "https://www.linkedin.com/in/jane-ignores"
# Generous, because a loaded machine may be slow to run the sandbox's background tasks.
DEADLINE_SECONDS = 15.0


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each request.

    It responds to the n-th request with statuses[n], and with 200 once the list runs out.
    """

    def __init__(self, statuses: list[int] | None = None, port: int = 0) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[ReceivedRequest] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.requests.append(
                        ReceivedRequest(
                            self.path, {k.lower(): v for k, v in self.headers.items()}, body
                        )
                    )
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                reply = json.dumps({"status": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/linkedin"

    def received(self) -> list[ReceivedRequest]:
        with self.lock:
            return list(self.requests)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def start_sandbox() -> Iterator[Callable[..., LinkedInSandbox]]:
    started: list[LinkedInSandbox] = []

    def start(**options: Any) -> LinkedInSandbox:
        sandbox = LinkedInSandbox(port=0, api_key=API_KEY, **options)
        sandbox.start()
        started.append(sandbox)
        return sandbox

    yield start
    for sandbox in started:
        sandbox.stop()


@pytest.fixture
def start_receiver() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(statuses: list[int] | None = None, port: int = 0) -> Receiver:
        receiver = Receiver(statuses, port)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def wait_for(condition: Callable[[], object], description: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_SECONDS} s waiting for {description}")
        time.sleep(0.02)


def invite(
    sandbox: LinkedInSandbox, profile_url: str = PROFILE, key: str | None = "wf-1:2"
) -> httpx.Response:
    body: dict[str, Any] = {"profile_url": profile_url}
    if key is not None:
        body["idempotency_key"] = key
    return httpx.post(f"{sandbox.base_url}/v1/invitations", json=body, headers=AUTH)


def get_invitation(sandbox: LinkedInSandbox, invitation_id: str) -> dict[str, Any]:
    response = httpx.get(f"{sandbox.base_url}/v1/invitations/{invitation_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def invitation_status(sandbox: LinkedInSandbox, invitation_id: str) -> str:
    return get_invitation(sandbox, invitation_id)["invitation_status"]


def delivery_outcome(sandbox: LinkedInSandbox, index: int = 0) -> str | None:
    deliveries = sandbox.deliveries()
    return deliveries[index]["outcome"] if len(deliveries) > index else None


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("profile_url", "final_status"),
    [(PROFILE, "accepted"), (DECLINING_PROFILE, "declined")],
    ids=["accepts", "declines"],
)
def test_invitation_decided_after_delay(
    start_sandbox: Callable[..., LinkedInSandbox], profile_url: str, final_status: str
) -> None:
    sandbox = start_sandbox(accept_delay=0.2)

    response = invite(sandbox, profile_url)

    assert response.status_code == 201
    created = response.json()
    assert created["status"] == "sent"
    assert created["invitation_status"] == "pending"
    assert created["id"] == sandbox.actions[0]["id"]
    wait_for(lambda: invitation_status(sandbox, created["id"]) != "pending", "the lead's decision")
    invitation = get_invitation(sandbox, created["id"])
    assert invitation["invitation_status"] == final_status
    assert invitation["id"] == created["id"]
    assert invitation["profile_url"] == profile_url
    assert invitation["idempotency_key"] == "wf-1:2"
    created_at = datetime.fromisoformat(invitation["created_at"])
    responded_at = datetime.fromisoformat(invitation["responded_at"])
    assert responded_at.utcoffset() is not None
    assert responded_at >= created_at


def test_ignored_invitation_stays_pending(
    start_sandbox: Callable[..., LinkedInSandbox], start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver()
    sandbox = start_sandbox(accept_delay=0.1, webhook_url=receiver.url, webhook_secret=SECRET)

    ignored = invite(sandbox, IGNORING_PROFILE, key="wf-1:2").json()
    control = invite(sandbox, PROFILE, key="wf-2:2").json()
    # The control invitation, sent later with the same delay, shows that the delay has passed.
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the control invitation's webhook")

    invitation = get_invitation(sandbox, ignored["id"])
    assert invitation["invitation_status"] == "pending"
    assert invitation["responded_at"] is None
    assert invitation_status(sandbox, control["id"]) == "accepted"
    assert [delivery["invitation_id"] for delivery in sandbox.deliveries()] == [control["id"]]
    assert len(receiver.received()) == 1


def test_zero_accept_delay_still_returns_pending(
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    sandbox = start_sandbox(accept_delay=0)

    response = invite(sandbox)

    assert response.json()["invitation_status"] == "pending"
    wait_for(
        lambda: invitation_status(sandbox, response.json()["id"]) == "accepted",
        "the invitation to be accepted",
    )


def test_invitation_with_note_returns_note(
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    sandbox = start_sandbox()
    body = {"profile_url": PROFILE, "note": "Hi Jane"}

    created = httpx.post(f"{sandbox.base_url}/v1/invitations", json=body, headers=AUTH).json()

    invitation = get_invitation(sandbox, created["id"])
    assert invitation["note"] == "Hi Jane"
    assert invitation["idempotency_key"] is None
    assert invitation["invitation_status"] == "pending"


def test_unknown_invitation_not_found(start_sandbox: Callable[..., LinkedInSandbox]) -> None:
    sandbox = start_sandbox()
    visit = httpx.post(
        f"{sandbox.base_url}/v1/profile-visits", json={"profile_url": PROFILE}, headers=AUTH
    ).json()

    for invitation_id in ("act_missing", visit["id"]):
        response = httpx.get(f"{sandbox.base_url}/v1/invitations/{invitation_id}", headers=AUTH)
        assert response.status_code == 404, invitation_id
        assert response.json()["error"] == "not_found", invitation_id


def test_get_invitation_requires_api_key(start_sandbox: Callable[..., LinkedInSandbox]) -> None:
    sandbox = start_sandbox()
    created = invite(sandbox).json()

    response = httpx.get(f"{sandbox.base_url}/v1/invitations/{created['id']}")

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_replayed_invitation_reports_current_status(
    start_sandbox: Callable[..., LinkedInSandbox], start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver()
    sandbox = start_sandbox(accept_delay=0, webhook_url=receiver.url, webhook_secret=SECRET)
    first = invite(sandbox).json()
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the webhook delivery")

    replay = invite(sandbox)

    assert replay.status_code == 201
    assert replay.json() == {**first, "invitation_status": "accepted"}
    assert len(sandbox.actions) == 1
    assert len(sandbox.deliveries()) == 1
    assert len(receiver.received()) == 1


def test_deactivated_profile_gets_no_invitation(
    start_sandbox: Callable[..., LinkedInSandbox], start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver()
    sandbox = start_sandbox(accept_delay=0, webhook_url=receiver.url, webhook_secret=SECRET)

    response = invite(sandbox, "https://www.linkedin.com/in/jane-deactivated")
    control = invite(sandbox, PROFILE, key="wf-2:2")

    assert response.status_code == 410
    assert control.status_code == 201
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the control invitation's webhook")
    assert [delivery["invitation_id"] for delivery in sandbox.deliveries()] == [
        control.json()["id"]
    ]


@pytest.mark.parametrize(
    ("profile_url", "event"),
    [(PROFILE, "invitation.accepted"), (DECLINING_PROFILE, "invitation.declined")],
    ids=["accepted", "declined"],
)
def test_webhook_sends_signed_event(
    start_sandbox: Callable[..., LinkedInSandbox],
    start_receiver: Callable[..., Receiver],
    profile_url: str,
    event: str,
) -> None:
    receiver = start_receiver()
    sandbox = start_sandbox(accept_delay=0, webhook_url=receiver.url, webhook_secret=SECRET)

    created = invite(sandbox, profile_url, key="lead-demo-0123456789abcdef:3").json()
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the webhook delivery")

    [request] = receiver.received()
    assert request.path == "/hooks/linkedin"
    assert request.headers["content-type"] == "application/json"
    expected_signature = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers["x-sandbox-signature"] == f"sha256={expected_signature}"

    payload = request.json()
    assert set(payload) == {
        "event_id",
        "event",
        "invitation_id",
        "profile_url",
        "idempotency_key",
        "occurred_at",
    }
    assert str(uuid.UUID(payload["event_id"])) == payload["event_id"]
    assert payload["event"] == event
    assert payload["invitation_id"] == created["id"]
    assert payload["profile_url"] == profile_url
    assert payload["idempotency_key"] == "lead-demo-0123456789abcdef:3"
    occurred_at = datetime.fromisoformat(payload["occurred_at"])
    assert occurred_at.utcoffset() == UTC.utcoffset(None)
    assert payload["occurred_at"] == get_invitation(sandbox, created["id"])["responded_at"]

    [delivery] = sandbox.deliveries()
    assert delivery["event_id"] == payload["event_id"]
    assert delivery["event"] == event
    assert delivery["invitation_id"] == created["id"]
    assert delivery["payload"] == payload
    assert delivery["attempts"] == 1
    assert delivery["last_status"] == 200
    assert delivery["last_error"] is None


def test_webhook_retried_on_503_and_429(
    start_sandbox: Callable[..., LinkedInSandbox], start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver([503, 429])
    sandbox = start_sandbox(
        accept_delay=0, webhook_url=receiver.url, webhook_secret=SECRET, webhook_retry_delay=0.05
    )

    invite(sandbox)
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the webhook delivery")

    requests = receiver.received()
    assert len(requests) == 3
    assert {request.body for request in requests} == {requests[0].body}
    assert {request.headers["x-sandbox-signature"] for request in requests} == {
        requests[0].headers["x-sandbox-signature"]
    }
    [delivery] = sandbox.deliveries()
    assert delivery["event_id"] == requests[0].json()["event_id"]
    assert delivery["attempts"] == 3
    assert delivery["last_status"] == 200


def test_webhook_gives_up_on_client_error(
    start_sandbox: Callable[..., LinkedInSandbox],
    start_receiver: Callable[..., Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sequencer.linkedin_sandbox")
    receiver = start_receiver([400, 200])
    sandbox = start_sandbox(
        accept_delay=0, webhook_url=receiver.url, webhook_secret=SECRET, webhook_retry_delay=0.05
    )

    invite(sandbox)
    wait_for(lambda: delivery_outcome(sandbox) == "rejected", "the webhook to be rejected")

    [delivery] = sandbox.deliveries()
    assert delivery["attempts"] == 1
    assert delivery["last_status"] == 400
    assert len(receiver.received()) == 1
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "sequencer.linkedin_sandbox" and record.levelno == logging.WARNING
    ]
    assert any(delivery["event_id"] in message and "400" in message for message in warnings)


def test_webhook_gives_up_after_max_attempts(
    start_sandbox: Callable[..., LinkedInSandbox], start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver([500] * 10)
    sandbox = start_sandbox(
        accept_delay=0,
        webhook_url=receiver.url,
        webhook_secret=SECRET,
        webhook_retry_delay=0.01,
        webhook_max_attempts=3,
    )

    invite(sandbox)
    wait_for(lambda: delivery_outcome(sandbox) == "failed", "the webhook to fail")

    [delivery] = sandbox.deliveries()
    assert delivery["attempts"] == 3
    assert delivery["last_status"] == 500
    assert len(receiver.received()) == 3


def test_webhook_retried_after_connection_error(
    start_sandbox: Callable[..., LinkedInSandbox], start_receiver: Callable[..., Receiver]
) -> None:
    port = closed_port()
    sandbox = start_sandbox(
        accept_delay=0,
        webhook_url=f"http://127.0.0.1:{port}/hooks/linkedin",
        webhook_secret=SECRET,
        webhook_retry_delay=0.2,
    )

    invite(sandbox)
    wait_for(
        lambda: sandbox.deliveries() and sandbox.deliveries()[0]["last_error"],
        "the first connection error",
    )
    first_attempt = sandbox.deliveries()[0]
    receiver = start_receiver(port=port)
    wait_for(lambda: delivery_outcome(sandbox) == "delivered", "the webhook delivery")

    assert first_attempt["last_status"] is None
    assert "ConnectError" in first_attempt["last_error"]
    [delivery] = sandbox.deliveries()
    assert delivery["attempts"] >= 2
    assert delivery["last_status"] == 200
    assert delivery["last_error"] is None
    [request] = receiver.received()
    assert request.json()["event_id"] == delivery["event_id"]


def cancellation_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return any(
        record.name == "sequencer.linkedin_sandbox"
        and record.getMessage().startswith("cancelled 1 background tasks")
        for record in caplog.records
    )


def test_stop_cancels_webhook_retry(
    start_sandbox: Callable[..., LinkedInSandbox],
    start_receiver: Callable[..., Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sequencer.linkedin_sandbox")
    receiver = start_receiver([503] * 10)
    sandbox = start_sandbox(
        accept_delay=0, webhook_url=receiver.url, webhook_secret=SECRET, webhook_retry_delay=60
    )
    invite(sandbox)
    wait_for(
        lambda: sandbox.deliveries() and sandbox.deliveries()[0]["attempts"] == 1,
        "the first webhook attempt",
    )

    sandbox.stop()

    [delivery] = sandbox.deliveries()
    assert delivery["outcome"] == "cancelled"
    assert delivery["attempts"] == 1
    assert len(receiver.received()) == 1
    assert cancellation_logged(caplog)


def test_stop_cancels_pending_decision(
    start_sandbox: Callable[..., LinkedInSandbox],
    start_receiver: Callable[..., Receiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sequencer.linkedin_sandbox")
    receiver = start_receiver()
    sandbox = start_sandbox(accept_delay=60, webhook_url=receiver.url, webhook_secret=SECRET)
    assert invite(sandbox).status_code == 201

    sandbox.stop()

    assert cancellation_logged(caplog)
    assert sandbox.deliveries() == []
    assert receiver.received() == []


def set_session(sandbox: LinkedInSandbox, body: object, headers: dict[str, str] = AUTH):
    return httpx.post(f"{sandbox.base_url}/sandbox/session", json=body, headers=headers)


def test_expired_session_rejects_v1_requests(
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    sandbox = start_sandbox()
    created = invite(sandbox).json()

    response = set_session(sandbox, {"expired": True})

    assert response.status_code == 200
    assert response.json() == {"expired": True}
    requests = [
        ("POST", "/v1/profile-visits", {"profile_url": PROFILE}),
        ("POST", "/v1/invitations", {"profile_url": PROFILE, "idempotency_key": "wf-9:1"}),
        ("POST", "/v1/messages", {"profile_url": PROFILE, "text": "Hi"}),
        ("GET", f"/v1/invitations/{created['id']}", None),
        ("GET", "/v1/account", None),
    ]
    for method, path, body in requests:
        rejected = httpx.request(method, sandbox.base_url + path, json=body, headers=AUTH)
        assert rejected.status_code == 401, path
        assert rejected.json()["error"] == "session_expired", path
        assert "Reconnect" in rejected.json()["detail"], path
    actions = httpx.get(f"{sandbox.base_url}/v1/actions", headers=AUTH)
    assert actions.status_code == 200
    assert len(actions.json()) == 1


def test_reconnected_session_accepts_requests(
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    sandbox = start_sandbox()
    sandbox.expire_session()
    expired = httpx.get(f"{sandbox.base_url}/v1/account", headers=AUTH)

    response = set_session(sandbox, {"expired": False})

    assert expired.status_code == 401
    assert expired.json()["error"] == "session_expired"
    assert response.json() == {"expired": False}
    account = httpx.get(f"{sandbox.base_url}/v1/account", headers=AUTH)
    assert account.status_code == 200
    assert account.json() == {"status": "connected"}
    assert invite(sandbox).status_code == 201
    sandbox.expire_session(True)
    assert httpx.get(f"{sandbox.base_url}/v1/account", headers=AUTH).status_code == 401
    sandbox.expire_session(False)
    assert httpx.get(f"{sandbox.base_url}/v1/account", headers=AUTH).status_code == 200


def test_session_change_requires_api_key(start_sandbox: Callable[..., LinkedInSandbox]) -> None:
    sandbox = start_sandbox()

    response = set_session(sandbox, {"expired": True}, headers={})

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert httpx.get(f"{sandbox.base_url}/v1/account", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("body", "expected_detail"),
    [({}, "expired"), ({"expired": "yes"}, "expired"), ({"expired": True, "x": 1}, "x")],
    ids=["missing", "string", "unknown-field"],
)
def test_session_change_rejects_invalid_body(
    start_sandbox: Callable[..., LinkedInSandbox], body: dict, expected_detail: str
) -> None:
    sandbox = start_sandbox()

    response = set_session(sandbox, body)

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert expected_detail in response.json()["detail"]
    assert httpx.get(f"{sandbox.base_url}/v1/account", headers=AUTH).status_code == 200


def make_input(step: object, step_number: int = 2) -> StepInput:
    lead = Lead(email="jane@example.com", first_name="Jane", linkedin_url=PROFILE)
    return StepInput(
        campaign_id="demo",
        workflow_id="lead-demo-0123456789abcdef",
        step_number=step_number,
        step=step,
        lead=lead,
    )


async def test_activity_invitation_is_accepted(
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    sandbox = start_sandbox(accept_delay=0.1)
    activities = LinkedInActivities(base_url=sandbox.base_url, api_key=API_KEY)
    try:
        outcome = await ActivityEnvironment().run(
            activities.linkedin_step, make_input(LinkedInInviteStep())
        )
    finally:
        await activities.aclose()

    assert outcome.status == StepStatus.SENT
    assert outcome.detail is not None
    wait_for(
        lambda: invitation_status(sandbox, outcome.detail) == "accepted",
        "the invitation to be accepted",
    )
    invitation = get_invitation(sandbox, outcome.detail)
    assert invitation["idempotency_key"] == "lead-demo-0123456789abcdef:2"


async def test_expired_session_interrupts_activity(
    start_sandbox: Callable[..., LinkedInSandbox],
) -> None:
    sandbox = start_sandbox()
    activities = LinkedInActivities(base_url=sandbox.base_url, api_key=API_KEY)
    sandbox.expire_session()
    try:
        with pytest.raises(ApplicationError) as raised:
            await ActivityEnvironment().run(
                activities.linkedin_step, make_input(LinkedInVisitStep())
            )
        sandbox.expire_session(False)
        outcome = await ActivityEnvironment().run(
            activities.linkedin_step, make_input(LinkedInVisitStep())
        )
    finally:
        await activities.aclose()

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert raised.value.non_retryable
    assert "401" in raised.value.message
    assert "session expired" in raised.value.message
    assert "SEQUENCER_LINKEDIN_API_KEY" not in raised.value.message
    assert outcome.status == StepStatus.SENT
    assert len(sandbox.actions) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"accept_delay": -1}, "accept_delay"),
        ({"accept_delay": float("nan")}, "accept_delay"),
        ({"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_secret"),
        ({"webhook_url": "http://127.0.0.1:9/hook", "webhook_secret": ""}, "webhook_secret"),
        ({"webhook_url": "ftp://127.0.0.1/hook", "webhook_secret": SECRET}, "webhook_url"),
        ({"webhook_url": "/hook", "webhook_secret": SECRET}, "webhook_url"),
        (
            {
                "webhook_url": "http://127.0.0.1:9/",
                "webhook_secret": SECRET,
                "webhook_max_attempts": 0,
            },
            "webhook_max_attempts",
        ),
        (
            {
                "webhook_url": "http://127.0.0.1:9/",
                "webhook_secret": SECRET,
                "webhook_retry_delay": -1,
            },
            "webhook_retry_delay",
        ),
    ],
    ids=[
        "negative-delay",
        "nan-delay",
        "url-without-secret",
        "empty-secret",
        "ftp-url",
        "relative-url",
        "zero-attempts",
        "negative-retry-delay",
    ],
)
def test_invalid_options_rejected(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_app(API_KEY, **options)


def test_cli_requires_webhook_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SEQUENCER_LINKEDIN_WEBHOOK_SECRET", raising=False)

    with pytest.raises(SystemExit) as exited:
        main(["--port", "0", "--webhook-url", "http://127.0.0.1:9/hook"])

    assert exited.value.code == 2
    assert "webhook_secret" in capsys.readouterr().err
