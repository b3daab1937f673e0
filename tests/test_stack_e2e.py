"""One campaign on a real `sequencer up`, driven only through the command line.

A single local stack serves the module. The campaign mixes email, LinkedIn and a call, and
its four leads cover a normal run, a bounce at RCPT, a bounce reported after the send and a
deactivated LinkedIn profile. The `outcome` fixture plays the mail system and the sales rep
through `sequencer event` and `sequencer task` until every lead has ended. The tests then
compare what the commands report with what the SMTP server stored.
"""

from __future__ import annotations

import email.policy
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from sequencer.stack import StackPorts

pytestmark = pytest.mark.stack

CAMPAIGN_ID = "stack-e2e"

# Waits after steps 1, 2 and 3, in seconds. Step 1 waits longest because the test has to see
# the late-bounce lead's first email as sent and report its bounce before step 2 falls due,
# and each `sequencer` command takes about a second to start.
FIRST_WAIT = 12
SECOND_WAIT = 6
THIRD_WAIT = 2

NORMAL = "ann@northwind.example"
RCPT_BOUNCE = "bounce-chloe@fabrikam.example"
# The SMTP server accepts this address, and the test reports its bounce with `sequencer event`,
# as an operator would without a mailbox. (A `late-bounce` address would also get a bounce in
# the sender's IMAP mailbox, which the stack's poller applies by itself.)
LATE_BOUNCE = "dan@tailspin.example"
DEACTIVATED = "ben@contoso.example"
LEADS = (NORMAL, RCPT_BOUNCE, LATE_BOUNCE, DEACTIVATED)

LEADS_CSV = f"""first_name,email,company,linkedin_url,phone
Ann,{NORMAL},Northwind,https://www.linkedin.com/in/ann-archer,+33612345678
Chloe,{RCPT_BOUNCE},Fabrikam,https://www.linkedin.com/in/chloe-carter,+447911123456
Dan,{LATE_BOUNCE},Tailspin,https://www.linkedin.com/in/dan-dunn,+12025550143
Ben,{DEACTIVATED},Contoso,https://www.linkedin.com/in/ben-baker-deactivated,+4930123456
"""

FINAL_STATUSES = {"completed", "stopped", "replied", "removed"}
STEP_COUNTS = ("sent", "failed", "bounced", "skipped", "waiting")
# Settings that would override the addresses `sequencer up` writes to stack.json.
OVERRIDING_VARIABLES = (
    "TEMPORAL_ADDRESS",
    "TEMPORAL_NAMESPACE",
    "DATABASE_URL",
    "SEQUENCER_LINKEDIN_URL",
    "SEQUENCER_LINKEDIN_API_KEY",
    "SEQUENCER_SMTP_USERNAME",
    "SEQUENCER_SMTP_PASSWORD",
)
DATABASE_TABLES = ("campaigns", "enrollments", "activity", "tasks", "suppressions")


def campaign_yaml(smtp_port: int) -> str:
    return f"""name: Stack e2e
sender: {{email: rep@acme.test, name: Rita Rep, smtp_url: "smtp://127.0.0.1:{smtp_port}"}}
steps:
  - type: email
    wait_after: {FIRST_WAIT}s
    subject: "Hello {{{{first_name}}}}"
    body: "Hi {{{{first_name}}}}, a short note about {{{{company|your team}}}}."
  - type: email
    wait_after: {SECOND_WAIT}s
    subject: "Re: Hello {{{{first_name}}}}"
    body: "Following up on my note, {{{{first_name}}}}."
  - type: linkedin_visit
    wait_after: {THIRD_WAIT}s
  - type: call
    instructions: "Call {{{{first_name}}}} at {{{{company}}}}"
"""


# Commands and waiting


def cli_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in OVERRIDING_VARIABLES}
    env["SEQUENCER_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(home: Path, *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sequencer.cli", *arguments]
    try:
        return subprocess.run(
            command,
            cwd=home,
            env=cli_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"`sequencer {' '.join(arguments)}` timed out after {timeout:.0f}s: {error}")


def cli_json(home: Path, *arguments: str) -> Any:
    result = run_cli(home, *arguments, "--json")
    assert result.returncode == 0, (
        f"`sequencer {' '.join(arguments)} --json` exited with {result.returncode}: {result.stderr}"
    )
    return json.loads(result.stdout)


