"""Interruptions on a real `sequencer up`, with nothing typed by hand while the leads run.

The LinkedIn sandbox accepts one lead's invitation and declines the other's, and reports both
through the stack's webhook receiver. The SMTP server refuses the campaign's `outage-*` sender
for its first 20 seconds, so the leads pause on their email step and resume once the account's
health check finds the inbox working again.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from sequencer.stack import StackPorts
from sequencer.temporal import find_binary
from tests.test_stack_e2e import (
    StackProcess,
    cli_json,
    flat,
    messages_to,
    run_cli,
    steps_of,
    wait_until,
)

pytestmark = pytest.mark.stack

CAMPAIGN_ID = "interruptions-e2e"
SENDER = "outage-rep@acme.test"
ACCEPTS = "ann@northwind.example"
DECLINES = "eve@contoso.example"
LEADS_CSV = f"""first_name,email,linkedin_url
Ann,{ACCEPTS},https://www.linkedin.com/in/ann-archer
Eve,{DECLINES},https://www.linkedin.com/in/eve-evans-declines
"""


def campaign_yaml(smtp_port: int) -> str:
    return f"""
name: Interruptions e2e
id: {CAMPAIGN_ID}
sender: {{email: {SENDER}, smtp_url: "smtp://127.0.0.1:{smtp_port}"}}
steps:
  - type: linkedin_invite
    wait_after: 2s
  - type: linkedin_message
    message: "Thanks for connecting, {{{{first_name}}}}"
    wait_after: 1s
  - type: email
    subject: "Hello {{{{first_name}}}}"
    body: "A short note."
