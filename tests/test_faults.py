"""Faults injected into real processes: workers killed with SIGKILL in the middle of sends, two
workers sharing one Temporal dev server, and a database locked by another process.

The worker is `python worker.py` in its own process, the SMTP server an aiosmtpd server in this
process, and the database a SQLite file. Every message that reaches the SMTP server is counted
by its Message-ID, which is unique per campaign, lead and step.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiosmtpd.controller import Controller
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from sequencer.codec import generate_key_entry
from sequencer.config import load_settings
from sequencer.linkedin_sandbox import DEFAULT_API_KEY as SANDBOX_KEY
from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.models import TASK_QUEUE
from sequencer.service import Sequencer
from sequencer.stack import free_port
from sequencer.storage import Store
from sequencer.temporal import connect, find_binary, search_attribute_flags

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.stack

LEADS = 20
STEPS = 2
# How long the database stays locked: longer than the worker's SQLite busy timeout (10 s).
LOCK_SECONDS = 15
# Leads asleep while the Temporal server is stopped and started again, and their wait.
RESTART_LEADS = 200
RESTART_WAIT = "30s"


class CountingServer:
    """An SMTP server that keeps each accepted message's Message-ID, replies after `delay`
    seconds, and calls `on_message` with the number of messages received so far."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.message_ids: list[str] = []
        self.on_message: Any = None
        self._lock = threading.Lock()
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = BytesHeaderParser().parsebytes(envelope.original_content or envelope.content)
        with self._lock:
            self.message_ids.append(str(headers["Message-ID"]))
            count = len(self.message_ids)
        if self.on_message is not None:
            self.on_message(count)
        await asyncio.sleep(self.delay)
        return "250 2.0.0 queued"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.controller.port}"


class Workers:
    """`python worker.py` processes against one dev server, each with its own log file."""

    def __init__(self, tmp_path: Path, address: str) -> None:
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            "SEQUENCER_HOME": str(tmp_path / "home"),
            "TEMPORAL_ADDRESS": address,
            "SEQUENCER_LOG_LEVEL": "INFO",
            # The workers encrypt what they write to Temporal, as in production.
            "SEQUENCER_PAYLOAD_KEYS": generate_key_entry("faults"),
        }
        self.env.pop("DATABASE_URL", None)
        self.processes: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        log = (self.tmp_path / f"worker-{len(self.processes)}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, str(REPO / "worker.py")],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        return process

    async def until_polling(self, client: Client, count: int) -> None:
        """Wait until `count` workers poll the workflow task queue."""
        request = DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=TASK_QUEUE),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        identities: set[str] = set()
        for _ in range(120):
            described = await client.workflow_service.describe_task_queue(request)
            identities = {poller.identity for poller in described.pollers}
            if len(identities) >= count:
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"{len(identities)} of {count} workers poll the task queue")

    def log(self, number: int) -> str:
        return (self.tmp_path / f"worker-{number}.log").read_text()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_campaign(
    tmp_path: Path, campaign_id: str, smtp_url: str, leads: int = LEADS, wait: str = "2s"
) -> tuple[Path, Path]:
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump(
            {
                "name": campaign_id,
                "id": campaign_id,
                "sender": {"email": "rep@acme.test", "smtp_url": smtp_url, "daily_limit": 1000},
                "steps": [
                    {"type": "email", "subject": "Hi", "body": "One", "wait_after": wait},
                    {"type": "email", "subject": "Again", "body": "Two"},
                ],
            }
        )
    )
    path = tmp_path / "leads.csv"
    rows = [f"lead{number}@example.com,Lead{number}" for number in range(leads)]
    path.write_text("email,first_name\n" + "\n".join(rows) + "\n")
    return campaign, path


async def wait_for_every_lead(
    service: Sequencer, campaign_id: str, workers: Workers, leads: int = LEADS
) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        rows = service.enrollments(campaign_id)
        if len(rows) == leads and all(row.status == "completed" for row in rows):
            return
        await asyncio.sleep(0.5)
    statuses = Counter(row.status for row in service.enrollments(campaign_id))
    logs = "\n".join(workers.log(n)[-3000:] for n in range(len(workers.processes)))
    pytest.fail(f"leads did not all complete within 240 s: {dict(statuses)}\n{logs}")


