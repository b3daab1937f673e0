"""The LinkedIn activity against the local provider sandbox, and the sandbox API itself.

Every test starts its own sandbox on a free 127.0.0.1 port, so actions never leak between
tests.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.linkedin import PROVIDER_REJECTED, LinkedInActivities
from sequencer.campaign import (
    EmailStep,
    LinkedInInviteStep,
    LinkedInMessageStep,
    LinkedInVisitStep,
)
from sequencer.channels import Reason, StepStatus
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE, TRANSIENT_ERROR_TYPE
from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.linkedin_urls import parse_linkedin_url
from sequencer.models import Lead, StepInput

API_KEY = "test-key"
PROFILE = "https://www.linkedin.com/in/jane-doe"
COMPANY_PAGE = "https://www.linkedin.com/company/acme"


class RequestCounter:
    """httpx event hook that counts the requests a client sends."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, request: httpx.Request) -> None:
        self.count += 1


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "actions.jsonl"


@pytest.fixture
def sandbox(journal: Path) -> Iterator[LinkedInSandbox]:
    server = LinkedInSandbox(port=0, api_key=API_KEY, journal_path=journal)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def requests() -> RequestCounter:
    return RequestCounter()


@pytest.fixture
async def linkedin(
    sandbox: LinkedInSandbox, requests: RequestCounter
) -> AsyncIterator[LinkedInActivities]:
    client = httpx.AsyncClient(timeout=5.0, event_hooks={"request": [requests]})
    activities = LinkedInActivities(base_url=sandbox.base_url, api_key=API_KEY, client=client)
    yield activities
    await activities.aclose()
    await client.aclose()


def make_input(
    step: object,
    *,
    linkedin_url: str | None = PROFILE,
    first_name: str | None = "Jane",
    workflow_id: str = "lead-demo-0123456789abcdef",
    step_number: int = 1,
) -> StepInput:
    lead = Lead(
        email="jane@example.com",
        first_name=first_name,
        company="Acme",
        linkedin_url=linkedin_url,
        variables={"topic": "pipeline reviews"},
    )
    return StepInput(
        campaign_id="demo",
        workflow_id=workflow_id,
        step_number=step_number,
        step=step,
        lead=lead,
    )


async def run_step(activities: LinkedInActivities, step_input: StepInput):
    return await ActivityEnvironment().run(activities.linkedin_step, step_input)


