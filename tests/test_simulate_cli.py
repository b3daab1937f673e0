"""`sequencer simulate --json`: the worked scenarios from files, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SEQUENCER = [str(Path(sys.executable).parent / "sequencer")]
DAY = 86400
LEADS = "email,first_name,linkedin_url,phone\nann@example.com,Ann,https://www.linkedin.com/in/ann-x,+33612345678\n"

EMAIL = {"type": "email", "subject": "Hi {{first_name}}", "body": "Hello"}


def write_files(tmp_path: Path, steps: list[dict], outcomes: dict) -> list[str]:
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump({"name": "Scenario", "sender": {"email": "rep@acme.test"}, "steps": steps})
    )
    leads = tmp_path / "leads.csv"
    leads.write_text(LEADS)
    outcomes_file = tmp_path / "outcomes.yaml"
    outcomes_file.write_text(yaml.safe_dump(outcomes))
    return [str(campaign), "--leads", str(leads), "--outcomes", str(outcomes_file)]


def simulate(tmp_path: Path, steps: list[dict], outcomes: dict) -> dict:
    result = subprocess.run(
        [*SEQUENCER, "simulate", *write_files(tmp_path, steps, outcomes), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rows(report: dict) -> list[tuple[int, str, int | None]]:
    return [(s["step"], s["status"], s["at_seconds"]) for s in report["leads"][0]["steps"]]


def test_scenario_a_from_files(tmp_path):
    report = simulate(
        tmp_path,
        [
            {"type": "linkedin_invite", "wait_after": "2d"},
            {"type": "linkedin_message", "wait_after": "1d", "message": "Thanks"},
            {**EMAIL, "wait_after": "3d"},
            EMAIL,
        ],
        {"ann@example.com": {"steps": {1: "fail"}}},
    )
    assert rows(report) == [
        (1, "failed", 0),
        (2, "skipped", 0),
        (3, "sent", 0),
        (4, "sent", 3 * DAY),
    ]
    assert report["leads"][0]["status"] == "completed"
    assert report["leads"][0]["unsubscribed"] is False


def test_scenario_b_from_files(tmp_path):
    report = simulate(
        tmp_path,
        [
            {**EMAIL, "wait_after": "2d"},
            {**EMAIL, "wait_after": "1d"},
            {**EMAIL, "wait_after": "1d"},
            {"type": "linkedin_visit", "wait_after": "2d"},
            {"type": "linkedin_message", "wait_after": "3d", "message": "Hello"},
            {**EMAIL, "wait_after": "2d"},
            {"type": "manual_task", "instructions": "Send a gift"},
        ],
        {"ann@example.com": {"steps": {1: "bounce"}}},
    )
    assert rows(report) == [
        (1, "bounced", 0),
        (2, "skipped", 0),
        (3, "skipped", 0),
        (4, "sent", 0),
        (5, "sent", 2 * DAY),
        (6, "skipped", 0),
        (7, "sent", 5 * DAY),
    ]
    assert report["leads"][0]["unsubscribed"] is True
    assert report["leads"][0]["status"] == "completed"


def test_scenario_c_from_files(tmp_path):
    report = simulate(
        tmp_path,
        [{**EMAIL, "wait_after": "2d"}, {**EMAIL, "wait_after": "1d"}, EMAIL],
        {"ann@example.com": {"steps": {1: "bounce"}}},
    )
    assert report == {
        "campaign": "Scenario",
        "leads": [
            {
                "lead": "ann@example.com",
                "status": "stopped",
                "unsubscribed": True,
                "steps": [
                    {
                        "step": 1,
                        "type": "email",
                        "channel": "email",
                        "status": "bounced",
                        "at_seconds": 0,
                        "reason": "bounce",
                    },
                    {
                        "step": 2,
                        "type": "email",
                        "channel": "email",
                        "status": "skipped",
                        "at_seconds": 0,
                        "reason": "step 1 bounced",
                    },
                    {
                        "step": 3,
                        "type": "email",
                        "channel": "email",
                        "status": "skipped",
                        "at_seconds": 0,
                        "reason": "step 1 bounced",
                    },
                ],
            }
        ],
    }


def test_scenario_d_from_files(tmp_path):
    report = simulate(
        tmp_path,
        [{**EMAIL, "wait_after": "2d"}, {**EMAIL, "wait_after": "2d"}, {"type": "linkedin_visit"}],
        {"ann@example.com": {"events": [{"after": "1d", "type": "bounce", "step": 1}]}},
    )
    assert rows(report) == [(1, "bounced", DAY), (2, "skipped", DAY), (3, "sent", DAY)]
    assert report["leads"][0]["unsubscribed"] is True
    assert report["leads"][0]["status"] == "completed"


@pytest.mark.parametrize(
    "outcomes, message",
    [
        ({"nobody@example.com": {}}, "nobody@example.com: not a lead"),
        ({"ann@example.com": {"steps": {9: "fail"}}}, "step 9 does not exist"),
        ({"ann@example.com": {"steps": {3: "bounce"}}}, "step 3 is not an email step"),
        (
            {"ann@example.com": {"steps": {1: "explode"}}},
            "ann@example.com: step 1: invalid value 'explode'",
        ),
        (
            {"ann@example.com": {"events": [{"after": "1d", "type": "bounce"}]}},
            "needs a step number",
        ),
    ],
)
def test_invalid_outcomes_rejected(tmp_path, outcomes, message):
    result = subprocess.run(
        [
            *SEQUENCER,
            "simulate",
            *write_files(tmp_path, [EMAIL, EMAIL, {"type": "linkedin_visit"}], outcomes),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert message in result.stderr
