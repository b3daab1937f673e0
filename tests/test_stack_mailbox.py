"""Bounces and replies found in the sender's mailbox, on a real `sequencer up`.

Nothing is typed by hand after `sequencer launch`, except one signed Mailgun event posted to
the stack's webhook receiver, as the provider would. The stack's SMTP server accepts every email.
Then it puts into the sender's IMAP mailbox (Dovecot) what a remote system would send back:
a DSN for the `late-bounce` lead, a mailbox-full DSN for the `soft-bounce` lead, an
out-of-office reply for the `ooo` lead and a reply for the `reply` lead. The worker's mailbox
poller reads them, and the leads change by themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from sequencer.imap_server import find_dovecot
from sequencer.stack import StackPorts
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

if find_dovecot() is None:
    if os.environ.get("SEQUENCER_REQUIRE_DOVECOT") == "1":
        pytest.fail(
            "dovecot not found, but SEQUENCER_REQUIRE_DOVECOT=1: install dovecot-imapd",
            pytrace=False,
        )
    pytest.skip("dovecot not found: install Debian's dovecot-imapd", allow_module_level=True)

CAMPAIGN_ID = "mailbox-e2e"
SENDER = "rita@acme.test"
HARD = "late-bounce-dan@tailspin.example"
SOFT = "soft-bounce-gus@litware.example"
AWAY = "ooo-fay@woodgrove.example"
REPLIES = "reply-eve@contoso.example"
# The SMTP server accepts this address; the Mailgun webhook reports its bounce.
PROVIDER_BOUNCE = "kim@fabrikam.example"
LEADS = (HARD, SOFT, AWAY, REPLIES, PROVIDER_BOUNCE)
MAILGUN_KEY = "mailgun-test-signing-key"
# Long enough that a step run before it ends was moved by a bounce.
FIRST_WAIT = timedelta(minutes=10)


def campaign_yaml(smtp_port: int) -> str:
    return f"""
name: Mailbox e2e
id: {CAMPAIGN_ID}
sender: {{email: {SENDER}, smtp_url: "smtp://127.0.0.1:{smtp_port}"}}
steps:
  - type: email
    subject: "Hello {{{{first_name}}}}"
    body: "A short note."
    wait_after: 10m
  - type: email
    subject: "Re: Hello {{{{first_name}}}}"
    body: "Following up."
    wait_after: 1m
  - type: call
    instructions: "Call {{{{first_name}}}}"
