"""The `poll_mailbox` activity: read a sender's new mail over IMAP and apply each message.

One poll logs in, opens INBOX read-only (so the sales rep's unread mail stays unread), lists
the UIDs above the cursor, and fetches them oldest first. Each message goes to `apply_mail`,
which classifies it (bounce, auto-reply, reply...) and changes the leads it is about. Then the
cursor moves past the message, and the activity heartbeats the cursor. A retried attempt starts
from the last heartbeat's cursor, so a long backlog is not read again from its start.

When the mailbox's UIDVALIDITY changes (the mailbox was recreated), its UIDs mean nothing any
more: the poll reads again every message since the poller's start date, and the engine, which
records each message once by Message-ID, ignores those it has applied before.

Errors: connection, TLS and login failures, and a Temporal server or database that cannot be
reached while applying a message, fail the attempt, which the workflow retries. Any other
error while applying one message is logged, and that message is passed over and reported in
the result, so that one message the engine cannot handle does not stop the mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError
from sqlalchemy.exc import OperationalError
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.service import RPCError

from sequencer.models import MailboxCursor, PollRequest, PollResult

logger = logging.getLogger(__name__)

FOLDER = "INBOX"
# Messages are fetched this many at a time.
FETCH_BATCH = 20
# Only the first bytes of a message are fetched: the headers and the report parts of a bounce
# come first, and a large attachment does not change the message's kind.
MAX_MESSAGE_BYTES = 1_000_000
IMAP_TIMEOUT = 60.0
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ImapCredentials:
    username: str
    password: str


ApplyMail = Callable[[bytes, str], Awaitable[list[str]]]
CredentialsFor = Callable[[str], ImapCredentials | None]


class MailboxActivities:
    """The mailbox activity, bound to the engine's `apply_mail(raw, source)`.

    `credentials_for(address)` returns the IMAP login of a sender's mailbox, or None when the
    worker has no password for it.
    """

    def __init__(self, apply_mail: ApplyMail, credentials_for: CredentialsFor) -> None:
        self._apply_mail = apply_mail
        self._credentials_for = credentials_for

    @activity.defn
    async def poll_mailbox(self, request: PollRequest) -> PollResult:
        cursor = _resume_cursor(request.cursor)
        credentials = self._credentials_for(request.address)
        if credentials is None:
            raise ApplicationError(
                f"no IMAP password for the mailbox of {request.address}: set "
                "SEQUENCER_IMAP_PASSWORD (and SEQUENCER_IMAP_USERNAME if the login is not the "
                "address) on the worker; polling resumes on the next retry"
            )
        try:
            client = await asyncio.to_thread(_connect, request.imap_url, credentials)
        except ApplicationError as error:
            # One line per attempt: the retries' backoff spaces the lines out.
            logger.warning("mailbox of %s not read: %s", request.address, error.message)
            raise
        try:
            return await self._read_new_mail(client, request, cursor)
        finally:
            await asyncio.to_thread(_logout, client)

    async def _read_new_mail(
        self, client: IMAPClient, request: PollRequest, cursor: MailboxCursor
    ) -> PollResult:
        selected = await asyncio.to_thread(client.select_folder, FOLDER, readonly=True)
        uidvalidity = int(selected[b"UIDVALIDITY"])
        changed = cursor.uidvalidity is not None and cursor.uidvalidity != uidvalidity
        if cursor.uidvalidity != uidvalidity:
            if changed:
                logger.warning(
                    "UIDVALIDITY of %s changed from %s to %s: reading its mail since %s again",
                    request.address,
                    cursor.uidvalidity,
                    uidvalidity,
                    request.since,
                )
            cursor = MailboxCursor(uidvalidity=uidvalidity, last_uid=0)
            criteria: list[Any] = ["SINCE", request.since]
        else:
            criteria = ["UID", f"{cursor.last_uid + 1}:*"]
        activity.heartbeat(cursor.model_dump())

        # "UID n:*" always matches the last message, even when its UID is below n.
        found = await asyncio.to_thread(client.search, criteria)
        uids = sorted(uid for uid in found if uid > cursor.last_uid)
        result = PollResult(cursor=cursor, uidvalidity_changed=changed)
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start : start + FETCH_BATCH]
            fetched = await asyncio.to_thread(
                client.fetch, batch, [f"BODY.PEEK[]<0.{MAX_MESSAGE_BYTES}>"]
            )
            for uid in batch:
                raw = _body(fetched.get(uid, {}))
                if raw is None:
                    # Expunged between the search and the fetch.
                    continue
                if not await self._apply(request.address, uid, raw):
                    result.failed_uids.append(uid)
                result.messages += 1
                cursor = MailboxCursor(uidvalidity=uidvalidity, last_uid=uid)
                result.cursor = cursor
                activity.heartbeat(cursor.model_dump())
        return result

    async def _apply(self, address: str, uid: int, raw: bytes) -> bool:
        """Apply one message; return False when it was passed over after an error."""
        source = f"{address} UID {uid}"
        try:
            lines = await self._apply_mail(raw, source)
        except (RPCError, OperationalError, OSError):
            # The Temporal server or the database is unreachable: retry the whole attempt.
            raise
        except Exception:
            logger.exception("could not apply message %s; passed over", source)
            return False
        for line in lines:
            logger.info("%s", line)
        return True


def _resume_cursor(cursor: MailboxCursor) -> MailboxCursor:
    """Return the cursor of the last heartbeat of a failed attempt, else the workflow's."""
    details = activity.info().heartbeat_details
    if not details:
        return cursor
    saved = MailboxCursor.model_validate(details[0])
    if saved.uidvalidity == cursor.uidvalidity and saved.last_uid < cursor.last_uid:
        return cursor
    return saved