def fetch_actions(sandbox: LinkedInSandbox) -> list[dict]:
    response = httpx.get(
        f"{sandbox.base_url}/v1/actions", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert response.status_code == 200
    return response.json()


def journal_lines(journal: Path) -> list[dict]:
    return [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("step", "action_type", "text_field", "expected_text"),
    [
        (LinkedInVisitStep(), "profile_visit", None, None),
        (
            LinkedInInviteStep(note="Hi {{first_name}}, I work with {{company}} peers."),
            "invitation",
            "note",
            "Hi Jane, I work with Acme peers.",
        ),
        (
            LinkedInMessageStep(
                message="Thanks {{first_name}}! Open to {{topic}} for {{role|your team}}?"
            ),
            "message",
            "text",
            "Thanks Jane! Open to pipeline reviews for your team?",
        ),
    ],
    ids=["visit", "invite", "message"],
)
async def test_valid_profile_step_sent(
    sandbox: LinkedInSandbox,
    journal: Path,
    linkedin: LinkedInActivities,
    step: object,
    action_type: str,
    text_field: str | None,
    expected_text: str | None,
) -> None:
    outcome = await run_step(linkedin, make_input(step, step_number=3))

    assert outcome.status == StepStatus.SENT
    assert outcome.reason is None
    actions = fetch_actions(sandbox)
    assert len(actions) == 1
    action = actions[0]
    assert outcome.detail == action["id"]
    assert action["type"] == action_type
    assert action["status"] == ("visited" if action_type == "profile_visit" else "sent")
    assert action["profile_url"] == PROFILE
    assert action["idempotency_key"] == "lead-demo-0123456789abcdef:3"
    if text_field is not None:
        assert action[text_field] == expected_text
        assert "{{" not in action[text_field]
    assert journal_lines(journal) == actions


async def test_invite_without_note_sends_no_note(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities
) -> None:
    outcome = await run_step(linkedin, make_input(LinkedInInviteStep()))

    assert outcome.status == StepStatus.SENT
    actions = fetch_actions(sandbox)
    assert len(actions) == 1
    assert "note" not in actions[0]


async def test_deactivated_profile_fails(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities
) -> None:
    step_input = make_input(
        LinkedInVisitStep(), linkedin_url="https://www.linkedin.com/in/old-deactivated"
    )

    outcome = await run_step(linkedin, step_input)

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == Reason.PROFILE_DEACTIVATED
    assert "410" in (outcome.detail or "")
    assert fetch_actions(sandbox) == []


async def test_company_page_fails_without_request(
    sandbox: LinkedInSandbox,
    journal: Path,
    linkedin: LinkedInActivities,
    requests: RequestCounter,
) -> None:
    parsed = parse_linkedin_url(COMPANY_PAGE)
    assert parsed.verdict == "invalid"

    outcome = await run_step(
        linkedin, make_input(LinkedInMessageStep(message="Hi"), linkedin_url=COMPANY_PAGE)
    )

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == Reason.INVALID_LINKEDIN_URL
    assert outcome.detail == parsed.reason
    assert outcome.detail
    assert requests.count == 0
    assert fetch_actions(sandbox) == []
    assert journal_lines(journal) == []


@pytest.mark.parametrize("linkedin_url", [None, "", "   "], ids=["none", "empty", "blank"])
async def test_missing_url_fails_without_request(
    sandbox: LinkedInSandbox,
    linkedin: LinkedInActivities,
    requests: RequestCounter,
    linkedin_url: str | None,
) -> None:
    step_input = make_input(LinkedInVisitStep(), linkedin_url=linkedin_url)

    outcome = await run_step(linkedin, step_input)

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == Reason.NO_LINKEDIN_URL
    assert requests.count == 0
    assert fetch_actions(sandbox) == []


async def test_missing_variable_fails_without_request(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities, requests: RequestCounter
) -> None:
    step = LinkedInMessageStep(message="Hi {{first_name}}, about {{company}}")

    outcome = await run_step(linkedin, make_input(step, first_name=None))

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == Reason.MISSING_VARIABLE
    assert "first_name" in (outcome.detail or "")
    assert (outcome.detail or "").startswith("message:")
    assert requests.count == 0
    assert fetch_actions(sandbox) == []


@pytest.mark.parametrize(
    ("linkedin_url", "verdict", "sent_url"),
    [
        (
            "https://www.linkedin.com/pub/jane-doe/12/345/678",
            "needs-resolution",
            "https://www.linkedin.com/pub/jane-doe/12/345/678",
        ),
        (
            "https://www.linkedin.com/profile/view?id=123456&trk=nav",
            "needs-resolution",
            "https://www.linkedin.com/profile/view?id=123456",
        ),
        (
            "https://www.linkedin.com/sales/lead/ACwAAAbCdEf123,NAME_SEARCH,xY9z",
            "normalise",
            "https://www.linkedin.com/sales/lead/ACwAAAbCdEf123",
        ),
        ("  LinkedIn.com/in/Jane-Doe/  ", "normalise", PROFILE),
    ],
    ids=["legacy-pub", "legacy-numeric", "sales-navigator", "uncanonical-profile"],
)
async def test_other_profile_urls_sent(
    sandbox: LinkedInSandbox,
    linkedin: LinkedInActivities,
    linkedin_url: str,
    verdict: str,
    sent_url: str,
) -> None:
    assert parse_linkedin_url(linkedin_url).verdict == verdict

    outcome = await run_step(linkedin, make_input(LinkedInVisitStep(), linkedin_url=linkedin_url))

    assert outcome.status == StepStatus.SENT
    actions = fetch_actions(sandbox)
    assert len(actions) == 1
    assert actions[0]["profile_url"] == sent_url


async def test_rate_limited_profile_retried(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities
) -> None:
    step_input = make_input(
        LinkedInMessageStep(message="Hi {{first_name}}"),
        linkedin_url="https://www.linkedin.com/in/busy-ratelimited",
    )

    for attempt in (1, 2):
        with pytest.raises(ApplicationError) as raised:
            await run_step(linkedin, step_input)
        assert raised.value.type == TRANSIENT_ERROR_TYPE, f"attempt {attempt}"
        assert not raised.value.non_retryable
        assert raised.value.next_retry_delay == timedelta(seconds=1)
        assert "429" in raised.value.message
    assert fetch_actions(sandbox) == []

    outcome = await run_step(linkedin, step_input)

    assert outcome.status == StepStatus.SENT
    assert len(fetch_actions(sandbox)) == 1


async def test_unavailable_provider_retried(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities
) -> None:
    step_input = make_input(
        LinkedInVisitStep(), linkedin_url="https://www.linkedin.com/in/jane-flaky"
    )

    with pytest.raises(ApplicationError) as raised:
        await run_step(linkedin, step_input)

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert not raised.value.non_retryable
    assert raised.value.next_retry_delay is None
    assert "503" in raised.value.message
    outcome = await run_step(linkedin, step_input)
    assert outcome.status == StepStatus.SENT
    assert len(fetch_actions(sandbox)) == 1


async def test_wrong_api_key_interrupts_account(sandbox: LinkedInSandbox) -> None:
    activities = LinkedInActivities(base_url=sandbox.base_url, api_key="wrong-secret-key")
    try:
        with pytest.raises(ApplicationError) as raised:
            await run_step(activities, make_input(LinkedInVisitStep()))
    finally:
        await activities.aclose()

    assert raised.value.type == ACCOUNT_INTERRUPTED_ERROR_TYPE
    assert raised.value.non_retryable
    assert "SEQUENCER_LINKEDIN_API_KEY" in raised.value.message
    assert "401" in raised.value.message
    assert "wrong-secret-key" not in raised.value.message
    assert fetch_actions(sandbox) == []


async def test_repeated_step_sends_once(
    sandbox: LinkedInSandbox, journal: Path, linkedin: LinkedInActivities
) -> None:
    step_input = make_input(LinkedInMessageStep(message="Hi {{first_name}}"), step_number=2)

    first = await run_step(linkedin, step_input)
    second = await run_step(linkedin, step_input)

    assert first.status == StepStatus.SENT
    assert second.status == StepStatus.SENT
    assert second.detail == first.detail
    assert len(fetch_actions(sandbox)) == 1
    assert len(journal_lines(journal)) == 1


async def test_other_step_number_sends_again(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities
) -> None:
    step = LinkedInMessageStep(message="Hi {{first_name}}")

    first = await run_step(linkedin, make_input(step, step_number=2))
    second = await run_step(linkedin, make_input(step, step_number=4))

    assert first.detail != second.detail
    assert len(fetch_actions(sandbox)) == 2


async def test_long_invitation_note_rejected(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities
) -> None:
    # "Hi Jane " is 8 characters, so the rendered note is 301 characters long.
    step = LinkedInInviteStep(note="Hi {{first_name}} " + "x" * 293)

    outcome = await run_step(linkedin, make_input(step))

    assert outcome.status == StepStatus.FAILED
    assert outcome.reason == PROVIDER_REJECTED
    assert "422" in (outcome.detail or "")
    assert "300 characters" in (outcome.detail or "")
    assert fetch_actions(sandbox) == []


async def test_invitation_note_at_limit_sent(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities
) -> None:
    step = LinkedInInviteStep(note="Hi {{first_name}} " + "x" * 292)

    outcome = await run_step(linkedin, make_input(step))

    assert outcome.status == StepStatus.SENT
    assert len(fetch_actions(sandbox)[0]["note"]) == 300


async def test_unreachable_provider_retried() -> None:
    activities = LinkedInActivities(base_url=f"http://127.0.0.1:{closed_port()}", api_key=API_KEY)
    try:
        with pytest.raises(ApplicationError) as raised:
            await run_step(activities, make_input(LinkedInVisitStep()))
    finally:
        await activities.aclose()

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert not raised.value.non_retryable
    assert "cannot reach" in raised.value.message


async def test_timeout_retried_and_sent_once(sandbox: LinkedInSandbox) -> None:
    # The sandbox records a "slow" profile's action at once but responds a second later, so the
    # first call times out after the provider acted, and the retry must not act again.
    activities = LinkedInActivities(base_url=sandbox.base_url, api_key=API_KEY, timeout=0.2)
    step_input = make_input(
        LinkedInVisitStep(), linkedin_url="https://www.linkedin.com/in/jane-slow"
    )
    try:
        with pytest.raises(ApplicationError) as raised:
            await run_step(activities, step_input)
        outcome = await run_step(activities, step_input)
    finally:
        await activities.aclose()

    assert raised.value.type == TRANSIENT_ERROR_TYPE
    assert "timed out" in raised.value.message
    assert outcome.status == StepStatus.SENT
    actions = fetch_actions(sandbox)
    assert len(actions) == 1
    assert outcome.detail == actions[0]["id"]


async def test_email_step_rejected(linkedin: LinkedInActivities, requests: RequestCounter) -> None:
    step = EmailStep(subject="Hello", body="Hi {{first_name}}")

    with pytest.raises(ApplicationError) as raised:
        await run_step(linkedin, make_input(step))

    assert raised.value.non_retryable
    assert "email" in raised.value.message
    assert requests.count == 0


@pytest.mark.parametrize(
    "base_url", ["", "127.0.0.1:8765", "ftp://127.0.0.1/", "http://"], ids=repr
)
def test_invalid_base_url_rejected(base_url: str) -> None:
    with pytest.raises(ValueError, match="invalid LinkedIn provider URL"):
        LinkedInActivities(base_url=base_url, api_key=API_KEY)


def test_empty_api_key_rejected() -> None:
    with pytest.raises(ValueError, match="SEQUENCER_LINKEDIN_API_KEY"):
        LinkedInActivities(base_url="http://127.0.0.1:8765", api_key="")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong-key", "basic-scheme", "empty-bearer"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/profile-visits"), ("POST", "/v1/messages"), ("GET", "/v1/actions")],
)
def test_sandbox_rejects_bad_credentials(
    sandbox: LinkedInSandbox, journal: Path, headers: dict[str, str], method: str, path: str
) -> None:
    body = {"profile_url": PROFILE, "text": "Hi"} if method == "POST" else None

    response = httpx.request(method, sandbox.base_url + path, json=body, headers=headers)

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert sandbox.actions == []
    assert journal_lines(journal) == []


