"""Workers split by role (SEQUENCER_WORKER_ROLES): `python worker.py` processes against one
dev server, the workflows in one and the email and LinkedIn activities in another."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from sequencer.codec import generate_key_entry
from sequencer.config import load_settings
from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.models import TASK_QUEUE, WORKER_ROLES, channel_queue
from sequencer.service import Sequencer
from sequencer.smtp_sink import SmtpSink, read_mailbox
from sequencer.stack import LocalStack, StackPorts
from sequencer.temporal import lead_worker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.stack

GOOD = [f"lead{i}@example.com" for i in range(1, 7)]
# The sink rejects this address and the sandbox reports this profile deactivated.
BOUNCING = "bounce-ben@example.com"
CHANNEL_QUEUES = [channel_queue(TASK_QUEUE, "email"), channel_queue(TASK_QUEUE, "linkedin")]
# The queue of each channel activity. None means either channel's, chosen by the step it runs.
CHANNEL_ACTIVITIES = {
    "book_and_run_step": None,
    "send_email": CHANNEL_QUEUES[0],
    "linkedin_step": CHANNEL_QUEUES[1],
}


def profile(address: str) -> str:
    if address == BOUNCING:
        return "https://www.linkedin.com/in/ben-deactivated"
    return f"https://www.linkedin.com/in/{address.split('@')[0]}-example"


class Workers:
    """Worker processes that share one database and one payload key, each with its own home."""

    def __init__(self, tmp_path: Path, address: str, linkedin_url: str) -> None:
        self.tmp_path = tmp_path
        self.key = generate_key_entry()
        self.environment = {
            "TEMPORAL_ADDRESS": address,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'sequencer.db'}",
            "SEQUENCER_PAYLOAD_KEYS": self.key,
            "SEQUENCER_LINKEDIN_URL": linkedin_url,
            # The service starts leads that send from the channels' queues.
            "SEQUENCER_CHANNEL_QUEUES": "on",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, roles: str, **extra: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **self.environment,
            "SEQUENCER_HOME": str(self.tmp_path / name),
            "SEQUENCER_WORKER_ROLES": roles,
            **extra,
        }
        env.pop("SEQUENCER_PAYLOAD_KEYS_FILE", None)
        with self.log(name).open("w") as log:
            process = subprocess.Popen(
                [sys.executable, str(REPO / "worker.py")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes[name] = process
        return process

    def log(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def check_running(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, self.log(name).read_text()

    def stop(self) -> dict[str, int]:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        return {name: process.wait(60) for name, process in self.processes.items()}


async def pending_activities(client: Client, workflow_id: str) -> list[str]:
    description = await client.get_workflow_handle(workflow_id).describe()
    return [info.activity_type.name for info in description.raw_description.pending_activities]


async def test_workflows_and_channels_run_on_separate_workers(dev_server, tmp_path):
    client = dev_server.client
    sink = SmtpSink(tmp_path / "mailbox", port=0)
    sink.start()
    sandbox = LinkedInSandbox(port=0)
    sandbox.start()
    workers = Workers(tmp_path, client.service_client.config.target_host, sandbox.base_url)
    service = Sequencer(
        load_settings(
            {**workers.environment, "SEQUENCER_HOME": str(tmp_path / "service")},
        )
    )
    try:
        runner = workers.start("workflows", "workflows")
        campaign = tmp_path / "campaign.yaml"
        campaign.write_text(
            yaml.safe_dump(
                {
                    "name": "Split workers",
                    "sender": {"email": "rep@acme.test", "smtp_url": sink.smtp_url},
                    "steps": [
                        {"type": "linkedin_visit", "wait_after": "1s"},
                        {"type": "email", "subject": "Hi {{first_name}}", "body": "Hello"},
                    ],
                }
            )
        )
        leads = tmp_path / "leads.csv"
        leads.write_text(
            "email,first_name,linkedin_url\n"
            + "".join(f"{a},{a[:5].title()},{profile(a)}\n" for a in [*GOOD, BOUNCING])
        )
        report = await service.launch(campaign, leads)
        assert sorted(report.enrolled) == sorted([*GOOD, BOUNCING])
        ids = {row.lead_key: row.workflow_id for row in service.enrollments("split-workers")}

        # With no LinkedIn worker yet, every lead's first step waits on the LinkedIn queue:
        # the workflows' worker does not run it.
        for _ in range(120):
            waiting = [await pending_activities(client, i) for i in ids.values()]
            if all(names == ["book_and_run_step"] for names in waiting):
                break
            workers.check_running()
            await asyncio.sleep(0.5)
        assert all(names == ["book_and_run_step"] for names in waiting), waiting
        await asyncio.sleep(2)
        assert sandbox.actions == []

        channels = workers.start("channels", "email,linkedin", SEQUENCER_EMAIL_MAX_CONCURRENT="2")
        for _ in range(120):
            rows = service.enrollments("split-workers")
            if all(row.status in ("completed", "stopped") for row in rows):
                break
            workers.check_running()
            await asyncio.sleep(0.5)
        statuses = {row.lead_key: row.status for row in service.enrollments("split-workers")}
        histories = {
            lead: await client.get_workflow_handle(i).fetch_history() for lead, i in ids.items()
        }
        sends = service.sends()
    finally:
        codes = workers.stop()
        service.close()
        sandbox.stop()
        sink.stop()
    assert codes == {"workflows": 0, "channels": 0}, codes
    assert "on task queues sequencer, sequencer-accounts\n" in workers.log("workflows").read_text()
    channels_log = workers.log("channels").read_text()
    assert "on task queues sequencer-email, sequencer-linkedin\n" in channels_log
    assert "Limits of email steps: 2 at once, no rate limit\n" in channels_log
    assert "Limits of linkedin steps: 100 at once, no rate limit\n" in channels_log

    assert statuses == {**dict.fromkeys(GOOD, "completed"), BOUNCING: "stopped"}
    # Nothing was done twice: one visit per profile, one message per address, one send each.
    visits = Counter(action["profile_url"] for action in sandbox.actions)
    assert visits == Counter(profile(a) for a in GOOD)
    mailbox = read_mailbox(tmp_path / "mailbox")
    assert sorted(m["Delivered-To"] for m in mailbox) == sorted(GOOD)
    assert len({m["Message-ID"] for m in mailbox}) == len(GOOD)
    assert Counter((s["lead"], s["step"], s["state"]) for s in sends) == Counter(
        {(a, 2, "sent"): 1 for a in GOOD}
    )

    # The split: workflow tasks ran on the workflows' worker, channel activities on the
    # channels' worker, each on its channel's queue, and the database writes on the first.
    workflows_identity = f"{runner.pid}@"
    channels_identity = f"{channels.pid}@"
    for lead, history in histories.items():
        scheduled = {}
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                identity = event.workflow_task_started_event_attributes.identity
                assert identity.startswith(workflows_identity), (lead, identity)
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                attributes = event.activity_task_scheduled_event_attributes
                scheduled[event.event_id] = (
                    attributes.activity_type.name,
                    attributes.task_queue.name,
                )
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                attributes = event.activity_task_started_event_attributes
                name, queue = scheduled[attributes.scheduled_event_id]
                if name in CHANNEL_ACTIVITIES:
                    expected = CHANNEL_ACTIVITIES[name]
                    assert queue in ([expected] if expected else CHANNEL_QUEUES), (lead, queue)
                    assert attributes.identity.startswith(channels_identity), (lead, name)
                else:
                    assert queue == TASK_QUEUE, (lead, name, queue)
                    assert attributes.identity.startswith(workflows_identity), (lead, name)
        names = Counter(name for name, _ in scheduled.values())
        assert names["book_and_run_step"] >= 1, (lead, names)


async def test_unknown_role_is_rejected(dev_server):
    with pytest.raises(ValueError, match=r"unknown worker roles \['sms'\]: use one or more of"):
        lead_worker(dev_server.client, "roles", [], roles=["workflows", "sms"])
    with pytest.raises(ValueError, match="no worker role given"):
        lead_worker(dev_server.client, "roles", [], roles=[])


async def test_channel_options_go_to_their_channel_only(dev_server):
    worker = lead_worker(
        dev_server.client,
        "limits",
        [],
        roles=["workflows", "email"],
        channel_options={
            "email": {"max_concurrent_activities": 3, "max_task_queue_activities_per_second": 2.0},
            "linkedin": {"max_concurrent_activities": 1},
        },
        max_cached_workflows=7,
    )
    configs = {w.config()["task_queue"]: w.config() for w in worker.workers}

    assert sorted(configs) == ["limits", "limits-accounts", "limits-email"]
    assert configs["limits-email"]["max_concurrent_activities"] == 3
    assert configs["limits-email"]["max_task_queue_activities_per_second"] == 2.0
    assert configs["limits"]["max_task_queue_activities_per_second"] is None
    assert configs["limits"]["max_cached_workflows"] == 7
    assert configs["limits-email"]["workflows"] == []


def test_local_stack_runs_every_role(tmp_path):
    # A role left in the shell from a trial of split workers must not stop the local stack.
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_WORKER_ROLES": "email"})

    stack = LocalStack(settings, StackPorts.free())

    assert settings.worker_roles == ("email",)
    assert stack.settings.worker_roles == WORKER_ROLES