"""


def activity(home, lead: str) -> dict[str, Any]:
    return cli_json(home, "activity", CAMPAIGN_ID, lead)


def workflows_matching(temporal_port: int, query: str) -> set[str]:
    """Return the ids of the workflows a Temporal UI filter finds, through the temporal CLI."""
    listed = subprocess.run(
        [
            str(find_binary("temporal")),
            "workflow",
            "list",
            "--address",
            f"127.0.0.1:{temporal_port}",
            "--query",
            query,
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    text = listed.stdout.strip()
    return {item["execution"]["workflowId"] for item in json.loads(text)} if text else set()


def settled(read: Callable[[], set[str]], timeout: float = 20) -> set[str]:
    """Call `read` until it returns an empty set or the time is up (visibility lags a little)."""
    deadline = time.monotonic() + timeout
    found = read()
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = read()
    return found


WAITING_ON_SENDER = f'SequencerAccount = "email:{SENDER}" AND SequencerStage = "paused-account"'


def events(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in report["log"] if entry["kind"] == "event"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("stack-interruptions")
    stack = StackProcess(home, StackPorts.free())
    try:
        stack.wait_ready()
        (home / "campaign.yaml").write_text(campaign_yaml(stack.ports.smtp))
        (home / "leads.csv").write_text(LEADS_CSV)
        launch = cli_json(home, "launch", "campaign.yaml", "--leads", "leads.csv")
        seen: dict[str, Any] = {"paused": set(), "statuses": {}, "waiting": set()}

        def every_lead_ended() -> bool:
            stack.check_running()
            rows = cli_json(home, "leads", CAMPAIGN_ID)
            seen["statuses"] = {row["lead"]: row["status"] for row in rows}
            seen["paused"] |= {row["lead"] for row in rows if row["status"] == "paused"}
            seen["waiting"] |= workflows_matching(stack.ports.temporal, WAITING_ON_SENDER)
            return set(seen["statuses"].values()) <= {"completed", "stopped"}

        wait_until(every_lead_ended, lambda: str(seen), "every lead has ended", timeout=150)
        yield {
            "home": home,
            "launch": launch,
            "seen_paused": seen["paused"],
            "seen_waiting": seen["waiting"],
            "lead_workflows": workflows_matching(
                stack.ports.temporal, f'SequencerCampaign = "{CAMPAIGN_ID}"'
            ),
            "using_sender_after": settled(
                lambda: workflows_matching(
                    stack.ports.temporal, f'SequencerAccount = "email:{SENDER}"'
                )
            ),
            "reports": {lead: activity(home, lead) for lead in (ACCEPTS, DECLINES)},
            "accounts": cli_json(home, "account", "list"),
            "stats": cli_json(home, "stats", CAMPAIGN_ID),
        }
    finally:
        stack.stop()


def test_both_leads_complete(run):
    assert sorted(run["launch"]["enrolled"]) == sorted([ACCEPTS, DECLINES])
    assert {lead: r["status"] for lead, r in run["reports"].items()} == {
        ACCEPTS: "completed",
        DECLINES: "completed",
    }


def test_message_waits_for_the_webhook_acceptance(run):
    report = run["reports"][ACCEPTS]
    step_2 = [e for e in report["log"] if e["kind"] == "step" and e["step"] == 2]
    assert [(e["status"], e["reason"]) for e in step_2] == [
        ("waiting", "invitation_pending"),
        ("sent", None),
    ]
    accepted = [e for e in events(report) if e["status"] == "invite_accepted"]
    assert len(accepted) == 1
    assert accepted[0]["detail"] == "invitation.accepted"
    assert step_2[1]["at"] >= accepted[0]["at"]


def test_declined_invitation_fails_the_message(run):
    steps = steps_of(run["reports"][DECLINES])
    assert steps[2]["status"] == "failed"
    assert steps[2]["reason"] == "invite_not_accepted"
    assert steps[3]["status"] == "sent"


def test_outage_pauses_then_resumes_by_itself(run):
    for lead, report in run["reports"].items():
        names = [e["status"] for e in events(report)]
        assert "paused" in names, lead
        assert names.index("paused") < names.index("resumed"), lead
        paused = next(e for e in events(report) if e["status"] == "paused")
        assert paused["reason"] == f"email:{SENDER} is disconnected"
        assert "535" in paused["detail"]
    assert run["seen_paused"], "`sequencer leads` never showed a paused lead"


def test_filter_finds_leads_waiting_on_account(run):
    # The README's filter for "all leads waiting on a given account" found both leads while
    # they were paused, and finds none once they have ended.
    assert len(run["lead_workflows"]) == 2
    assert run["seen_waiting"] == run["lead_workflows"]
    assert run["using_sender_after"] == set()


def test_each_lead_got_one_email(run):
    for lead in (ACCEPTS, DECLINES):
        messages = messages_to(run["home"], lead)
        assert len(messages) == 1, lead
        assert messages[0]["From"].addresses[0].addr_spec == SENDER


def test_account_is_connected_again(run):
    account = next(a for a in run["accounts"] if a["id"] == f"email:{SENDER}")
    assert account["connected"] is True
    assert account["sends_last_24h"] == {"email": 2}
    assert account["last_check"].startswith("health check")


def test_stats_count_every_step(run):
    steps = {row["step"]: row for row in run["stats"]["steps"]}
    assert steps[2]["sent"] == 1
    assert steps[2]["failed"] == 1
    assert steps[3]["sent"] == 2


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (("lead", "pause", CAMPAIGN_ID, ACCEPTS), "already ended as completed; nothing changed"),
        (("lead", "resume", CAMPAIGN_ID, "nobody@example.com"), "'nobody@example.com' is not"),
        (("event", "invite-accepted", CAMPAIGN_ID, ACCEPTS), "nothing changed"),
        (("account", "reconnect", SENDER), "is already connected; nothing changed"),
        (("account", "reconnect", "nobody@acme.test"), "no sender account"),
        (("resubscribe", ACCEPTS), "is not unsubscribed; nothing changed"),
    ],
)
def test_controls_that_do_not_apply_are_refused(run, arguments, expected):
    before = json.dumps(run["reports"][ACCEPTS]["log"])
    result = run_cli(run["home"], *arguments)
    assert result.returncode == 1, result.stdout
    assert expected in flat(result.stderr)
    assert json.dumps(activity(run["home"], ACCEPTS)["log"]) == before