def uncertain_steps(home: Path) -> int:
    store = Store(load_settings({"SEQUENCER_HOME": str(home)}).database_url)
    try:
        return sum(1 for row in store.list_sends() if row.state == "uncertain")
    finally:
        store.close()


async def test_worker_killed_mid_send_sends_once(dev_server, tmp_path: Path) -> None:
    server = CountingServer(delay=0.5)
    server.controller.start()
    address = dev_server.client.service_client.config.target_host
    workers = Workers(tmp_path, address)
    service = Sequencer(
        load_settings({"SEQUENCER_HOME": str(tmp_path / "home")}), client=dev_server.client
    )
    killed = threading.Event()
    first = workers.start()

    def kill_on_fifth(count: int) -> None:
        # The server has the fifth message and has not replied: the worker dies in DATA.
        if count == 5 and not killed.is_set():
            first.send_signal(signal.SIGKILL)
            killed.set()

    server.on_message = kill_on_fifth
    try:
        campaign, leads = write_campaign(tmp_path, "killed-worker", server.url)
        report = await service.launch(campaign, leads)
        assert len(report.enrolled) == LEADS
        for _ in range(240):
            if killed.is_set():
                break
            await asyncio.sleep(0.25)
        assert killed.is_set(), workers.log(0)
        assert first.wait(10) == -signal.SIGKILL
        workers.start()
        await wait_for_every_lead(service, "killed-worker", workers)
    finally:
        workers.stop()
        service.close()
        server.controller.stop()

    sent = Counter(server.message_ids)
    duplicates = {message_id: n for message_id, n in sent.items() if n > 1}
    assert duplicates == {}
    uncertain = uncertain_steps(tmp_path / "home")
    # The sends in DATA when the worker died are recorded as uncertain, not sent again.
    assert uncertain >= 1
    # Every step reached the server, except any whose transmission the kill cut short.
    assert LEADS * STEPS - uncertain <= len(sent) <= LEADS * STEPS
    # The second worker did the rest of the work.
    assert "email step sent" in workers.log(1)


async def test_two_workers_split_the_work(dev_server, tmp_path: Path) -> None:
    server = CountingServer(delay=0.2)
    server.controller.start()
    address = dev_server.client.service_client.config.target_host
    workers = Workers(tmp_path, address)
    service = Sequencer(
        load_settings({"SEQUENCER_HOME": str(tmp_path / "home")}), client=dev_server.client
    )
    workers.start()
    workers.start()
    try:
        # Leads started before the second worker polls would all stay with the first one.
        await workers.until_polling(dev_server.client, 2)
        campaign, leads = write_campaign(tmp_path, "two-workers", server.url)
        await service.launch(campaign, leads)
        await wait_for_every_lead(service, "two-workers", workers)
    finally:
        workers.stop()
        service.close()
        server.controller.stop()

    sent = Counter(server.message_ids)
    assert len(sent) == LEADS * STEPS
    assert set(sent.values()) == {1}
    per_worker = [workers.log(n).count("email step sent") for n in (0, 1)]
    assert sum(per_worker) == LEADS * STEPS
    assert min(per_worker) > 0, per_worker


async def test_locked_database_delays_but_loses_nothing(dev_server, tmp_path: Path) -> None:
    server = CountingServer(delay=0)
    server.controller.start()
    address = dev_server.client.service_client.config.target_host
    workers = Workers(tmp_path, address)
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path / "home")})
    service = Sequencer(settings, client=dev_server.client)
    workers.start()
    lock = None
    try:
        await workers.until_polling(dev_server.client, 1)
        campaign, leads = write_campaign(tmp_path, "locked-database", server.url)
        await service.launch(campaign, leads)
        # Another process holds the write lock for longer than the worker's busy timeout.
        lock = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), timeout=30)
        lock.isolation_level = None
        lock.execute("BEGIN EXCLUSIVE")
        await asyncio.sleep(LOCK_SECONDS)
        lock.execute("COMMIT")
        await wait_for_every_lead(service, "locked-database", workers)
        logs = [
            service.store.log(row.workflow_id) for row in service.enrollments("locked-database")
        ]
    finally:
        if lock is not None:
            lock.close()
        workers.stop()
        service.close()
        server.controller.stop()

    assert "database is locked" in workers.log(0)
    for log in logs:
        keys = [(entry.kind, entry.status, entry.step) for entry in log]
        assert len(keys) == len(set(keys)), keys
        assert [entry.status for entry in log if entry.kind == "step"] == ["sent", "sent"]
    assert sorted(Counter(server.message_ids).values()) == [1] * LEADS * STEPS