def _connect(imap_url: str, credentials: ImapCredentials) -> IMAPClient:
    parts = urlsplit(imap_url)
    host = parts.hostname
    if parts.scheme not in ("imap", "imaps") or not host:
        raise ApplicationError(
            f"invalid IMAP URL {imap_url!r}: expected imap://HOST:PORT or imaps://HOST:PORT",
            non_retryable=True,
        )
    secure = parts.scheme == "imaps"
    port = parts.port or (993 if secure else 143)
    where = f"{host}:{port}"
    try:
        client = IMAPClient(
            host,
            port=port,
            ssl=secure,
            ssl_context=ssl.create_default_context() if secure else None,
            timeout=IMAP_TIMEOUT,
        )
    except (OSError, IMAPClientError, imaplib.IMAP4.error) as error:
        raise _unavailable(f"cannot connect to the IMAP server {where}: {error}") from None
    try:
        if not secure and host not in _LOOPBACK_HOSTS:
            # Never send a password in clear text over a network.
            if not client.has_capability("STARTTLS"):
                raise ApplicationError(
                    f"the IMAP server {where} offers no STARTTLS: use an imaps:// URL",
                    non_retryable=True,
                )
            client.starttls(ssl.create_default_context())
        client.login(credentials.username, credentials.password)
    except LoginError as error:
        _logout(client)
        raise _unavailable(
            f"IMAP login as {credentials.username} at {where} failed ({_text(error)}): check "
            "SEQUENCER_IMAP_USERNAME and SEQUENCER_IMAP_PASSWORD"
        ) from None
    except (OSError, IMAPClientError, imaplib.IMAP4.error) as error:
        _logout(client)
        raise _unavailable(f"IMAP session with {where} failed: {_text(error)}") from None
    return client


def _unavailable(message: str) -> ApplicationError:
    """Return the retryable error of a mailbox that cannot be read now.

    BENIGN keeps the SDK from logging each failed attempt as a WARNING with a traceback;
    the activity logs one line itself.
    """
    return ApplicationError(message, category=ApplicationErrorCategory.BENIGN)


def _logout(client: IMAPClient) -> None:
    with contextlib.suppress(Exception):
        client.logout()


def _body(fields: dict[bytes, Any]) -> bytes | None:
    for key, value in fields.items():
        if key.startswith(b"BODY[") and isinstance(value, bytes):
            return value
    return None


def _text(error: Exception) -> str:
    value = error.args[0] if error.args else error
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
