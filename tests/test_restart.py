"""Killing `sequencer up` while leads sleep, then starting it again on the same data.

The `restarted` fixture launches ten leads on a two-email campaign and waits until every
first email is sent. During the wait before the second email, it kills the stack's process
group with SIGKILL and starts `sequencer up` again with the same ports and SEQUENCER_HOME.
The tests check that every lead completes and that the SMTP server received each step once.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from sequencer.stack import StackPorts
from tests.test_stack_e2e import (
    StackProcess,
    cli_json,
    port_accepts,
    read_messages,
    wait_until,
)

pytestmark = pytest.mark.stack

CAMPAIGN_ID = "restart-test"
LEAD_COUNT = 10
# Seconds between the two emails, which is when the stack is killed and restarted.
WAIT_SECONDS = 20
LEADS = [f"lead{number:02d}@example.test" for number in range(LEAD_COUNT)]
FIRST_SUBJECT = "First note for {name}"
SECOND_SUBJECT = "Second note for {name}"


def campaign_yaml(smtp_port: int) -> str:
    return f"""name: Restart test
sender: {{email: rep@acme.test, smtp_url: "smtp://127.0.0.1:{smtp_port}"}}
steps:
  - type: email
    wait_after: {WAIT_SECONDS}s
    subject: "First note for {{{{first_name}}}}"
    body: "Hi {{{{first_name}}}}, this is the first note."
  - type: email
    subject: "Second note for {{{{first_name}}}}"
    body: "Hi {{{{first_name}}}}, this is the second note."
"""


def first_name(lead: str) -> str:
    return lead.partition("@")[0].capitalize()


def leads_csv() -> str:
    rows = [f"{first_name(lead)},{lead}" for lead in LEADS]
    return "first_name,email\n" + "\n".join(rows) + "\n"


def process_alive(pid: int) -> bool:
    """Return whether `pid` runs. A zombie counts as gone, because it has closed its ports."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def open_ports(ports: StackPorts) -> list[int]:
    return [
        port
        for port in (ports.temporal, ports.ui, ports.smtp, ports.linkedin, ports.webhooks)
        if port_accepts(port)
    ]


@dataclass
class Restart:
    home: Path
    ports: StackPorts
    killed: StackProcess
    restarted: StackProcess
    messages_before_kill: int


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("restart")
    ports = StackPorts.free()
    first = StackProcess(home, ports)
    second: StackProcess | None = None
    try:
        first.wait_ready()
        (home / "campaign.yaml").write_text(campaign_yaml(ports.smtp))
        (home / "leads.csv").write_text(leads_csv())
        launch = cli_json(home, "launch", "campaign.yaml", "--leads", "leads.csv")
        assert sorted(launch["enrolled"]) == LEADS, launch

        # Wait until every first email reached the SMTP server and the lead recorded it as
        # sent. A kill between those two moments would lose the send activity's result, and
        # Temporal would retry the send by design, which is another case than this one.
        step_one: dict[str, int] = {}

        def every_first_email_sent() -> bool:
            first.check_running()
            step_one.update(cli_json(home, "stats", CAMPAIGN_ID)["steps"][0])
            return len(read_messages(home)) >= LEAD_COUNT and step_one["sent"] == LEAD_COUNT

        wait_until(
            every_first_email_sent,
            lambda: f"{len(read_messages(home))} messages, step 1 counts {step_one}",
            "every lead's first email is sent",
        )
        messages_before_kill = len(read_messages(home))

        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=60)
        wait_until(
            lambda: (
                not any(process_alive(pid) for pid in first.server_pids) and not open_ports(ports)
            ),
            lambda: (
                f"servers alive {[p for p in first.server_pids if process_alive(p)]}, "
                f"open ports {open_ports(ports)}"
            ),
            "the killed stack's Temporal server is gone and its ports are closed",
        )

        second = StackProcess(home, ports)
        second.wait_ready()
        leads: dict[str, int] = {}

        def every_lead_completed() -> bool:
            second.check_running()
            leads.update(cli_json(home, "stats", CAMPAIGN_ID)["leads"])
            return leads["completed"] == LEAD_COUNT

        wait_until(every_lead_completed, lambda: str(leads), "every lead completed", timeout=120)
        yield Restart(home, ports, first, second, messages_before_kill)
    finally:
        if second is not None:
            second.stop()
        first.stop()


def test_kill_came_while_leads_slept(restarted: Restart):
    assert restarted.messages_before_kill == LEAD_COUNT


def test_restart_sends_each_step_once(restarted: Restart):
    messages = [message for _, message in read_messages(restarted.home)]
    by_message_id = Counter(str(message["Message-ID"]) for message in messages)
    by_lead_and_subject = Counter(
        (message["Delivered-To"], message["Subject"]) for message in messages
    )

    assert len(messages) == 2 * LEAD_COUNT
    for message_id, count in by_message_id.items():
        assert count == 1, f"{message_id} was received {count} times"
    for lead in LEADS:
        name = first_name(lead)
        assert by_lead_and_subject[(lead, FIRST_SUBJECT.format(name=name))] == 1, lead
        assert by_lead_and_subject[(lead, SECOND_SUBJECT.format(name=name))] == 1, lead


def test_restart_completes_every_lead(restarted: Restart):
    statuses = {
        row["lead"]: row["status"] for row in cli_json(restarted.home, "leads", CAMPAIGN_ID)
    }
    steps = cli_json(restarted.home, "stats", CAMPAIGN_ID)["steps"]

    assert sorted(statuses) == LEADS
    for lead in LEADS:
        assert statuses[lead] == "completed", lead
    assert steps[0]["sent"] == LEAD_COUNT
    assert steps[1]["sent"] == LEAD_COUNT


def test_sigint_stops_stack_cleanly(restarted: Restart):
    process = restarted.restarted.process
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`sequencer up` still runs 30s after SIGINT: {restarted.restarted.describe()}")

    assert code == 0, restarted.restarted.log_tail()
    assert restarted.restarted.server_pids, "the Temporal server's process was not found"
    assert open_ports(restarted.ports) == []
    for pid in restarted.restarted.server_pids:
        assert not process_alive(pid), f"Temporal server {pid} still runs"
    assert not (restarted.home / "stack.json").exists()