class DevServer:
    """`temporal server start-dev` on a SQLite file, which can be stopped and started again."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.database = tmp_path / "temporal.db"
        self.log = tmp_path / "temporal.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(find_binary("temporal")),
                    "server",
                    "start-dev",
                    "--headless",
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--db-filename",
                    str(self.database),
                    "--log-level",
                    "warn",
                    *search_attribute_flags(),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for _ in range(120):
            try:
                client = await connect(self.address)
                await client.count_workflows()
                return
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.5)
        raise AssertionError(f"the dev server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def test_server_restart_loses_no_sleeping_lead(tmp_path: Path) -> None:
    server = CountingServer(delay=0)
    server.controller.start()
    temporal = DevServer(tmp_path)
    await temporal.start()
    workers = Workers(tmp_path, temporal.address)
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path / "home")})
    service = Sequencer(settings, client=await connect(temporal.address))
    workers.start()
    try:
        campaign, leads = write_campaign(
            tmp_path, "server-restart", server.url, leads=RESTART_LEADS, wait=RESTART_WAIT
        )
        await service.launch(campaign, leads)
        for _ in range(240):
            if len(server.message_ids) >= RESTART_LEADS:
                break
            await asyncio.sleep(0.25)
        assert len(server.message_ids) == RESTART_LEADS, "not every first email was sent"
        # Every lead sleeps before its second email: stop the server while they do.
        temporal.stop()
        stopped_while_asleep = len(server.message_ids) == RESTART_LEADS
        await asyncio.sleep(3)
        await temporal.start()
        await wait_for_every_lead(service, "server-restart", workers, leads=RESTART_LEADS)
        logs = [service.store.log(row.workflow_id) for row in service.enrollments("server-restart")]
    finally:
        workers.stop()
        service.close()
        temporal.stop()
        server.controller.stop()

    assert stopped_while_asleep
    assert len(server.message_ids) == 2 * RESTART_LEADS
    assert set(Counter(server.message_ids).values()) == {1}
    for log in logs:
        sent = [entry.at for entry in log if entry.kind == "step" and entry.status == "sent"]
        assert len(sent) == 2
        # The timer fired after the restart, never before its time.
        assert sent[1] - sent[0] >= timedelta(seconds=30)


async def test_linkedin_errors_retried_once_each(dev_server, tmp_path: Path) -> None:
    # The sandbox returns 429 with Retry-After twice for "ratelimited" profiles and 503 once
    # for "flaky" ones. Each lead's visit must still happen, once.
    sandbox = LinkedInSandbox(port=0)
    sandbox.start()
    address = dev_server.client.service_client.config.target_host
    workers = Workers(tmp_path, address)
    workers.env["SEQUENCER_LINKEDIN_URL"] = sandbox.base_url
    service = Sequencer(
        load_settings({"SEQUENCER_HOME": str(tmp_path / "home")}), client=dev_server.client
    )
    workers.start()
    try:
        campaign = tmp_path / "campaign.yaml"
        campaign.write_text(
            yaml.safe_dump(
                {
                    "name": "LinkedIn errors",
                    "id": "linkedin-errors",
                    "steps": [{"type": "linkedin_visit"}],
                }
            )
        )
        leads = tmp_path / "leads.csv"
        leads.write_text(
            "first_name,linkedin_url\n"
            "Rae,https://www.linkedin.com/in/rae-ratelimited\n"
            "Fay,https://www.linkedin.com/in/fay-flaky\n"
        )
        await service.launch(campaign, leads)
        await wait_for_every_lead(service, "linkedin-errors", workers, leads=2)
        actions = httpx.get(
            f"{sandbox.base_url}/v1/actions", headers={"Authorization": f"Bearer {SANDBOX_KEY}"}
        ).json()
    finally:
        workers.stop()
        service.close()
        sandbox.stop()

    visited = Counter(action["profile_url"] for action in actions)
    assert visited == {
        "https://www.linkedin.com/in/rae-ratelimited": 1,
        "https://www.linkedin.com/in/fay-flaky": 1,
    }
    log = workers.log(0)
    assert "429" in log
    assert "503" in log
