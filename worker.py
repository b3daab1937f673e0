"""The Sequencer worker: runs lead workflows and their channel activities.

    python worker.py             # run the worker
    python worker.py --health    # exit 0 when the running worker reported in the last minute

SEQUENCER_WORKER_ROLES chooses what this process runs: `workflows` (the lead, account and
mailbox workflows, with the activities that write to the database), `email`, `linkedin` (the
activities of that channel), or all of them, the default. Channel workers are limited by
SEQUENCER_EMAIL_MAX_CONCURRENT, SEQUENCER_EMAIL_PER_SECOND and the same for LINKEDIN.

Connects to TEMPORAL_ADDRESS (default 127.0.0.1:7233) and writes to DATABASE_URL (default a
SQLite file under SEQUENCER_HOME). Refuses to start without a payload encryption key
(SEQUENCER_PAYLOAD_KEYS) unless SEQUENCER_PAYLOAD_ENCRYPTION=off. `sequencer up` runs the same
worker in its own process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RPCError

from activities.accounts import AccountActivities
from activities.email import EmailActivities
from activities.linkedin import LinkedInActivities
from activities.mailbox import CredentialsFor, ImapCredentials, MailboxActivities
from activities.records import StoreActivities, StoreSendLedger
from sequencer.codec import (
    EncryptionCodec,
    MissingPayloadKeyError,
    codec_for,
    require_payload_keys,
)
from sequencer.config import Settings, load_settings
from sequencer.models import TASK_QUEUE
from sequencer.service import Sequencer
from sequencer.storage import Store
from sequencer.temporal import (
    LeadWorker,
    MissingSearchAttributesError,
    check_search_attributes,
    client_security,
    connect_to,
    exit_without_teardown,
    lead_worker,
)

logger = logging.getLogger("sequencer.worker")

# While it runs, the worker rewrites this file in SEQUENCER_HOME every ALIVE_INTERVAL, as long
# as the Temporal server passes its health check. `python worker.py --health` (the compose
# file's health check) fails when the file is older than ALIVE_MAX_AGE.
ALIVE_FILE = "worker-alive"
ALIVE_INTERVAL = 10.0
ALIVE_MAX_AGE = 60.0


def build_worker(
    client: Client,
    settings: Settings,
    store: Store,
    linkedin: LinkedInActivities,
    accounts: AccountActivities,
    service: Sequencer,
    task_queue: str = TASK_QUEUE,
) -> LeadWorker:
    """Build a worker with every workflow and activity; the caller owns the clients.

    `service` applies the mail that the mailbox pollers read.
    """
    records = StoreActivities(store)
    mailbox = MailboxActivities(service.apply_mail, imap_credentials(settings))

    async def is_suppressed(address: str) -> bool:
        return await asyncio.to_thread(store.is_suppressed, address)

    email = EmailActivities(
        is_suppressed=is_suppressed,
        smtp_username=settings.smtp_username,
        smtp_password=settings.smtp_password,
        ledger=StoreSendLedger(store),
    )
    return lead_worker(
        client,
        task_queue,
        [
            email.send_email,
            linkedin.linkedin_step,
            records.create_task,
            records.record_activity,
            accounts.check_account,
            mailbox.poll_mailbox,
        ],
        account_check_interval=settings.account_check_interval,
        roles=settings.worker_roles,
        channel_options={
            channel: limits.worker_options() for channel, limits in settings.channel_limits.items()
        },
        # On shutdown, running activities get this long to finish before they are cancelled.
        graceful_shutdown_timeout=timedelta(seconds=20),
        max_cached_workflows=settings.workflow_cache_size,
        store=store,
    )


def imap_credentials(settings: Settings) -> CredentialsFor:
    """Return the IMAP login of a sender's mailbox from the settings: the same password for
    every mailbox, and the sender's address as user name unless SEQUENCER_IMAP_USERNAME is set."""

    def credentials_for(address: str) -> ImapCredentials | None:
        if not settings.imap_password:
            return None
        return ImapCredentials(settings.imap_username or address, settings.imap_password)

    return credentials_for