def test_sandbox_replays_idempotent_request(sandbox: LinkedInSandbox) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"profile_url": PROFILE, "idempotency_key": "wf-1:1"}

    first = httpx.post(f"{sandbox.base_url}/v1/profile-visits", json=body, headers=headers)
    second = httpx.post(f"{sandbox.base_url}/v1/profile-visits", json=body, headers=headers)
    reused = httpx.post(
        f"{sandbox.base_url}/v1/messages", json={**body, "text": "Hi"}, headers=headers
    )

    assert first.status_code == 201
    assert first.json()["status"] == "visited"
    assert second.status_code == 201
    assert second.json() == first.json()
    assert reused.status_code == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert len(sandbox.actions) == 1


@pytest.mark.parametrize(
    ("path", "body", "expected_detail"),
    [
        ("/v1/messages", {"profile_url": PROFILE}, "text"),
        ("/v1/messages", {"profile_url": PROFILE, "text": ""}, "text"),
        ("/v1/invitations", {"profile_url": PROFILE, "note": "x" * 301}, "300 characters"),
        ("/v1/profile-visits", {}, "profile_url"),
        ("/v1/profile-visits", {"profile_url": PROFILE, "extra": 1}, "extra"),
        ("/v1/profile-visits", {"profile_url": COMPANY_PAGE}, "LinkedIn profile URL"),
        ("/v1/profile-visits", {"profile_url": "https://example.com/in/jane"}, "profile URL"),
    ],
    ids=[
        "message-without-text",
        "empty-text",
        "long-note",
        "no-profile",
        "unknown-field",
        "company-page",
        "other-host",
    ],
)
def test_sandbox_rejects_invalid_body(
    sandbox: LinkedInSandbox, path: str, body: dict, expected_detail: str
) -> None:
    response = httpx.post(
        sandbox.base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )

    assert response.status_code == 422
    assert expected_detail in response.json()["detail"]
    assert sandbox.actions == []


