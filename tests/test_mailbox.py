"""Reading a sender's IMAP mailbox: the `poll_mailbox` activity and MailboxWorkflow, against a
real Dovecot server on loopback.

Dovecot comes from Debian's dovecot-imapd package, which `.ci/run` installs. Without it these
tests skip, unless SEQUENCER_REQUIRE_DOVECOT=1 (set by `.ci/run`) makes them fail instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from imapclient import IMAPClient
from temporalio.client import WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.mailbox import ImapCredentials, MailboxActivities
from sequencer.campaign import Sender
from sequencer.config import load_settings
from sequencer.imap_server import Dovecot, append_message, find_dovecot
from sequencer.models import TASK_QUEUE, MailboxCursor, MailboxInput, MailboxStatus, PollRequest
from sequencer.service import Sequencer, ServiceError
from sequencer.stack import free_port
from sequencer.temporal import find_binary, workflow_runner
from workflows.mailbox import MailboxWorkflow, mailbox_workflow_id

if find_dovecot() is None:
    if os.environ.get("SEQUENCER_REQUIRE_DOVECOT") == "1":
        pytest.fail(
            "dovecot not found, but SEQUENCER_REQUIRE_DOVECOT=1: install dovecot-imapd",
            pytrace=False,
        )
    pytest.skip("dovecot not found: install Debian's dovecot-imapd", allow_module_level=True)

_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    server = Dovecot(tmp_path_factory.mktemp("dovecot"), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def address() -> str:
    """A mailbox of its own for each test: every user name is a mailbox on this server."""
    return f"rep-{uuid.uuid4().hex[:8]}@acme.test"


def message(subject: str, message_id: str | None = None) -> bytes:
    message_id = message_id or f"<m{next(_numbers)}.{uuid.uuid4().hex[:8]}@example.com>"
    return (
        f"From: someone@example.com\r\nTo: rep@acme.test\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n\r\nbody of {subject}\r\n"
    ).encode()


def append(server: Dovecot, address: str, *subjects: str) -> None:
    for subject in subjects:
        append_message(server.host, server.port, address, server.password, message(subject))


class Recorder:
    """Stands in for the engine's apply_mail: records each message, fails on request."""

    def __init__(self, failing: dict[str, BaseException] | None = None) -> None:
        self.applied: list[tuple[str, str]] = []
        self.failing = failing or {}

    async def __call__(self, raw: bytes, source: str) -> list[str]:
        subject = next(
            line.split(": ", 1)[1]
            for line in raw.decode().split("\r\n")
            if line.startswith("Subject: ")
        )
        if subject in self.failing:
            raise self.failing[subject]
        self.applied.append((subject, source))
        return [f"{source}: applied {subject}"]

    @property
    def subjects(self) -> list[str]:
        return [subject for subject, _ in self.applied]


def activities(server: Dovecot, recorder: Recorder, password: str | None = None):
    def credentials_for(address: str) -> ImapCredentials | None:
        return ImapCredentials(address, password or server.password)

    return MailboxActivities(recorder, credentials_for)


def request(
    server: Dovecot, address: str, cursor: MailboxCursor | None = None, since: date | None = None
) -> PollRequest:
    return PollRequest(
        address=address,
        imap_url=server.imap_url,
        since=since or datetime.now(UTC).date() - timedelta(days=1),
        cursor=cursor or MailboxCursor(),
    )


async def poll(
    server: Dovecot,
    recorder: Recorder,
    poll_request: PollRequest,
    heartbeat_details: list | None = None,
    heartbeats: list | None = None,
):
    environment = ActivityEnvironment()
    if heartbeat_details is not None:
        environment.info = dataclasses.replace(
            environment.info, heartbeat_details=heartbeat_details
        )
    if heartbeats is not None:
        environment.on_heartbeat = lambda *details: heartbeats.append(details[0])
    return await environment.run(activities(server, recorder).poll_mailbox, poll_request)


# The activity


async def test_poll_reads_messages_in_order(dovecot, address):
    append(dovecot, address, "one", "two", "three")
    recorder = Recorder()

    result = await poll(dovecot, recorder, request(dovecot, address))

    assert recorder.subjects == ["one", "two", "three"]
    assert [source for _, source in recorder.applied] == [
        f"{address} UID 1",
        f"{address} UID 2",
        f"{address} UID 3",
    ]
    assert result.messages == 3
    assert result.cursor.last_uid == 3
    assert result.cursor.uidvalidity is not None
    assert result.uidvalidity_changed is False


