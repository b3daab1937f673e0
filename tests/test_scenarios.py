"""The worked scenarios of the sequencing rules, run through the real workflow."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory

from sequencer.campaign import parse_campaign
from sequencer.models import Lead
from sequencer.simulate import LeadScript, run_simulation

DAY = 86400
LEAD = Lead(
    email="ann@example.com",
    first_name="Ann",
    linkedin_url="https://www.linkedin.com/in/ann-example",
    phone="+33612345678",
)


def campaign(*steps: dict[str, Any]):
    return parse_campaign(
        {"name": "Scenario", "sender": {"email": "rep@acme.test"}, "steps": list(steps)}
    )


def email(wait: str | None = None) -> dict[str, Any]:
    step = {"type": "email", "subject": "Hi {{first_name}}", "body": "Hello"}
    if wait:
        step["wait_after"] = wait
    return step


def step(kind: str, wait: str | None = None, **fields: str) -> dict[str, Any]:
    result: dict[str, Any] = {"type": kind, **fields}
    if wait:
        result["wait_after"] = wait
    return result


# With SEQUENCER_SAVE_HISTORIES=DIR, each scenario saves its lead's workflow history there, as
# DIR/scenario_<test name>.json, for the replay tests (see docs/histories.md).
SAVE_HISTORIES = os.environ.get("SEQUENCER_SAVE_HISTORIES")
_current = {"test": ""}


@pytest.fixture(autouse=True)
def _name_histories(request: pytest.FixtureRequest) -> None:
    _current["test"] = request.node.name.removeprefix("test_")


async def simulate(env, steps: list[dict[str, Any]], script: dict[str, Any]) -> dict[str, Any]:
    histories: dict[str, WorkflowHistory] = {}
    report = await run_simulation(
        campaign(*steps), [LEAD], {LEAD.key: LeadScript.model_validate(script)}, env, histories
    )
    if SAVE_HISTORIES:
        name = re.sub(r"[^a-z0-9_]+", "_", _current["test"]).strip("_").removeprefix("scenario_")
        path = Path(SAVE_HISTORIES) / f"scenario_{name}.json"
        path.write_text(histories[LEAD.key].to_json())
    return report["leads"][0]


def timeline(lead: dict[str, Any]) -> list[tuple[int, str, int | None]]:
    """Return each step's number, status and time after enrollment, rounded to the minute.

    Between its jumps, the time-skipping server's clock runs in real time. On a loaded
    machine the activities and workflow tasks of a lead took more than half a second in all,
    and a step due 4 days after enrollment showed 345,601 seconds.
    """
    return [(s["step"], s["status"], to_minute(s["at_seconds"])) for s in lead["steps"]]


def to_minute(seconds: int | None) -> int | None:
    return None if seconds is None else round(seconds / 60) * 60


async def test_scenario_a_linkedin_fails_first(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [
            step("linkedin_invite", "2d"),
            step("linkedin_message", "1d", message="Thanks"),
            email("3d"),
            email(),
        ],
        {"steps": {1: "fail"}},
    )
    assert timeline(lead) == [
        (1, "failed", 0),
        (2, "skipped", 0),
        (3, "sent", 0),
        (4, "sent", 3 * DAY),
    ]
    assert lead["status"] == "completed"
    assert lead["unsubscribed"] is False
    assert lead["steps"][1]["reason"] == "step 1 failed"


async def test_scenario_b_bounce_in_mixed_campaign(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [
            email("2d"),
            email("1d"),
            email("1d"),
            step("linkedin_visit", "2d"),
            step("linkedin_message", "3d", message="Hello"),
            email("2d"),
            step("manual_task", instructions="Send a gift"),
        ],
        {"steps": {1: "bounce"}, "events": [{"after": "6d", "type": "task_done", "step": 7}]},
    )
    assert timeline(lead) == [
        (1, "bounced", 0),
        (2, "skipped", 0),
        (3, "skipped", 0),
        (4, "sent", 0),
        (5, "sent", 2 * DAY),
        (6, "skipped", 0),
        (7, "sent", 6 * DAY),
    ]
    assert lead["unsubscribed"] is True
    assert lead["status"] == "completed"


async def test_scenario_b_task_becomes_due_at_five_days(time_skipping_env):
    # With no task event, a task is done as soon as it is due: that instant is when it fell due.
    lead = await simulate(
        time_skipping_env,
        [
            email("2d"),
            email("1d"),
            email("1d"),
            step("linkedin_visit", "2d"),
            step("linkedin_message", "3d", message="Hello"),
            email("2d"),
            step("manual_task", instructions="Send a gift"),
        ],
        {"steps": {1: "bounce"}},
    )
    assert timeline(lead)[6] == (7, "sent", 5 * DAY)
    assert lead["status"] == "completed"


async def test_scenario_c_email_only_bounce_stops(time_skipping_env):
    lead = await simulate(
        time_skipping_env, [email("2d"), email("1d"), email()], {"steps": {1: "bounce"}}
    )
    assert timeline(lead) == [(1, "bounced", 0), (2, "skipped", 0), (3, "skipped", 0)]
    assert lead["unsubscribed"] is True
    assert lead["status"] == "stopped"


async def test_scenario_d_late_bounce(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [email("2d"), email("2d"), step("linkedin_visit")],
        {"events": [{"after": "1d", "type": "bounce", "step": 1}]},
    )
    assert timeline(lead) == [(1, "bounced", DAY), (2, "skipped", DAY), (3, "sent", DAY)]
    assert lead["unsubscribed"] is True
    assert lead["status"] == "completed"


async def test_late_bounce_after_completion_keeps_status(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [email("1d"), email()],
        {"events": [{"after": "3d", "type": "bounce", "step": 2}]},
    )
    assert lead["status"] == "completed"
    assert lead["unsubscribed"] is True
    assert timeline(lead) == [(1, "sent", 0), (2, "bounced", 3 * DAY)]


async def test_reply_cancels_wait_and_skips_rest(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [email("2d"), step("linkedin_visit", "1d"), email()],
        {"events": [{"after": "1d", "type": "reply"}]},
    )
    assert timeline(lead) == [(1, "sent", 0), (2, "skipped", DAY), (3, "skipped", DAY)]
    assert [s["reason"] for s in lead["steps"][1:]] == ["replied", "replied"]
    assert lead["status"] == "replied"


@pytest.mark.parametrize("outcome", ["task_failed", "task_skipped"])
async def test_task_outcome_moves_on(time_skipping_env, outcome):
    lead = await simulate(
        time_skipping_env,
        [step("call", "1d"), step("call", "1d"), email()],
        {"events": [{"after": "2d", "type": outcome, "step": 1}]},
    )
    expected_first = "failed" if outcome == "task_failed" else "skipped"
    assert timeline(lead)[0] == (1, expected_first, 2 * DAY)
    if outcome == "task_failed":
        # A failed call skips the remaining calls and runs the email at once.
        assert timeline(lead)[1:] == [(2, "skipped", 2 * DAY), (3, "sent", 2 * DAY)]
    else:
        # A skipped task contributes no wait: the next call is due at once.
        assert timeline(lead)[1] == (2, "sent", 2 * DAY)
    assert lead["status"] == "completed"


async def test_simulated_pending_invitation_then_acceptance(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [step("linkedin_invite", "1d"), step("linkedin_message", "1d", message="Hi"), email()],
        {"steps": {1: "invite_pending"}, "events": [{"after": "3d", "type": "invite_accepted"}]},
    )
    assert timeline(lead) == [(1, "sent", 0), (2, "sent", 3 * DAY), (3, "sent", 4 * DAY)]
    assert lead["status"] == "completed"


async def test_simulated_declined_invitation(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [step("linkedin_invite", "1d"), step("linkedin_message", "1d", message="Hi"), email()],
        {"steps": {1: "invite_pending"}, "events": [{"after": "2d", "type": "invite_declined"}]},
    )
    assert timeline(lead) == [(1, "sent", 0), (2, "failed", 2 * DAY), (3, "sent", 2 * DAY)]
    assert lead["steps"][1]["reason"] == "invite_not_accepted"


async def test_simulated_account_outage_pauses_and_resumes(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [email("1d"), email()],
        {
            "events": [
                {"after": "12h", "type": "account_disconnected", "account": "email"},
                {"after": "3d", "type": "account_reconnected", "account": "email"},
            ]
        },
    )
    # Step 2 fell due at 1d while the inbox was disconnected, and ran when it came back.
    assert timeline(lead) == [(1, "sent", 0), (2, "sent", 3 * DAY)]
    assert lead["status"] == "completed"


async def test_simulated_account_that_never_reconnects(time_skipping_env):
    lead = await simulate(
        time_skipping_env,
        [email("1d"), email()],
        {"events": [{"after": "12h", "type": "account_disconnected", "account": "email"}]},
    )
    assert lead["status"] == "paused"
    assert timeline(lead) == [(1, "sent", 0), (2, "pending", None)]
