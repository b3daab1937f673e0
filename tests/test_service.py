"""The service layer against the time-skipping server and a real SQLite file."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from temporalio.client import Client
from temporalio.service import RPCError

from activities.email import message_id_for
from activities.records import StoreActivities
from sequencer import cli, sink_reports
from sequencer.codec import EncryptionCodec, PayloadCodecError
from sequencer.config import load_settings
from sequencer.models import SEARCH_ATTRIBUTE_CAMPAIGN, workflow_id_for
from sequencer.service import Sequencer, ServiceError
from sequencer.simulate import SimulatedChannels
from sequencer.stack import free_port
from sequencer.storage import Store
from sequencer.temporal import data_converter, lead_worker
from tests.conftest import CORPUS

FINAL = {"completed", "stopped", "replied", "removed"}
EMAIL = {"type": "email", "subject": "Hi {{first_name}}", "body": "Hello"}


@pytest.fixture
async def sequencer(time_skipping_env, tmp_path, monkeypatch):
    """A Sequencer on the shared test server, with its own database and task queue."""
    monkeypatch.setattr("sequencer.service.TASK_QUEUE", f"service-{uuid.uuid4()}")
    import sequencer.service as service_module

    settings = replace(load_settings({"SEQUENCER_HOME": str(tmp_path / "home")}))
    service = Sequencer(settings, client=time_skipping_env.client)
    records = StoreActivities(service.store)
    channels = SimulatedChannels({})
    async with lead_worker(
        time_skipping_env.client,
        service_module.TASK_QUEUE,
        [
            channels.send_email,
            channels.linkedin_step,
            records.create_task,
            records.record_activity,
        ],
        end_accounts=True,
    ):
        yield service
        # Let every workflow end while this worker still runs. A workflow left running, or
        # terminated during an activity, holds the shared test server's clock and makes
        # every later test that skips time hang.
        for _ in range(100):
            rows = [
                row
                for campaign in service.store.list_campaigns()
                for row in service.store.list_enrollments(campaign.id)
            ]
            if all(row.status in FINAL for row in rows):
                break
            await time_skipping_env.sleep(0.1)
        else:
            # End them, or they would stop the shared test server's clock for later tests.
            for row in rows:
                if row.status not in FINAL:
                    await time_skipping_env.client.get_workflow_handle(row.workflow_id).terminate(
                        "the test is over"
                    )
            pytest.fail(f"workflows still running after the test: {rows}")
    service.close()


def write(tmp_path: Path, name: str, steps: list[dict]) -> tuple[Path, Path]:
    campaign = tmp_path / f"{name}.yaml"
    campaign.write_text(
        yaml.safe_dump({"name": name, "sender": {"email": "rep@acme.test"}, "steps": steps})
    )
    leads = tmp_path / f"{name}.csv"
    leads.write_text("email,first_name,phone\nann@example.com,Ann,+33612345678\n")
    return campaign, leads


async def wait_for(time_skipping_env, condition, what: str):
    for _ in range(100):
        if condition():
            return
        await time_skipping_env.sleep(0.1)
    pytest.fail(f"timed out waiting until {what}")


async def test_launch_twice_enrolls_once(sequencer, tmp_path, monkeypatch):
    campaign, leads = write(tmp_path, "twice", [EMAIL])
    first = await sequencer.launch(campaign, leads)
    second = await sequencer.launch(campaign, leads)
    assert first.enrolled == ["ann@example.com"]
    assert second.enrolled == []
    assert second.already_enrolled == ["ann@example.com"]
    output = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=output, width=200))
    cli._print_import(second)
    assert "1 lead was already enrolled in this campaign and left unchanged." in output.getvalue()


async def test_changed_campaign_rejected(sequencer, tmp_path):
    campaign, leads = write(tmp_path, "changed", [EMAIL])
    await sequencer.launch(campaign, leads)
    write(tmp_path, "changed", [EMAIL, EMAIL])
    with pytest.raises(ServiceError, match="already launched with different steps"):
        await sequencer.launch(campaign, leads)


async def test_task_done_ends_as_done(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "task", [{"type": "manual_task", "instructions": "Wave"}])
    await sequencer.launch(campaign, leads)
    await wait_for(time_skipping_env, lambda: sequencer.tasks("open", "task"), "the task opens")
    task = sequencer.tasks("open", "task")[0]
    assert await sequencer.close_task(task.id, "done") == f"task {task.id} done"
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments("task")[0].status == "completed",
        "the enrollment completes",
    )
    # Ending the enrollment cancels open tasks; this one was closed first, so it stays done.
    assert sequencer.store.get_task(task.id).status == "done"
    # Repeating the same outcome succeeds and changes nothing; a different outcome is rejected.
    assert (
        await sequencer.close_task(task.id, "done")
        == f"task {task.id} is already done; nothing changed"
    )
    with pytest.raises(ServiceError, match="already done"):
        await sequencer.close_task(task.id, "skipped")


async def test_late_bounce_after_end(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "after-end", [EMAIL, EMAIL])
    await sequencer.launch(campaign, leads)
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments("after-end")[0].status == "completed",
        "the enrollment completes",
    )
    message = await sequencer.report_failure("after-end", "ann@example.com", 1, "bounce", True)
    assert "stays so" in message
    report = sequencer.activity("after-end", "ann@example.com")
    assert [s.status.value for s in report.steps] == ["bounced", "sent"]
    assert report.enrollment.status == "completed"
    assert report.enrollment.unsubscribed is True
    again = await sequencer.report_failure("after-end", "ann@example.com", 1, "bounce", True)
    assert "already bounced" in again
    assert (
        sum(e.status == "bounced" for e in sequencer.activity("after-end", "ann@example.com").log)
        == 1
    )


async def test_failure_of_unsent_step_rejected(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "unsent", [{**EMAIL, "wait_after": "3d"}, EMAIL])
    await sequencer.launch(campaign, leads)
    await wait_for(
        time_skipping_env,
        lambda: sequencer.activity("unsent", "ann@example.com").steps[0].status.value == "sent",
        "step 1 is sent",
    )
    with pytest.raises(ServiceError, match="step 2 of ann@example.com is pending, not sent"):
        await sequencer.report_failure("unsent", "ann@example.com", 2, "bounce", True)
    message = await sequencer.report_failure("unsent", "ann@example.com", 1, "bounce", True)
    assert message == "ann@example.com: step 1 marked bounced"


async def test_pause_resume_remove_lead(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "controls", [{**EMAIL, "wait_after": "3d"}, EMAIL])
    await sequencer.launch(campaign, leads)
    await wait_for(
        time_skipping_env,
        lambda: sequencer.activity("controls", "ann@example.com").steps[0].status.value == "sent",
        "step 1 is sent",
    )
    paused = await sequencer.control("controls", "ann@example.com", "pause", "holiday")
    assert paused.startswith("ann@example.com: paused")
    with pytest.raises(ServiceError, match="already paused by an operator; nothing changed"):
        await sequencer.control("controls", "ann@example.com", "pause")
    assert sequencer.enrollments("controls")[0].status == "paused"
    await sequencer.control("controls", "ann@example.com", "resume")
    with pytest.raises(ServiceError, match="is not paused; nothing changed"):
        await sequencer.control("controls", "ann@example.com", "resume")
    await sequencer.control("controls", "ann@example.com", "remove")
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments("controls")[0].status == "removed",
        "the lead is removed",
    )
    with pytest.raises(ServiceError, match="already ended as removed; nothing changed"):
        await sequencer.control("controls", "ann@example.com", "pause")
    with pytest.raises(ServiceError, match="'nobody@example.com' is not enrolled"):
        await sequencer.control("controls", "nobody@example.com", "pause")
    log = [e.status for e in sequencer.activity("controls", "ann@example.com").log]
    assert log.count("paused") == 1
    assert log.count("resumed") == 1
    assert log[-1] == "ended"


async def test_resubscribe_resumes_bounced_enrollment(sequencer, tmp_path, time_skipping_env):
    steps = [{**EMAIL, "wait_after": "1d"}, {**EMAIL, "wait_after": "1d"}, EMAIL]
    campaign, leads = write(tmp_path, "again", steps)
    await sequencer.launch(campaign, leads)
    await wait_for(
        time_skipping_env,
        lambda: sequencer.activity("again", "ann@example.com").steps[0].status.value == "sent",
        "step 1 is sent",
    )

    await sequencer.report_failure("again", "ann@example.com", 1, "bounce", True)
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments("again")[0].status == "stopped",
        "the bounce stops the enrollment",
    )
    with pytest.raises(ServiceError, match="already unsubscribed"):
        await sequencer.unsubscribe("ann@example.com")

    lines = await sequencer.resubscribe("ANN@example.com", resume=True)
    assert lines[0].startswith("ann@example.com re-subscribed")
    assert "again: ann@example.com: resumed from step 2 (email)" in lines
    for _ in range(5):
        if sequencer.enrollments("again")[0].status == "completed":
            break
        await time_skipping_env.sleep(timedelta(days=1))
    assert sequencer.enrollments("again")[0].status == "completed"

    report = sequencer.activity("again", "ann@example.com")
    assert [s.status.value for s in report.steps] == ["bounced", "sent", "sent"]
    assert report.enrollment.unsubscribed is False
    events = [e.status for e in report.log if e.kind == "event"]
    assert events.index("resubscribed") < events.index("resumed")
    # The new run's entries follow the first run's, so none was dropped as a duplicate.
    assert [e.status for e in report.log].count("skipped") == 2
    with pytest.raises(ServiceError, match="is not unsubscribed; nothing changed"):
        await sequencer.resubscribe("ann@example.com")


async def test_unsubscribe_reaches_running_enrollment(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "unsub", [{**EMAIL, "wait_after": "2d"}, EMAIL])
    await sequencer.launch(campaign, leads)
    with pytest.raises(ServiceError, match="invalid email address 'not-an-address'"):
        await sequencer.unsubscribe("not-an-address")
    lines = await sequencer.unsubscribe("ann@example.com")
    assert lines[1] == "unsub: ann@example.com: recorded in the running enrollment"
    report = sequencer.activity("unsub", "ann@example.com")
    assert report.enrollment.unsubscribed is True
    assert "unsubscribed" in [e.status for e in report.log]
    await sequencer.control("unsub", "ann@example.com", "remove")


async def test_reassign_every_running_lead(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "moving", [{**EMAIL, "wait_after": "3d"}, EMAIL])
    leads.write_text("email,first_name\nann@example.com,Ann\nbob@example.com,Bob\n")
    await sequencer.launch(campaign, leads)
    lines = await sequencer.reassign_all("moving", "backup@acme.test")
    assert sorted(lines) == [
        "ann@example.com: moved to backup@acme.test",
        "bob@example.com: moved to backup@acme.test",
    ]
    again = await sequencer.reassign_all("moving", "backup@acme.test")
    assert all(
        line.endswith("already sends from backup@acme.test; nothing changed") for line in again
    )
    with pytest.raises(ServiceError, match="invalid sender: email: "):
        await sequencer.reassign("moving", "ann@example.com", "not an address")
    for lead in ("ann@example.com", "bob@example.com"):
        await sequencer.control("moving", lead, "remove")
    with pytest.raises(ServiceError, match="has no lead left to move"):
        await sequencer.reassign_all("moving", "other@acme.test")


BOUNCE_EML = CORPUS / "bounces" / "lhost-postfix-31.eml"


@pytest.mark.skipif(not BOUNCE_EML.exists(), reason="the shared corpus is not beside the repo")
async def test_bounce_message_fails_the_step(sequencer, tmp_path, time_skipping_env):
    steps = [{**EMAIL, "wait_after": "2d"}, EMAIL, {"type": "call", "instructions": "Call"}]
    campaign, leads = write(tmp_path, "dsn", steps)
    leads.write_text("email,first_name,phone\nkijitora@gmail.com,Kiji,+33612345678\n")
    await sequencer.launch(campaign, leads)
    await wait_for(
        time_skipping_env,
        lambda: sequencer.activity("dsn", "kijitora@gmail.com").steps[0].status.value == "sent",
        "step 1 is sent",
    )
    raw = BOUNCE_EML.read_bytes()
    lines = await sequencer.apply_mail(raw, source="dsn.eml")
    assert lines[0] == "dsn.eml: hard_bounce (user-unknown)"
    assert "kijitora@gmail.com: step 1 marked bounced" in lines[1]
    report = sequencer.activity("dsn", "kijitora@gmail.com")
    assert [s.status.value for s in report.steps][:2] == ["bounced", "skipped"]
    assert "5.1.1" in report.steps[0].detail
    assert report.enrollment.unsubscribed is True
    # The call runs at once, without the 2 days of wait.
    await wait_for(time_skipping_env, lambda: sequencer.tasks("open", "dsn"), "the call opens")
    again = await sequencer.apply_mail(raw, source="dsn.eml")
    assert again == ["dsn.eml: hard_bounce (user-unknown): applied before; nothing changed"]
    task = sequencer.tasks("open", "dsn")[0]
    await sequencer.close_task(task.id, "done")


async def test_reply_matched_by_message_id(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "threads", [{**EMAIL, "wait_after": "2d"}, EMAIL])
    await sequencer.launch(campaign, leads)
    await wait_for(
        time_skipping_env,
        lambda: sequencer.activity("threads", "ann@example.com").steps[0].status.value == "sent",
        "step 1 is sent",
    )
    sent_id = message_id_for("threads", "ann@example.com", 1, "rep@acme.test")
    reply = (
        "From: Ann <someone-else@example.org>\r\n"
        "To: rep@acme.test\r\n"
        "Subject: Re: Hi Ann\r\n"
        "Message-ID: <reply-1@example.org>\r\n"
        f"In-Reply-To: {sent_id}\r\n"
        f"References: {sent_id}\r\n"
        "\r\n"
        "Sounds good, call me tomorrow.\r\n"
    ).encode()
    lines = await sequencer.apply_mail(reply, source="reply.eml")
    assert lines[0].startswith("reply.eml: human_reply")
    assert lines[1] == "  ann@example.com: reply recorded; the sequence stops"
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments("threads")[0].status == "replied",
        "the reply stops the sequence",
    )
    unrelated = (
        reply.replace(f"In-Reply-To: {sent_id}\r\n".encode(), b"")
        .replace(f"References: {sent_id}\r\n".encode(), b"")
        .replace(b"<reply-1@", b"<other-1@")
    )
    assert (await sequencer.apply_mail(unrelated, source="other.eml"))[1:] == [
        "  no enrolled lead matches this message: nothing to do"
    ]
    # A message that matched no lead is not remembered: it may apply once its lead exists.
    assert len(await sequencer.apply_mail(unrelated, source="other.eml")) == 2


async def sent_step_one(sequencer, time_skipping_env, campaign_id: str, lead: str) -> None:
    await wait_for(
        time_skipping_env,
        lambda: sequencer.activity(campaign_id, lead).steps[0].status.value == "sent",
        "step 1 is sent",
    )


async def test_out_of_office_postpones_next_email(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "ooo", [{**EMAIL, "wait_after": "2d"}, EMAIL])
    await sequencer.launch(campaign, leads)
    await sent_step_one(sequencer, time_skipping_env, "ooo", "ann@example.com")
    now = await time_skipping_env.get_current_time()
    sent = f"<ooo.{'0' * 16}.1@acme.test>"
    original = f"Message-ID: {sent}\r\nSubject: Hi Ann\r\n\r\nHello\r\n".encode()
    reply = sink_reports.out_of_office("rep@acme.test", "ann@example.com", original, now)
    back_on = (now + timedelta(days=sink_reports.OUT_OF_OFFICE_DAYS)).date()

    lines = await sequencer.apply_mail(reply, source="ooo.eml")

    assert lines[0] == "ooo.eml: auto_reply (out-of-office)"
    assert f"back on {back_on}" in lines[1]
    back_at = datetime.combine(back_on, time(9), UTC)
    await wait_for(
        time_skipping_env,
        lambda: any(
            e.status == "postponed" for e in sequencer.activity("ooo", "ann@example.com").log
        ),
        "the postponement is recorded",
    )
    postponed = [
        e for e in sequencer.activity("ooo", "ann@example.com").log if e.status == "postponed"
    ]
    assert postponed[0].step == 2
    assert postponed[0].detail == f"until {back_at.strftime('%Y-%m-%d %H:%M')} UTC"
    # The 2-day wait is over long before the return: step 2 must not run until then.
    await time_skipping_env.sleep(timedelta(days=3).total_seconds())
    assert sequencer.activity("ooo", "ann@example.com").steps[1].status.value == "pending"
    await time_skipping_env.sleep(timedelta(days=sink_reports.OUT_OF_OFFICE_DAYS).total_seconds())
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments("ooo")[0].status == "completed",
        "step 2 runs after the return",
    )
    step_two = sequencer.activity("ooo", "ann@example.com").steps[1]
    assert step_two.at >= back_at


async def soft_bounce_of(sequencer, number: int) -> list[str]:
    original = (
        f"Message-ID: <outside-{number}@acme.test>\r\nSubject: Hi\r\n\r\nHello\r\n"
    ).encode()
    now = datetime.now(UTC)
    dsn = sink_reports.soft_bounce("rep@acme.test", "ann@example.com", original, now)
    return await sequencer.apply_mail(dsn, source=f"soft-{number}.eml")


async def test_repeated_soft_bounces_suppress(sequencer, tmp_path, time_skipping_env):
    campaign, leads = write(tmp_path, "soft", [{**EMAIL, "wait_after": "2d"}, EMAIL])
    await sequencer.launch(campaign, leads)
    await sent_step_one(sequencer, time_skipping_env, "soft", "ann@example.com")

    first = await soft_bounce_of(sequencer, 1)
    repeated = await soft_bounce_of(sequencer, 1)
    second = await soft_bounce_of(sequencer, 2)
    suppressed_before_third = sequencer.store.is_suppressed("ann@example.com")
    third = await soft_bounce_of(sequencer, 3)

    assert first[-1] == "  ann@example.com: soft bounce 1 of 3 within 7d"
    assert repeated[0].endswith("applied before; nothing changed")
    assert second[-1] == "  ann@example.com: soft bounce 2 of 3 within 7d"
    assert suppressed_before_third is False
    assert "ann@example.com unsubscribed" in "\n".join(third)
    assert sequencer.store.is_suppressed("ann@example.com") is True
    await wait_for(
        time_skipping_env,
        lambda: sequencer.activity("soft", "ann@example.com").enrollment.unsubscribed,
        "the enrollment is unsubscribed",
    )
    # Soft bounces are recorded, never a failure of the step.
    assert sequencer.activity("soft", "ann@example.com").steps[0].status.value == "sent"
    await time_skipping_env.sleep(timedelta(days=3).total_seconds())
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments("soft")[0].status in FINAL,
        "the enrollment ends",
    )


async def test_soft_bounce_limit_configurable(sequencer, tmp_path, time_skipping_env):
    sequencer.settings = replace(sequencer.settings, soft_bounce_limit=1)
    campaign, leads = write(tmp_path, "soft1", [EMAIL])
    await sequencer.launch(campaign, leads)
    await sent_step_one(sequencer, time_skipping_env, "soft1", "ann@example.com")

    lines = await soft_bounce_of(sequencer, 10)

    assert "ann@example.com unsubscribed" in "\n".join(lines)
    assert sequencer.store.is_suppressed("ann@example.com") is True


async def test_failed_start_enrolls_nobody(time_skipping_env, tmp_path):
    # A client that must encrypt but has no key cannot start a workflow.
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path / "home")})
    client = Client(
        **{
            **time_skipping_env.client.config(),
            "data_converter": data_converter(EncryptionCodec((), source="no key")),
        }
    )
    service = Sequencer(settings, client=client)
    campaign, leads = write(tmp_path, "no-key", [EMAIL])
    try:
        with pytest.raises(PayloadCodecError):
            await service.launch(campaign, leads)
        rows = service.store.list_enrollments("no-key")
    finally:
        service.close()

    assert rows == []


class KeyLostAfter(EncryptionCodec):
    """Writes payloads in plaintext until `encodings` calls, then has no key, as when a key
    file is removed during a launch."""

    def __init__(self, encodings: int) -> None:
        super().__init__((), encrypt=False, source="a key file removed during the launch")
        self.left = encodings

    async def encode(self, payloads):
        self.left -= 1
        if self.left < 0:
            return await EncryptionCodec((), source="the removed key file").encode(payloads)
        return await super().encode(payloads)


async def test_cut_short_launch_lists_started_leads(
    sequencer, time_skipping_env, tmp_path, monkeypatch
):
    """Leads whose workflow did not start have no row, over several enrollment batches, and
    the next launch of the same file enrolls them."""
    monkeypatch.setattr("sequencer.service.ENROLLMENT_BATCH", 40)
    campaign = tmp_path / "cut-short.yaml"
    sender = {"email": "rep@acme.test", "daily_limit": 1000}
    campaign.write_text(yaml.safe_dump({"name": "cut-short", "sender": sender, "steps": [EMAIL]}))
    leads = tmp_path / "many.csv"
    leads.write_text("email\n" + "".join(f"lead{n}@example.com\n" for n in range(200)))
    config = time_skipping_env.client.config()
    failing = Client(**{**config, "data_converter": data_converter(KeyLostAfter(100))})
    # The same database and task queue as `sequencer`, whose worker runs every started lead.
    cut_short = Sequencer(sequencer.settings, client=failing)
    try:
        with pytest.raises(PayloadCodecError):
            await cut_short.launch(campaign, leads)
    finally:
        cut_short.close()
    listed = {row.workflow_id for row in sequencer.store.list_enrollments("cut-short")}

    started = set()
    for number in range(200):
        workflow_id = workflow_id_for("cut-short", f"lead{number}@example.com")
        try:
            await time_skipping_env.client.get_workflow_handle(workflow_id).describe()
        except RPCError:
            continue
        started.add(workflow_id)
    assert 0 < len(started) < 200
    assert listed == started

    report = await sequencer.launch(campaign, leads)
    assert len(report.already_enrolled) == len(started)
    assert len(report.enrolled) == 200 - len(started)
    assert len(sequencer.store.list_enrollments("cut-short")) == 200


@pytest.mark.parametrize("account", ["email:", "email:not-an-address", "not-an-address@"])
async def test_account_action_rejects_malformed_addresses(sequencer, account):
    with pytest.raises(ServiceError) as refused:
        await sequencer.account_action(account, "disconnect", None)
    message = str(refused.value)
    assert message.startswith("invalid sender account 'email:")
    assert account.removeprefix("email:") in message
    assert "as `sequencer account list` shows it" in message


async def test_launch_with_busy_worker_reports(dev_server, tmp_path, monkeypatch):
    """A launch whose mailbox poller cannot report in time (no worker runs here) still ends
    with its report rather than the query's timeout."""
    monkeypatch.setattr("sequencer.service.MAILBOX_QUERY_TIMEOUT", 1.0)
    settings = load_settings(
        {
            "SEQUENCER_HOME": str(tmp_path / "home"),
            "SEQUENCER_IMAP_URL": f"imap://127.0.0.1:{free_port()}",
        }
    )
    service = Sequencer(settings, client=dev_server.client)
    campaign, leads = write(tmp_path, "busy-worker", [EMAIL])
    try:
        report = await service.launch(campaign, leads)
    finally:
        service.close()

    assert report.enrolled == ["ann@example.com"]
    assert report.mailbox is not None
    assert report.mailbox.moved_from is None
    assert report.mailbox.problem is not None  # nothing listens at that port