async def test_poll_from_cursor_reads_only_new(dovecot, address):
    append(dovecot, address, "old")
    first = await poll(dovecot, Recorder(), request(dovecot, address))
    append(dovecot, address, "new")
    recorder = Recorder()

    second = await poll(dovecot, recorder, request(dovecot, address, first.cursor))
    third = await poll(dovecot, recorder, request(dovecot, address, second.cursor))

    assert recorder.subjects == ["new"]
    assert second.cursor.last_uid == 2
    assert third.messages == 0
    assert third.cursor == second.cursor


async def test_poll_leaves_messages_unread(dovecot, address):
    append(dovecot, address, "unread")
    await poll(dovecot, Recorder(), request(dovecot, address))

    client = IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=10)
    client.login(address, dovecot.password)
    client.select_folder("INBOX", readonly=True)
    flags = client.get_flags(client.search(["ALL"]))
    client.logout()

    assert flags
    assert all(b"\\Seen" not in value for value in flags.values())


async def test_poll_heartbeats_cursor_per_message(dovecot, address):
    append(dovecot, address, "a", "b")
    heartbeats: list = []

    await poll(dovecot, Recorder(), request(dovecot, address), heartbeats=heartbeats)

    last_uids = [MailboxCursor.model_validate(detail).last_uid for detail in heartbeats]
    assert last_uids == [0, 1, 2]


async def test_retry_resumes_from_heartbeat(dovecot, address):
    append(dovecot, address, "a", "b", "c")
    first = await poll(dovecot, Recorder(), request(dovecot, address))
    saved = MailboxCursor(uidvalidity=first.cursor.uidvalidity, last_uid=2)
    recorder = Recorder()

    # A retried attempt: the workflow's cursor is still at the start, the heartbeat is not.
    result = await poll(
        dovecot,
        recorder,
        request(dovecot, address, MailboxCursor(uidvalidity=first.cursor.uidvalidity)),
        heartbeat_details=[saved.model_dump()],
    )

    assert recorder.subjects == ["c"]
    assert result.cursor.last_uid == 3


async def test_uidvalidity_change_reads_again(dovecot, address):
    append(dovecot, address, "a", "b")
    stale = MailboxCursor(uidvalidity=1, last_uid=99)
    recorder = Recorder()

    result = await poll(dovecot, recorder, request(dovecot, address, stale))

    assert recorder.subjects == ["a", "b"]
    assert result.uidvalidity_changed is True
    assert result.cursor.uidvalidity != 1
    assert result.cursor.last_uid == 2


async def test_first_poll_skips_older_mail(dovecot, address):
    append(dovecot, address, "before the poller started")
    recorder = Recorder()
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)

    result = await poll(dovecot, recorder, request(dovecot, address, since=tomorrow))

    assert recorder.subjects == []
    assert result.cursor.uidvalidity is not None


async def test_broken_message_passed_over(dovecot, address):
    append(dovecot, address, "a", "broken", "c")
    recorder = Recorder(failing={"broken": ValueError("cannot parse")})

    result = await poll(dovecot, recorder, request(dovecot, address))

    assert recorder.subjects == ["a", "c"]
    assert result.failed_uids == [2]
    assert result.cursor.last_uid == 3


async def test_unreachable_engine_fails_attempt(dovecot, address):
    append(dovecot, address, "a", "b")
    recorder = Recorder(failing={"b": ConnectionRefusedError("Temporal is down")})
    heartbeats: list = []

    with pytest.raises(ConnectionRefusedError):
        await poll(dovecot, recorder, request(dovecot, address), heartbeats=heartbeats)

    assert recorder.subjects == ["a"]
    assert MailboxCursor.model_validate(heartbeats[-1]).last_uid == 1


async def test_wrong_password_names_setting(dovecot, address):
    environment = ActivityEnvironment()
    wrong = activities(dovecot, Recorder(), password="not-the-password")

    with pytest.raises(ApplicationError) as raised:
        await environment.run(wrong.poll_mailbox, request(dovecot, address))

    assert f"IMAP login as {address}" in str(raised.value)
    assert "SEQUENCER_IMAP_PASSWORD" in str(raised.value)


async def test_missing_password_names_setting(dovecot, address):
    environment = ActivityEnvironment()
    without = MailboxActivities(Recorder(), lambda _: None)

    with pytest.raises(ApplicationError) as raised:
        await environment.run(without.poll_mailbox, request(dovecot, address))

    assert "SEQUENCER_IMAP_PASSWORD" in str(raised.value)


async def test_closed_port_names_server(dovecot, address):
    port = free_port()
    closed = request(dovecot, address).model_copy(update={"imap_url": f"imap://127.0.0.1:{port}"})

    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(activities(dovecot, Recorder()).poll_mailbox, closed)

    assert f"cannot connect to the IMAP server 127.0.0.1:{port}" in str(raised.value)


