"""`python worker.py` on its own, against a Temporal dev server given by TEMPORAL_ADDRESS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from sequencer.codec import generate_key_entry
from sequencer.config import load_settings
from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.models import SEARCH_ATTRIBUTES
from sequencer.service import Sequencer
from sequencer.smtp_sink import SmtpSink, read_mailbox
from sequencer.temporal import check_search_attributes, find_binary, register_search_attributes
from workflows.lead_sequence import ACCOUNT_KEY, CAMPAIGN_KEY, STAGE_KEY, STATUS_KEY

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.stack


async def test_worker_rejects_missing_search_attributes(tmp_path):
    # A server set up for an older version: SequencerAccount was not registered yet.
    older = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(find_binary("temporal")),
        data_converter=pydantic_data_converter,
        search_attributes=[CAMPAIGN_KEY, STATUS_KEY, STAGE_KEY],
    )
    try:
        env = {
            **os.environ,
            "SEQUENCER_HOME": str(tmp_path / "home"),
            "TEMPORAL_ADDRESS": older.client.service_client.config.target_host,
            "SEQUENCER_PAYLOAD_KEYS": generate_key_entry(),
        }
        env.pop("DATABASE_URL", None)
        env.pop("SEQUENCER_PAYLOAD_KEYS_FILE", None)
        worker = subprocess.run(
            [sys.executable, str(REPO / "worker.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert worker.returncode == 1, worker.stderr
        assert "SequencerAccount is missing" in worker.stderr
        assert "--name SequencerAccount --type Keyword" in worker.stderr
        assert "Traceback" not in worker.stderr
        # `sequencer up` registers what an older database lacks before its worker starts.
        await register_search_attributes(older.client)
        await check_search_attributes(older.client)
    finally:
        await older.shutdown()


async def test_worker_runs_campaign_alone(dev_server, tmp_path):
    keys = (CAMPAIGN_KEY, STATUS_KEY, STAGE_KEY, ACCOUNT_KEY)
    assert {key.name for key in keys} == set(SEARCH_ATTRIBUTES)
    sink = SmtpSink(tmp_path / "mailbox", port=0)
    sink.start()
    sandbox = LinkedInSandbox(port=0)
    sandbox.start()
    home = tmp_path / "home"
    address = dev_server.client.service_client.config.target_host
    payload_key = generate_key_entry()
    env = {
        **os.environ,
        "SEQUENCER_HOME": str(home),
        "TEMPORAL_ADDRESS": address,
        "SEQUENCER_LINKEDIN_URL": sandbox.base_url,
        "SEQUENCER_PAYLOAD_KEYS": payload_key,
    }
    env.pop("DATABASE_URL", None)
    env.pop("SEQUENCER_PAYLOAD_KEYS_FILE", None)
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, str(REPO / "worker.py")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    # The service connects with the worker's payload key, as `sequencer serve` would.
    service = Sequencer(
        load_settings(
            {
                "SEQUENCER_HOME": str(home),
                "TEMPORAL_ADDRESS": address,
                "SEQUENCER_PAYLOAD_KEYS": payload_key,
            }
        )
    )
    try:
        campaign = tmp_path / "campaign.yaml"
        campaign.write_text(
            yaml.safe_dump(
                {
                    "name": "Worker alone",
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
            "ann@example.com,Ann,https://www.linkedin.com/in/ann-example\n"
            "bounce-ben@example.com,Ben,https://www.linkedin.com/in/ben-deactivated\n"
        )
        report = await service.launch(campaign, leads)
        assert sorted(report.enrolled) == ["ann@example.com", "bounce-ben@example.com"]

        for _ in range(120):
            rows = service.enrollments("worker-alone")
            if all(row.status in ("completed", "stopped") for row in rows):
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.5)
        statuses = {row.lead_key: row.status for row in service.enrollments("worker-alone")}
        assert statuses == {"ann@example.com": "completed", "bounce-ben@example.com": "stopped"}
        assert [m["Delivered-To"] for m in read_mailbox(tmp_path / "mailbox")] == [
            "ann@example.com"
        ]

        # The search attributes are kept current, so operators can filter leads in the UI.
        query = 'SequencerCampaign = "worker-alone" AND SequencerStage = "ended"'
        for _ in range(40):
            if (await dev_server.client.count_workflows(query)).count == 2:
                break
            await asyncio.sleep(0.5)
        assert (await dev_server.client.count_workflows(query)).count == 2
        stopped = 'SequencerCampaign = "worker-alone" AND SequencerStatus = "stopped"'
        assert (await dev_server.client.count_workflows(stopped)).count == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
        log.close()
        service.close()
        sandbox.stop()
        sink.stop()
    output = (tmp_path / "worker.log").read_text()
    assert code == 0, output
    assert "Worker stopped" in output


def health(home) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SEQUENCER_HOME": str(home)}
    return subprocess.run(
        [sys.executable, str(REPO / "worker.py"), "--health"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_worker_health_check(dev_server, tmp_path):
    home = tmp_path / "home"
    env = {
        **os.environ,
        "SEQUENCER_HOME": str(home),
        "TEMPORAL_ADDRESS": dev_server.client.service_client.config.target_host,
        "SEQUENCER_PAYLOAD_ENCRYPTION": "off",
    }
    env.pop("DATABASE_URL", None)
    before = health(home)
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, str(REPO / "worker.py")], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        for _ in range(120):
            if (home / "worker-alive").exists():
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.5)
        running = health(home)
    finally:
        worker.terminate()
        worker.wait(60)
    # A worker that stopped writing a minute ago is reported dead.
    stale = time.time() - 120
    os.utime(home / "worker-alive", (stale, stale))
    after = health(home)

    assert before.returncode == 1
    assert "has not connected to Temporal yet" in before.stderr
    assert running.returncode == 0, running.stderr
    assert "worker alive" in running.stdout
    assert after.returncode == 1
    assert "s old (limit 60 s)" in after.stderr