def account_activities(settings: Settings) -> AccountActivities:
    return AccountActivities(
        smtp_username=settings.smtp_username,
        smtp_password=settings.smtp_password,
        linkedin_url=settings.linkedin_url,
        linkedin_api_key=settings.linkedin_api_key,
    )


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Run the worker until `stop` is set, then let running activities finish."""
    settings.home.mkdir(parents=True, exist_ok=True)
    store = Store(settings.database_url)
    async with AsyncExitStack() as stack:
        codec = codec_for(settings)
        client = await connect_to(settings, codec)
        await check_search_attributes(client)
        log_payload_encryption(settings, codec)
        linkedin = LinkedInActivities(
            base_url=settings.linkedin_url, api_key=settings.linkedin_api_key
        )
        stack.push_async_callback(linkedin.aclose)
        accounts = account_activities(settings)
        stack.push_async_callback(accounts.aclose)
        service = Sequencer(settings, client=client)
        stack.callback(service.close)
        worker = build_worker(client, settings, store, linkedin, accounts, service)
        logger.info(
            "Worker started at %s on task queues %s",
            settings.temporal_address,
            ", ".join(worker.task_queues),
        )
        roles = set(settings.worker_roles)
        if "workflows" not in roles and not settings.channel_queues:
            logger.warning(
                "SEQUENCER_CHANNEL_QUEUES is off: leads started while it is off send from the "
                "leads' task queue, so this worker gets none of their steps. Set it on for "
                "every worker and for what starts leads (the API, the CLI), as "
                "docker-compose.yml does."
            )
        for role in settings.worker_roles:
            if role in settings.channel_limits:
                logger.info(
                    "Limits of %s steps: %s", role, settings.channel_limits[role].describe()
                )
        async with worker:
            alive = asyncio.create_task(report_alive(client, settings.home / ALIVE_FILE))
            await stop.wait()
            alive.cancel()
        logger.info("Worker stopped")
    store.close()


async def report_alive(client: Client, path: Path) -> None:
    """Rewrite `path` every ALIVE_INTERVAL while the Temporal server passes its health check."""
    while True:
        try:
            if await client.service_client.check_health(timeout=timedelta(seconds=5)):
                path.write_text(f"{time.time():.0f}\n")
            else:
                logger.warning("The Temporal server reports itself unhealthy")
        except RPCError as error:
            logger.warning("Health check of the Temporal server failed: %s", error)
        await asyncio.sleep(ALIVE_INTERVAL)


def check_alive(home: Path, now: float | None = None) -> str | None:
    """Return why the worker of `home` looks dead, or None when it reported in time."""
    path = home / ALIVE_FILE
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return f"{path} does not exist: the worker has not connected to Temporal yet"
    if age > ALIVE_MAX_AGE:
        return (
            f"{path} is {age:.0f} s old (limit {ALIVE_MAX_AGE:.0f} s): the worker stopped, or "
            "cannot reach the Temporal server; see its log"
        )
    return None


def log_payload_encryption(settings: Settings, codec: EncryptionCodec | None) -> None:
    if not settings.payload_encryption:
        logger.warning(
            "Payload encryption is off (SEQUENCER_PAYLOAD_ENCRYPTION=off): lead data is stored "
            "in Temporal in plaintext"
        )
    elif codec is not None and codec.encrypting_key_id is not None:
        logger.info("Payloads are encrypted with the key %s", codec.encrypting_key_id)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("SEQUENCER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pytransitions logs every state change at INFO: one line per lead and step.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        settings = load_settings()
    except ValueError as error:
        logger.error("Invalid setting: %s", error)
        exit_without_teardown(1)
    if sys.argv[1:] == ["--health"]:
        problem = check_alive(settings.home)
        print(problem or "worker alive", file=sys.stderr if problem else sys.stdout)
        exit_without_teardown(1 if problem else 0)
    try:
        require_payload_keys(settings)
        client_security(settings)
    except MissingPayloadKeyError as error:
        logger.error("Cannot start: %s", error)
        exit_without_teardown(1)
    except ValueError as error:
        logger.error("Invalid setting: %s", error)
        exit_without_teardown(1)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_worker(settings, stop)

    code = 0
    try:
        asyncio.run(serve())
    except MissingSearchAttributesError as error:
        logger.error("Cannot start: %s", error)
        code = 1
    except Exception:
        logger.exception("Worker failed")
        code = 1
    exit_without_teardown(code)


if __name__ == "__main__":
    main()