async def test_invalid_url_not_retried(dovecot, address):
    invalid = request(dovecot, address).model_copy(update={"imap_url": "pop3://127.0.0.1:1"})

    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(activities(dovecot, Recorder()).poll_mailbox, invalid)

    assert raised.value.non_retryable is True
    assert "invalid IMAP URL" in str(raised.value)


# The workflow, on the dev server


@pytest.fixture(scope="module")
async def dev_server() -> Iterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(find_binary("temporal")),
        data_converter=pydantic_data_converter,
        ip="127.0.0.1",
        port=free_port(),
        ui=False,
    )
    try:
        yield environment
    finally:
        await environment.shutdown()


def mailbox_worker(
    environment: WorkflowEnvironment,
    task_queue: str,
    mailbox: MailboxActivities,
    **options,
) -> Worker:
    """Build a worker that runs only the mailbox workflow and its activity."""
    return Worker(
        environment.client,
        task_queue=task_queue,
        workflows=[MailboxWorkflow],
        activities=[mailbox.poll_mailbox],
        workflow_runner=workflow_runner(),
        **options,
    )


async def status_when(handle, condition, what: str, timeout: float = 30) -> MailboxStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = await handle.query(MailboxWorkflow.status)
        if condition(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}; last status {status}")
        await asyncio.sleep(0.1)


async def test_poller_reads_each_message_once(dovecot, dev_server, address):
    recorder = Recorder()
    task_queue = f"mailbox-{uuid.uuid4().hex[:8]}"
    append(dovecot, address, "before start")
    async with mailbox_worker(dev_server, task_queue, activities(dovecot, recorder)):
        handle = await dev_server.client.start_workflow(
            MailboxWorkflow.run,
            MailboxInput(
                address=address, imap_url=dovecot.imap_url, poll_interval=timedelta(hours=1)
            ),
            id=mailbox_workflow_id(address, task_queue),
            task_queue=task_queue,
        )
        await status_when(handle, lambda s: s.totals.polls == 1, "the first poll ends")
        append(dovecot, address, "after start")
        await handle.signal(MailboxWorkflow.poll_now)
        status = await status_when(handle, lambda s: s.totals.polls == 2, "the second poll ends")
        await handle.signal(MailboxWorkflow.poll_now)
        await status_when(handle, lambda s: s.totals.polls == 3, "the third poll ends")
        await handle.signal(MailboxWorkflow.stop)
        result = await handle.result()

    assert recorder.subjects == ["before start", "after start"]
    assert status.totals.messages == 2
    assert status.cursor.last_uid == 2
    assert result == "stopped after 2 message(s)"


async def test_poller_continues_as_new(dovecot, dev_server, address):
    recorder = Recorder()
    task_queue = f"mailbox-{uuid.uuid4().hex[:8]}"
    async with mailbox_worker(dev_server, task_queue, activities(dovecot, recorder)):
        handle = await dev_server.client.start_workflow(
            MailboxWorkflow.run,
            MailboxInput(
                address=address,
                imap_url=dovecot.imap_url,
                poll_interval=timedelta(milliseconds=200),
                polls_per_run=2,
            ),
            id=mailbox_workflow_id(address, task_queue),
            task_queue=task_queue,
        )
        first_run = handle.result_run_id
        # The handle without a run id follows the chain of runs.
        current = dev_server.client.get_workflow_handle(handle.id)
        append(dovecot, address, "one")
        await status_when(current, lambda s: s.totals.messages == 1, "the first message is read")
        append(dovecot, address, "two")
        status = await status_when(
            current, lambda s: s.totals.messages == 2 and s.totals.polls >= 5, "five polls"
        )
        latest = await current.describe()
        await current.signal(MailboxWorkflow.stop)
        await current.result()

    assert recorder.subjects == ["one", "two"]
    assert latest.run_id != first_run
    assert latest.status == WorkflowExecutionStatus.RUNNING
    assert status.cursor.last_uid == 2


class Hanging(Recorder):
    """Applies messages until `subject`, then hangs there, as a worker stuck in a send would."""

    def __init__(self, subject: str) -> None:
        super().__init__()
        self.hang_on = subject
        self.reached = asyncio.Event()

    async def __call__(self, raw: bytes, source: str) -> list[str]:
        if f"Subject: {self.hang_on}\r\n".encode() in raw:
            self.reached.set()
            await asyncio.Event().wait()
        return await super().__call__(raw, source)