def test_sandbox_rejects_malformed_json(sandbox: LinkedInSandbox) -> None:
    response = httpx.post(
        f"{sandbox.base_url}/v1/profile-visits",
        content=b'{"profile_url": ',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )

    assert response.status_code == 422
    assert response.json() == {"error": "invalid_request", "detail": "the body is not valid JSON"}


def test_sandbox_port_zero_picks_free_port() -> None:
    first = LinkedInSandbox(port=0)
    with pytest.raises(RuntimeError, match="start"):
        first.base_url  # noqa: B018 - the property raises before start()
    with first:
        assert not first.base_url.endswith(":0")
        with pytest.raises(RuntimeError, match="already running"):
            first.start()
        same_port = LinkedInSandbox(port=first.port)
        with pytest.raises(OSError, match="cannot bind"):
            same_port.start()
    first.stop()


def test_sandbox_stops_listening(sandbox: LinkedInSandbox) -> None:
    base_url = sandbox.base_url

    sandbox.stop()

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/v1/actions", timeout=2.0)


async def test_logs_contain_no_personal_data(
    sandbox: LinkedInSandbox, linkedin: LinkedInActivities, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    deactivated = "https://www.linkedin.com/in/jane-deactivated"

    await run_step(linkedin, make_input(LinkedInMessageStep(message="Hi {{first_name}}")))
    await run_step(linkedin, make_input(LinkedInVisitStep(), linkedin_url=deactivated))
    await run_step(linkedin, make_input(LinkedInVisitStep(), linkedin_url=COMPANY_PAGE))

    ours = [
        record
        for record in caplog.records
        if record.name in ("activities.linkedin", "sequencer.linkedin_sandbox")
    ]
    assert ours
    for record in ours:
        message = record.getMessage().lower()
        assert "jane" not in message, message
        assert "acme" not in message, message
        assert "linkedin.com" not in message, message