def flat(text: str) -> str:
    """Join the lines that rich wraps at the terminal width, so a message reads as one line."""
    return " ".join(text.split())


def wait_until(
    condition: Callable[[], bool], describe: Callable[[], str], what: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting until {what}; now: {describe()}")
        time.sleep(0.5)


def port_accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def child_pids(pid: int) -> list[int]:
    """Return the ids of the processes whose parent is `pid`, from /proc (Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def process_command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class StackProcess:
    """`sequencer up` in its own process group, with its output in up.log under home."""

    def __init__(self, home: Path, ports: StackPorts) -> None:
        self.home = home
        self.ports = ports
        self.log_path = home / "up.log"
        self.server_pids: list[int] = []
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sequencer.cli",
                    "up",
                    "--temporal-port",
                    str(ports.temporal),
                    "--ui-port",
                    str(ports.ui),
                    "--smtp-port",
                    str(ports.smtp),
                    "--linkedin-port",
                    str(ports.linkedin),
                    "--webhook-port",
                    str(ports.webhooks),
                    "--imap-port",
                    str(ports.imap),
                ],
                cwd=home,
                env=cli_env(home),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        stack_file = self.home / "stack.json"
        stack = stack_file.read_text() if stack_file.exists() else "(no stack.json)"
        return (
            f"`sequencer up` exit code {self.process.poll()}, stack.json {stack}, "
            f"Temporal port open {port_accepts(self.ports.temporal)}\n"
            f"up.log:\n{self.log_tail()}"
        )

    def check_running(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"`sequencer up` exited early: {self.describe()}")

    def is_ready(self) -> bool:
        self.check_running()
        try:
            stack = json.loads((self.home / "stack.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return stack.get("pid") == self.process.pid and port_accepts(self.ports.temporal)

    def wait_ready(self) -> None:
        wait_until(self.is_ready, self.describe, "`sequencer up` is ready", timeout=90)
        # Remember the Temporal server while its parent lives, to clean up after a failure.
        self.server_pids = [
            pid
            for pid in child_pids(self.process.pid)
            if str(self.home) in process_command_line(pid)
        ]

    def stop(self, timeout: float = 60) -> None:
        """Stop the stack with SIGINT, or SIGKILL after `timeout`, and any server it left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in self.server_pids:
            if str(self.home) in process_command_line(pid):
                os.kill(pid, signal.SIGKILL)


# What the stack stored


def read_messages(home: Path) -> list[tuple[str, EmailMessage]]:
    """Return the raw text and the parsed message of each .eml in the mailbox, oldest first."""
    parser = BytesParser(policy=email.policy.default)
    messages = []
    for path in sorted((home / "mailbox").glob("*.eml")):
        if path.name.startswith("."):
            continue
        raw = path.read_bytes()
        messages.append((raw.decode("utf-8", errors="replace"), parser.parsebytes(raw)))
    return messages


def messages_to(home: Path, address: str) -> list[EmailMessage]:
    return [message for _, message in read_messages(home) if message["Delivered-To"] == address]


def database_snapshot(home: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Return every row of the Sequencer database, plus the mailbox's file names."""
    connection = sqlite3.connect(f"file:{home / 'sequencer.db'}?mode=ro", uri=True)
    try:
        snapshot = {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in DATABASE_TABLES
        }
    finally:
        connection.close()
    snapshot["mailbox"] = sorted(path.name for path in (home / "mailbox").glob("*.eml"))
    return snapshot


def suppressed_addresses(home: Path) -> set[str]:
    return {row[0] for row in database_snapshot(home)["suppressions"]}


def activity(home: Path, lead: str) -> dict[str, Any]:
    return cli_json(home, "activity", CAMPAIGN_ID, lead)


def steps_of(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {step["step"]: step for step in report["steps"]}


def at(step: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(step["at"])


def expected_stats(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Count leads, steps and channels from `sequencer activity` reports, as stats counts them."""
    steps: dict[int, Counter[str]] = {}
    channels: dict[str, Counter[str]] = {}
    leads: Counter[str] = Counter()
    for report in reports:
        leads[report["status"]] += 1
        for step in report["steps"]:
            steps.setdefault(step["step"], Counter())[step["status"]] += 1
            channels.setdefault(step["channel"], Counter())[step["status"]] += 1
    return {
        "leads": dict(leads),
        "unsubscribed": sum(report["unsubscribed"] for report in reports),
        "steps": {number: count_fields(counts) for number, counts in steps.items()},
        "channels": {name: count_fields(counts) for name, counts in channels.items()},
    }


def count_fields(counts: Counter[str]) -> dict[str, Any]:
    values: dict[str, Any] = {name: counts[name] for name in STEP_COUNTS}
    executed = counts["sent"] + counts["failed"] + counts["bounced"]
    failures = counts["failed"] + counts["bounced"]
    values["failure_rate"] = failures / executed if executed else None
    return values


def stats_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """Reshape `sequencer stats --json` like expected_stats, keeping only non-zero lead counts."""
    return {
        "leads": {status: count for status, count in stats["leads"].items() if count},
        "unsubscribed": stats["unsubscribed"],
        "steps": {
            step["step"]: {name: step[name] for name in (*STEP_COUNTS, "failure_rate")}
            for step in stats["steps"]
        },
        "channels": stats["channels"],
    }


# The module's stack and campaign run


@dataclass
class Outcome:
    home: Path
    launch: dict[str, Any]
    late_bounce: subprocess.CompletedProcess[str]
    task_results: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("stack-e2e")
    process = StackProcess(home, StackPorts.free())
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def outcome(stack: StackProcess) -> Outcome:
    """Launch the campaign, report the late bounce, complete every call, wait for the end."""
    home = stack.home
    (home / "campaign.yaml").write_text(campaign_yaml(stack.ports.smtp))
    (home / "leads.csv").write_text(LEADS_CSV)
    launch = cli_json(home, "launch", "campaign.yaml", "--leads", "leads.csv")

    # Play the mail system, which accepted step 1 for the late-bounce lead and bounces it later.
    late_state: dict[str, Any] = {}

    def late_step_one_sent() -> bool:
        stack.check_running()
        late_state.update(activity(home, LATE_BOUNCE))
        return steps_of(late_state)[1]["status"] == "sent"

    wait_until(
        late_step_one_sent,
        lambda: json.dumps(late_state.get("steps")),
        f"step 1 of {LATE_BOUNCE} is sent",
    )
    late_bounce = run_cli(home, "event", "bounce", CAMPAIGN_ID, LATE_BOUNCE, "--step", "1")
    result = Outcome(home=home, launch=launch, late_bounce=late_bounce)

    # Play the sales rep, who closes each call task as it appears, until every lead has ended.
    statuses: dict[str, str] = {}

    def every_lead_ended() -> bool:
        stack.check_running()
        for task in cli_json(home, "task", "list", "--campaign", CAMPAIGN_ID):
            result.task_results.append(run_cli(home, "task", "done", str(task["id"])))
        statuses.update(
            {row["lead"]: row["status"] for row in cli_json(home, "leads", CAMPAIGN_ID)}
        )
        return set(statuses.values()) <= FINAL_STATUSES

    wait_until(every_lead_ended, lambda: str(statuses), "every lead has ended", timeout=120)

    result.reports = {lead: activity(home, lead) for lead in LEADS}
    result.stats = cli_json(home, "stats", CAMPAIGN_ID)
    result.tasks = cli_json(home, "task", "list", "--all", "--campaign", CAMPAIGN_ID)
    return result


# Launch and the end of the run


def test_launch_enrolls_every_lead(outcome: Outcome):
    assert sorted(outcome.launch["enrolled"]) == sorted(LEADS)
    assert outcome.launch["rejected"] == []
    assert outcome.launch["campaign_id"] == CAMPAIGN_ID


@pytest.mark.parametrize("lead", LEADS)
def test_every_lead_completes(outcome: Outcome, lead: str):
    assert outcome.reports[lead]["status"] == "completed", json.dumps(outcome.reports[lead])


def test_every_call_task_done(outcome: Outcome):
    assert sorted(task["lead_key"] for task in outcome.tasks) == sorted(LEADS)
    for task in outcome.tasks:
        assert task["status"] == "done", task
        assert task["step"] == 4, task
    for done in outcome.task_results:
        assert done.returncode == 0, done.stderr
        assert "done" in done.stdout, done.stdout


# The bounce at RCPT time


def test_rcpt_bounce_skips_other_emails(outcome: Outcome):
    report = outcome.reports[RCPT_BOUNCE]
    steps = steps_of(report)
    assert steps[1]["status"] == "bounced"
    assert steps[1]["detail"].startswith("550 5.1.1"), steps[1]
    assert RCPT_BOUNCE in steps[1]["detail"], steps[1]
    assert steps[2]["status"] == "skipped"
    assert steps[2]["reason"] == "step 1 bounced"
    assert steps[3]["status"] == "sent"
    assert report["unsubscribed"] is True
    assert RCPT_BOUNCE in suppressed_addresses(outcome.home)


def test_rcpt_bounce_runs_linkedin_at_once(outcome: Outcome):
    # Had the waits of steps 1 and 2 been kept, step 3 would run FIRST_WAIT + SECOND_WAIT
    # seconds after the bounce. SECOND_WAIT is a generous bound for "at once".
    steps = steps_of(outcome.reports[RCPT_BOUNCE])
    delay = at(steps[3]) - at(steps[1])
    assert delay < timedelta(seconds=SECOND_WAIT), f"step 3 ran {delay} after the bounce"


def test_rcpt_bounce_reaches_no_mailbox(outcome: Outcome):
    assert messages_to(outcome.home, RCPT_BOUNCE) == []


# The bounce reported after the send


def test_late_bounce_report_accepted(outcome: Outcome):
    assert outcome.late_bounce.returncode == 0, outcome.late_bounce.stderr
    assert "bounced" in flat(outcome.late_bounce.stdout)


def test_late_bounce_skips_second_email(outcome: Outcome):
    report = outcome.reports[LATE_BOUNCE]
    steps = steps_of(report)
    assert steps[1]["status"] == "bounced"
    assert steps[2]["status"] == "skipped"
    assert steps[2]["reason"] == "step 1 bounced"
    assert steps[3]["status"] == "sent"
    assert report["unsubscribed"] is True
    assert LATE_BOUNCE in suppressed_addresses(outcome.home)


def test_late_bounce_runs_linkedin_at_once(outcome: Outcome):
    # Had the remaining wait been kept, step 3 would run at least SECOND_WAIT seconds after
    # the bounce was applied.
    steps = steps_of(outcome.reports[LATE_BOUNCE])
    delay = at(steps[3]) - at(steps[1])
    assert delay < timedelta(seconds=SECOND_WAIT), f"step 3 ran {delay} after the bounce"


def test_late_bounce_lead_got_first_email_only(outcome: Outcome):
    subjects = [message["Subject"] for message in messages_to(outcome.home, LATE_BOUNCE)]
    assert subjects == ["Hello Dan"]


def test_repeated_late_bounce_changes_nothing(outcome: Outcome):
    before = database_snapshot(outcome.home)
    result = run_cli(outcome.home, "event", "bounce", CAMPAIGN_ID, LATE_BOUNCE, "--step", "1")
    after = database_snapshot(outcome.home)

    assert result.returncode == 0, result.stderr
    assert "already" in flat(result.stdout)
    assert after == before
    log = activity(outcome.home, LATE_BOUNCE)["log"]
    bounces = [
        e for e in log if e["kind"] == "step" and e["step"] == 1 and e["status"] == "bounced"
    ]
    assert len(bounces) == 1, log


# The deactivated LinkedIn profile


def test_deactivated_profile_fails_linkedin_step(outcome: Outcome):
    steps = steps_of(outcome.reports[DEACTIVATED])
    assert steps[1]["status"] == "sent"
    assert steps[2]["status"] == "sent"
    assert steps[3]["status"] == "failed"
    assert steps[3]["reason"] == "profile_deactivated"
    assert steps[4]["status"] == "sent"


# What the SMTP server received


def test_normal_lead_gets_threaded_emails(outcome: Outcome):
    messages = {message["Subject"]: message for message in messages_to(outcome.home, NORMAL)}
    assert sorted(messages) == ["Hello Ann", "Re: Hello Ann"]
    first, second = messages["Hello Ann"], messages["Re: Hello Ann"]
    assert first["Message-ID"]
    assert first["In-Reply-To"] is None
    assert second["In-Reply-To"] == first["Message-ID"]
    assert second["References"] == first["Message-ID"]
    assert second["Message-ID"] != first["Message-ID"]
    assert first.get_content().strip() == "Hi Ann, a short note about Northwind."


def test_no_message_has_placeholder(outcome: Outcome):
    messages = read_messages(outcome.home)
    assert len(messages) == 5, [message["Delivered-To"] for _, message in messages]
    for raw, message in messages:
        assert "{{" not in raw, raw
        assert "{{" not in message.get_content(), raw


# Stats against activity


def test_stats_match_activity(outcome: Outcome):
    expected = expected_stats(list(outcome.reports.values()))
    reported = stats_fields(outcome.stats)
    assert reported["leads"] == expected["leads"]
    assert reported["unsubscribed"] == expected["unsubscribed"]
    for number, counts in expected["steps"].items():
        assert reported["steps"][number] == counts, f"step {number}"
    assert sorted(reported["steps"]) == sorted(expected["steps"])
    for name, counts in expected["channels"].items():
        assert reported["channels"][name] == counts, f"channel {name}"
    assert sorted(reported["channels"]) == sorted(expected["channels"])


# Bad input


BAD_INPUTS = [
    pytest.param(
        ("event", "bounce", CAMPAIGN_ID, "nobody@example.test", "--step", "1"),
        "nobody@example.test",
        id="unknown-lead",
    ),
    pytest.param(
        ("event", "bounce", CAMPAIGN_ID, NORMAL, "--step", "5"), "step 5", id="step-out-of-range"
    ),
    pytest.param(("event", "bounce", CAMPAIGN_ID, NORMAL, "--step", "0"), "step 0", id="step-zero"),
    pytest.param(
        ("event", "bounce", CAMPAIGN_ID, NORMAL, "--step", "3"),
        "step 3 is a linkedin_visit step",
        id="linkedin-step",
    ),
    pytest.param(
        ("event", "bounce", CAMPAIGN_ID, RCPT_BOUNCE, "--step", "2"),
        "step 2",
        id="skipped-step",
    ),
    pytest.param(
        ("event", "bounce", CAMPAIGN_ID, NORMAL, "--step", "one"), "--step", id="step-not-a-number"
    ),
    pytest.param(
        ("event", "bounce", "no-such-campaign", NORMAL, "--step", "1"),
        "no-such-campaign",
        id="bounce-unknown-campaign",
    ),
    pytest.param(
        ("activity", "no-such-campaign", NORMAL), "no-such-campaign", id="activity-unknown-campaign"
    ),
]


@pytest.mark.parametrize(("arguments", "named"), BAD_INPUTS)
def test_bad_input_is_rejected(outcome: Outcome, arguments: tuple[str, ...], named: str):
    before = database_snapshot(outcome.home)
    result = run_cli(outcome.home, *arguments)
    after = database_snapshot(outcome.home)

    assert result.returncode != 0, result.stdout
    assert named in flat(result.stderr), result.stderr
    assert after == before


# A bounce after the enrollment ended. These tests change the normal lead, so they run last.


def test_bounce_after_completion_keeps_status(outcome: Outcome):
    result = run_cli(outcome.home, "event", "bounce", CAMPAIGN_ID, NORMAL, "--step", "1")
    report = activity(outcome.home, NORMAL)
    steps = steps_of(report)

    assert result.returncode == 0, result.stderr
    assert "completed" in flat(result.stdout)
    assert report["status"] == "completed"
    assert steps[1]["status"] == "bounced"
    assert steps[2]["status"] == "sent"
    assert report["unsubscribed"] is True
    assert NORMAL in suppressed_addresses(outcome.home)


def test_stats_match_after_late_bounce(outcome: Outcome):
    reports = [activity(outcome.home, lead) for lead in LEADS]
    expected = expected_stats(reports)
    reported = stats_fields(cli_json(outcome.home, "stats", CAMPAIGN_ID))
    assert reported["steps"][1]["bounced"] == 3
    assert reported["leads"] == expected["leads"]
    assert reported["unsubscribed"] == expected["unsubscribed"]
    assert reported["steps"] == expected["steps"]
    assert reported["channels"] == expected["channels"]