"""


LEADS_CSV = "first_name,email,phone\n" + "".join(
    f"{name},{address},+3361234567{number}\n"
    for number, (name, address) in enumerate(
        zip(("Dan", "Gus", "Fay", "Eve", "Kim"), LEADS, strict=True)
    )
)


def activity(home, lead: str) -> dict[str, Any]:
    return cli_json(home, "activity", CAMPAIGN_ID, lead)


def events(report: dict[str, Any], status: str) -> list[dict[str, Any]]:
    return [e for e in report["log"] if e["kind"] == "event" and e["status"] == status]


def mailgun_event(recipient: str, message_id: str) -> dict[str, Any]:
    timestamp = str(int(time.time()))
    token = uuid.uuid4().hex
    signature = hmac.new(
        MAILGUN_KEY.encode(), f"{timestamp}{token}".encode(), hashlib.sha256
    ).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": {
            "id": f"mailgun-{token[:12]}",
            "event": "failed",
            "severity": "permanent",
            "reason": "bounce",
            "recipient": recipient,
            "delivery-status": {
                "code": 550,
                "enhanced-code": "5.1.1",
                "message": "5.1.1 The email account that you tried to reach does not exist.",
            },
            "message": {"headers": {"message-id": message_id.strip("<>")}},
        },
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("stack-mailbox")
    # The stack process inherits the environment when it starts.
    os.environ["SEQUENCER_MAILGUN_SIGNING_KEY"] = MAILGUN_KEY
    try:
        stack = StackProcess(home, StackPorts.free())
    finally:
        del os.environ["SEQUENCER_MAILGUN_SIGNING_KEY"]
    try:
        stack.wait_ready()
        (home / "campaign.yaml").write_text(campaign_yaml(stack.ports.smtp))
        (home / "leads.csv").write_text(LEADS_CSV)
        launch = cli_json(home, "launch", "campaign.yaml", "--leads", "leads.csv")
        reports: dict[str, dict[str, Any]] = {}

        wait_until(
            lambda: bool(messages_to(home, PROVIDER_BOUNCE)),
            stack.describe,
            f"the first email to {PROVIDER_BOUNCE} is sent",
        )
        sent = messages_to(home, PROVIDER_BOUNCE)[0]
        event = mailgun_event(PROVIDER_BOUNCE, sent["Message-ID"])
        url = f"http://127.0.0.1:{stack.ports.webhooks}/webhooks/mailgun"
        webhook = httpx.post(url, json=event, timeout=30)

        def mailbox_applied() -> bool:
            stack.check_running()
            reports.update({lead: activity(home, lead) for lead in LEADS})
            return (
                reports[REPLIES]["status"] == "replied"
                and steps_of(reports[HARD])[3]["status"] == "waiting"
                and bool(events(reports[AWAY], "postponed"))
                and bool(events(reports[SOFT], "soft_bounce"))
                and steps_of(reports[PROVIDER_BOUNCE])[3]["status"] == "waiting"
            )

        wait_until(
            mailbox_applied,
            lambda: f"{reports}\n{stack.describe()}",
            "the poller applies every message",
            timeout=90,
        )
        replayed = httpx.post(url, json=event, timeout=30)
        mailboxes = cli_json(home, "mailbox", "list")
        poll = run_cli(home, "mailbox", "poll", SENDER)
        stop = run_cli(home, "mailbox", "stop", SENDER)
        wait_until(
            lambda: cli_json(home, "mailbox", "list") == [],
            stack.describe,
            "the mailbox poller stops",
        )
        stop_again = run_cli(home, "mailbox", "stop", SENDER)
        return {
            "home": home,
            "launch": launch,
            "webhook": webhook,
            "replayed": replayed,
            "after_replay": activity(home, PROVIDER_BOUNCE),
            "reports": reports,
            "mailboxes": mailboxes,
            "poll": poll,
            "stop": stop,
            "stop_again": stop_again,
            "tasks": cli_json(home, "task", "list", "--campaign", CAMPAIGN_ID),
        }
    finally:
        stack.stop()


def test_launch_starts_mailbox_poller(run):
    assert run["launch"]["mailbox_workflow"] == f"mailbox-{SENDER}"
    assert run["launch"]["mailbox_problem"] is None


def test_hard_bounce_skips_second_email(run):
    steps = steps_of(run["reports"][HARD])
    assert steps[1]["status"] == "bounced"
    assert "5.1.1" in steps[1]["detail"]
    assert steps[2]["status"] == "skipped"


def test_hard_bounce_runs_call_at_once(run):
    steps = steps_of(run["reports"][HARD])
    delay = datetime.fromisoformat(steps[3]["at"]) - datetime.fromisoformat(steps[1]["at"])
    assert delay < FIRST_WAIT, f"the call ran {delay} after the email"
    assert sorted(task["lead_key"] for task in run["tasks"]) == sorted([HARD, PROVIDER_BOUNCE])


def test_hard_bounce_unsubscribes(run):
    assert run["reports"][HARD]["unsubscribed"] is True


def test_hard_bounce_lead_got_one_email(run):
    assert len(messages_to(run["home"], HARD)) == 1


def test_reply_stops_sequence(run):
    report = run["reports"][REPLIES]
    assert report["status"] == "replied"
    assert [step["status"] for step in report["steps"]] == ["sent", "skipped", "skipped"]


def test_out_of_office_postpones_step(run):
    report = run["reports"][AWAY]
    postponed = events(report, "postponed")
    assert postponed[0]["step"] == 2
    assert postponed[0]["reason"] == "out of office"
    assert steps_of(report)[2]["status"] == "pending"
    assert report["unsubscribed"] is False


def test_soft_bounce_recorded_only(run):
    report = run["reports"][SOFT]
    assert events(report, "soft_bounce")[0]["reason"] == "mailbox-full"
    assert steps_of(report)[1]["status"] == "sent"
    assert report["unsubscribed"] is False


def test_mailbox_list_counts_messages(run):
    [mailbox] = run["mailboxes"]
    assert mailbox["address"] == SENDER
    # One message for each lead but the one whose bounce came through the webhook.
    assert mailbox["totals"]["messages"] == len(LEADS) - 1
    assert mailbox["totals"]["failed"] == 0


def test_mailgun_webhook_accepted(run):
    assert run["webhook"].status_code == 200, run["webhook"].text


def test_mailgun_bounce_runs_call_at_once(run):
    steps = steps_of(run["reports"][PROVIDER_BOUNCE])
    assert steps[1]["status"] == "bounced"
    assert steps[2]["status"] == "skipped"
    delay = datetime.fromisoformat(steps[3]["at"]) - datetime.fromisoformat(steps[1]["at"])
    assert delay < FIRST_WAIT, f"the call ran {delay} after the email"


def test_mailgun_replay_changes_nothing(run):
    assert run["replayed"].status_code == 200, run["replayed"].text
    assert "applied before" in run["replayed"].text
    assert run["after_replay"]["log"] == run["reports"][PROVIDER_BOUNCE]["log"]


def test_mailbox_poll_command(run):
    assert run["poll"].returncode == 0, run["poll"].stderr
    assert flat(run["poll"].stdout) == f"{SENDER}: mailbox read now"


def test_mailbox_stop_command(run):
    assert run["stop"].returncode == 0, run["stop"].stderr
    assert "no longer read" in flat(run["stop"].stdout)


def test_mailbox_stop_unknown_rejected(run):
    assert run["stop_again"].returncode == 1
    assert f"mailbox poller of {SENDER} not found" in flat(run["stop_again"].stderr)