async def test_poller_resumes_on_other_worker(dovecot, dev_server, address):
    task_queue = f"mailbox-{uuid.uuid4().hex[:8]}"
    append(dovecot, address, "one", "two", "three")
    stuck = Hanging("two")
    first_worker = mailbox_worker(
        dev_server,
        task_queue,
        activities(dovecot, stuck),
        graceful_shutdown_timeout=timedelta(seconds=0),
    )
    async with first_worker:
        handle = await dev_server.client.start_workflow(
            MailboxWorkflow.run,
            MailboxInput(address=address, imap_url=dovecot.imap_url),
            id=mailbox_workflow_id(address, task_queue),
            task_queue=task_queue,
        )
        await asyncio.wait_for(stuck.reached.wait(), timeout=30)

    # The first worker stopped in the middle of the poll: another one takes the retry.
    recorder = Recorder()
    async with mailbox_worker(dev_server, task_queue, activities(dovecot, recorder)):
        status = await status_when(
            handle, lambda s: s.totals.polls >= 1, "the retried poll ends", timeout=60
        )
        await handle.signal(MailboxWorkflow.stop)
        await handle.result()

    assert stuck.subjects == ["one"]
    assert recorder.subjects == ["two", "three"]
    assert status.cursor.last_uid == 3


async def test_stop_cancels_retried_poll(dovecot, dev_server, address):
    task_queue = f"mailbox-{uuid.uuid4().hex[:8]}"
    async with mailbox_worker(dev_server, task_queue, activities(dovecot, Recorder())):
        handle = await dev_server.client.start_workflow(
            MailboxWorkflow.run,
            MailboxInput(address=address, imap_url=f"imap://127.0.0.1:{free_port()}"),
            id=mailbox_workflow_id(address, task_queue),
            task_queue=task_queue,
        )
        await pending_attempt(handle, 2)
        await handle.signal(MailboxWorkflow.stop)
        result = await asyncio.wait_for(handle.result(), timeout=30)

    assert result == "stopped after 0 message(s)"


async def pending_attempt(handle, attempt: int, timeout: float = 30) -> str:
    """Wait until the pending poll is at `attempt`, and return its last failure."""
    deadline = time.monotonic() + timeout
    while True:
        pending = (await handle.describe()).raw_description.pending_activities
        if pending and pending[0].attempt >= attempt:
            return pending[0].last_failure.message
        if time.monotonic() > deadline:
            pytest.fail(f"the poll did not reach attempt {attempt}: {pending}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def service_on_dev_server(dovecot, dev_server, tmp_path):
    """A Sequencer and a worker on the production task queue of this module's dev server."""
    settings = replace(
        load_settings({"SEQUENCER_HOME": str(tmp_path / "home")}),
        mailbox_poll_interval=timedelta(hours=1),
    )
    service = Sequencer(settings, client=dev_server.client)
    recorder = Recorder()
    async with mailbox_worker(dev_server, TASK_QUEUE, activities(dovecot, recorder)):
        yield service, recorder
    service.close()


async def mailbox_of(service, address: str, condition, what: str) -> MailboxStatus:
    deadline = time.monotonic() + 30
    while True:
        found = [m for m in await service.mailboxes() if m.address == address]
        if found and condition(found[0]):
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}; last status {found}")
        await asyncio.sleep(0.2)


async def test_launch_moves_poller_to_new_url(service_on_dev_server, dovecot, address):
    service, recorder = service_on_dev_server
    closed = f"imap://127.0.0.1:{free_port()}"

    unreachable = await service.watch_mailbox(Sender(email=address, imap_url=closed))
    retrying = await mailbox_of(
        service, address, lambda m: m.state == "retrying", "the poll is retried"
    )
    moved = await service.watch_mailbox(Sender(email=address, imap_url=dovecot.imap_url))
    append(dovecot, address, "after the move")
    reading = await mailbox_of(
        service, address, lambda m: m.totals.messages == 1, "the message is read"
    )
    stopped = await service.mailbox_signal(address, "stop")

    assert "cannot connect" in unreachable.problem
    assert "cannot connect to the IMAP server" in retrying.problem
    assert moved.moved_from == closed
    assert moved.problem is None
    assert reading.state == "reading"
    assert reading.imap_url == dovecot.imap_url
    assert recorder.subjects == ["after the move"]
    assert "no longer read" in stopped


async def test_unknown_mailbox_signal_rejected(service_on_dev_server):
    service, _ = service_on_dev_server

    with pytest.raises(ServiceError) as raised:
        await service.mailbox_signal("nobody@example.com", "poll_now")

    assert "mailbox poller of nobody@example.com not found" in str(raised.value)