# More rows than a launch can start before the interrupt, even on a fast machine.
INTERRUPTED_LEADS = 10_000


def restore_default_sigint() -> None:
    """Give SIGINT its default action in a child process, so that Python raises
    KeyboardInterrupt on it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def enrolled_rows(database: Path) -> int:
    """Count the enrollment rows of a database that another process may be creating."""
    if not database.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute("SELECT count(*) FROM enrollments").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet, or the file is locked
        return 0


async def test_interrupted_launch_lists_started_leads(dev_server, tmp_path):
    """Ctrl-C during `sequencer launch` leaves rows for exactly the leads whose workflow
    started, and prints how to go on."""
    campaign = tmp_path / "interrupted.yaml"
    sender = {"email": "rep@acme.test", "daily_limit": 10000}
    campaign.write_text(yaml.safe_dump({"name": "interrupted", "sender": sender, "steps": [EMAIL]}))
    leads = tmp_path / "many.csv"
    rows = "".join(f"lead{n}@example.com\n" for n in range(INTERRUPTED_LEADS))
    leads.write_text("email\n" + rows)
    home = tmp_path / "home"
    environment = {
        **os.environ,
        "SEQUENCER_HOME": str(home),
        "TEMPORAL_ADDRESS": dev_server.client.service_client.config.target_host,
        "SEQUENCER_PAYLOAD_ENCRYPTION": "off",
    }
    command = [str(Path(sys.executable).parent / "sequencer"), "launch", str(campaign)]
    launch = subprocess.Popen(
        [*command, "--leads", str(leads)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and the
        # launch would inherit that from pytest. Ctrl-C reaches a launch run in a terminal.
        preexec_fn=restore_default_sigint,
    )
    database = home / "sequencer.db"
    try:
        # Read with sqlite3 rather than a Store, which would migrate the file and could wait
        # for the launch's writes. SIGINT is sent 0.3 s after the first rows appear.
        for _ in range(600):
            if enrolled_rows(database) > 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        launch.send_signal(signal.SIGINT)
        stdout, stderr = launch.communicate(timeout=60)
    finally:
        launch.kill()
    store = Store(f"sqlite:///{database}")
    try:
        listed = {row.workflow_id for row in store.list_enrollments("interrupted")}
    finally:
        store.close()

    message = " ".join(stderr.split())  # the console wraps long lines
    assert launch.returncode == 130, f"stdout: {stdout}\nstderr: {stderr}"
    assert "Launch interrupted after" in message
    assert "Launch the same file again" in message
    assert 0 < len(listed) < INTERRUPTED_LEADS
    for workflow_id in listed:
        await dev_server.client.get_workflow_handle(workflow_id).describe()
    query = f'{SEARCH_ATTRIBUTE_CAMPAIGN} = "interrupted"'
    for _ in range(100):
        started = await dev_server.client.count_workflows(query)
        if started.count == len(listed):
            break
        await asyncio.sleep(0.1)
    assert started.count == len(listed)
