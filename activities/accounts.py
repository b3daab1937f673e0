"""Health checks of the sender accounts that the channels send through.

An account interruption (a disconnected inbox, expired credentials, a logged-out LinkedIn
session) pauses a lead's enrollment instead of failing it. The `check_account` activity reports
whether the account works again, so the enrollment can resume by itself.

A check never sends anything to a lead. It returns `AccountCheck(ok=False, detail=...)` for
every network, TLS, login, reply or provider problem instead of raising, because the caller
retries on its own schedule. It raises only for invalid arguments, which are bugs in the caller.

    email     connect as `send_email` does, EHLO, AUTH when credentials are set,
              MAIL FROM:<sender>, RSET, QUIT
    linkedin  GET {provider}/v1/account with the Bearer API key; 200 {"status": "connected"} is ok
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from typing import Any, Literal
from urllib.parse import urlsplit

import aiosmtplib
import httpx
from pydantic import BaseModel, model_validator
from temporalio import activity

from activities.email import SmtpServer, format_reply, sender_hint, smtp_client
from activities.linkedin import json_object
from sequencer.addresses import ascii_email
from sequencer.campaign import Sender
from sequencer.smtp_replies import classify_smtp_reply

logger = logging.getLogger(__name__)

LINKEDIN_ACCOUNT_ENDPOINT = "/v1/account"
LINKEDIN_CONNECTED_STATUS = "connected"
DEFAULT_CHECK_TIMEOUT = 20.0

_LOGIN_HINT = (
    "Check the SMTP username and password (SEQUENCER_SMTP_USERNAME, SEQUENCER_SMTP_PASSWORD)"
)
_RECONNECT_HINT = (
    "Reconnect the LinkedIn account at the provider, or set SEQUENCER_LINKEDIN_API_KEY to a "
    "valid key if the key was rejected"
)
_SENDER_ADDRESS_HINT = "check that the sender's email address belongs to the account that logs in"
# Maximum number of characters of a provider's response text that a detail quotes.
_MAX_QUOTED_RESPONSE = 200


class AccountCheckInput(BaseModel):
    """The account to check: the email `sender`, which is required for email, or the worker's
    LinkedIn provider account."""

    channel: Literal["email", "linkedin"]
    sender: Sender | None = None

    @model_validator(mode="after")
    def _require_sender_for_email(self) -> AccountCheckInput:
        if self.channel == "email" and self.sender is None:
            raise ValueError("an email account check needs the sender to check")
        return self


class AccountCheck(BaseModel):
    """The result of one account check. `detail` is one line for the operator."""

    ok: bool
    detail: str


async def check_email_account(
    sender: Sender,
    *,
    username: str | None,
    password: str | None,
    timeout: float = DEFAULT_CHECK_TIMEOUT,
) -> AccountCheck:
    """Check that the sender's SMTP server accepts the sender, without sending a message.

    The connection is made as `send_email` makes it: TLS on connect for smtps://, STARTTLS
    for smtp:// when the server offers it, and AUTH when `username` is set. Then MAIL FROM
    with the sender's address, RSET and QUIT. `timeout` is the limit in seconds for connecting
    and for each SMTP command, so a slow server can take several times as long in total.
    Raises ValueError for a password without a username or a timeout that is not positive.
    """
    if password is not None and username is None:
        raise ValueError("an SMTP password was given without an SMTP username")
    if timeout <= 0:
        raise ValueError(f"invalid SMTP timeout {timeout!r}: expected a positive number")

    try:
        server = SmtpServer.from_url(sender.smtp_url)
    except ValueError as error:
        detail = f"{error}. Fix the sender's smtp_url in the campaign file"
        return _email_result(sender, ok=False, detail=detail)

    client = smtp_client(server, username=username, password=password, timeout=timeout)
    try:
        ok, detail = await _try_mail_from(client, server, sender, timeout)
    finally:
        await _end_session(client)
    return _email_result(sender, ok=ok, detail=detail)


async def _try_mail_from(
    client: aiosmtplib.SMTP, server: SmtpServer, sender: Sender, timeout: float
) -> tuple[bool, str]:
    """Connect, log in and send MAIL FROM, returning whether the sender was accepted and the
    detail. Leaves the connection open unless it failed below SMTP."""
    try:
        # connect() sends EHLO when it looks for STARTTLS, and logs in when credentials are
        # set. It closes the connection, without QUIT, when any of that fails.
        await client.connect()
    except (aiosmtplib.SMTPException, OSError) as error:
        return False, _describe_connection_error(server, error, timeout)

    address = ascii_email(sender.email)
    options: list[str] = []
    encoding = "ascii"
    try:
        if not address.isascii():
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if not client.supports_extension("smtputf8"):
                return False, (
                    f"SMTP server {server} does not support SMTPUTF8, which the sender's address "
                    "with a non-ASCII local part needs. Use an ASCII sender address"
                )
            options = ["SMTPUTF8"]
            encoding = "utf-8"
        # mail() sends EHLO first when no EHLO or HELO was sent yet, as send_message() does.
        await client.mail(address, options=options, encoding=encoding)
    except aiosmtplib.SMTPSenderRefused as error:
        return False, _describe_sender_refused(server, error)
    except aiosmtplib.SMTPResponseException as error:
        reply = format_reply(error.code, error.message)
        return False, f"SMTP server {server} sent an unexpected reply before MAIL FROM: {reply}"
    except (aiosmtplib.SMTPException, OSError) as error:
        # A QUIT on a dropped or silent connection would only wait for the timeout again.
        client.close()
        return False, _describe_session_error(server, error, timeout)
    return True, f"SMTP server {server} accepted MAIL FROM for the sender"


async def _end_session(client: aiosmtplib.SMTP) -> None:
    """Send RSET and QUIT on a connection that is still open, then close it."""
    try:
        if client.is_connected:
            await client.rset()
        if client.is_connected:
            await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        pass  # the check's verdict is already known; a failed RSET or QUIT changes nothing
    finally:
        client.close()


def _describe_connection_error(server: SmtpServer, error: Exception, timeout: float) -> str:
    """Describe a failure to connect, start TLS or log in, with what the operator can do."""
    cause = error.__cause__ if isinstance(error, aiosmtplib.SMTPConnectError) else error

    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        reply = format_reply(error.code, error.message)
        if 400 <= error.code <= 499:
            return f"SMTP server {server} deferred the login: {reply}. A later check may pass"
        return f"SMTP server {server} rejected the login: {reply}. {_LOGIN_HINT}"
    if isinstance(error, aiosmtplib.SMTPResponseException):
        reply = format_reply(error.code, error.message)
        return f"SMTP server {server} is not accepting connections: {reply}"
    if isinstance(error, aiosmtplib.SMTPTimeoutError | aiosmtplib.SMTPServerDisconnected):
        return _describe_session_error(server, error, timeout)
    if isinstance(cause, ConnectionRefusedError):
        return (
            f"SMTP server {server} refused the connection. Check that the server is running "
            "and that the sender's smtp_url has the right host and port"
        )
    if isinstance(cause, ssl.SSLError):
        return (
            f"TLS with SMTP server {server} failed: {cause}. Check that smtps:// is used only "
            "for implicit TLS (usually port 465) and smtp:// for STARTTLS or plain SMTP, and "
            "that the server's certificate is valid"
        )
    if isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_NONAME:
        return f"SMTP server host {server.host!r} was not found. Check the sender's smtp_url"
    if isinstance(error, aiosmtplib.SMTPConnectError | OSError):
        return f"connecting to SMTP server {server} failed: {error}"
    # Other SMTPException: the server offers no AUTH, or no STARTTLS where it is needed.
    return (
        f"SMTP server {server} cannot be used as configured: {error}. Unset "
        "SEQUENCER_SMTP_USERNAME and SEQUENCER_SMTP_PASSWORD for a server without AUTH"
    )


def _describe_session_error(server: SmtpServer, error: Exception, timeout: float) -> str:
    if isinstance(error, aiosmtplib.SMTPTimeoutError):
        return (
            f"SMTP server {server} did not respond within {timeout:g} seconds. Check that the "
            "sender's smtp_url has the right host and port and that no firewall drops the "
            "connection"
        )
    if isinstance(error, aiosmtplib.SMTPServerDisconnected):
        return f"SMTP server {server} closed the connection: {error}"
    return f"the session with SMTP server {server} failed: {error}"


def _describe_sender_refused(server: SmtpServer, error: aiosmtplib.SMTPSenderRefused) -> str:
    reply = format_reply(error.code, error.message)
    hint = _SENDER_ADDRESS_HINT
    if 400 <= error.code <= 599:
        verdict = classify_smtp_reply(error.code, reply)
        if verdict.kind == "sender":
            hint = sender_hint(verdict.subtype, default=_SENDER_ADDRESS_HINT)
        elif error.code < 500:
            hint = "wait until the server accepts the sender again, which a later check shows"
    return f"SMTP server {server} rejected MAIL FROM for the sender: {reply}. To resume, {hint}"


def _email_result(sender: Sender, *, ok: bool, detail: str) -> AccountCheck:
    detail = " ".join(detail.split())
    if ok:
        logger.info("email account check passed: %s", detail)
    else:
        # Server replies can quote the sender's address, which is not logged.
        redacted = re.sub(re.escape(sender.email), "(sender)", detail, flags=re.IGNORECASE)
        logger.warning("email account check failed: %s", redacted)
    return AccountCheck(ok=ok, detail=detail)


async def check_linkedin_account(
    base_url: str,
    api_key: str,
    client: httpx.AsyncClient | None = None,
    timeout: float = DEFAULT_CHECK_TIMEOUT,
) -> AccountCheck:
    """Ask the LinkedIn provider whether the account behind `api_key` is connected.

    Sends `GET {base_url}/v1/account` with `Authorization: Bearer <api_key>`. `timeout` is the
    limit in seconds for the request, also with a `client` passed in, which the caller closes.
    """
    provider = base_url.rstrip("/")
    http = client if client is not None else httpx.AsyncClient()
    try:
        response = await http.get(
            provider + LINKEDIN_ACCOUNT_ENDPOINT,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )
    except httpx.TimeoutException as error:
        detail = (
            f"the LinkedIn provider at {provider} did not respond within {timeout:g} seconds "
            f"({type(error).__name__}). A later check may pass"
        )
        return _linkedin_result(ok=False, detail=detail)
    except (httpx.RequestError, httpx.InvalidURL) as error:
        detail = (
            f"the request to the LinkedIn provider at {provider} failed "
            f"({type(error).__name__}: {error}). Check that the provider is running and that "
            "SEQUENCER_LINKEDIN_URL is right"
        )
        return _linkedin_result(ok=False, detail=detail)
    finally:
        if client is None:
            await http.aclose()

    ok, detail = _judge_linkedin_response(provider, response)
    return _linkedin_result(ok=ok, detail=detail)


def _judge_linkedin_response(provider: str, response: httpx.Response) -> tuple[bool, str]:
    status = response.status_code
    payload = json_object(response)

    if 200 <= status < 300:
        account_status = payload.get("status")
        if account_status == LINKEDIN_CONNECTED_STATUS:
            return True, "the LinkedIn provider reports the account as connected"
        if account_status is None:
            return False, (
                f"the LinkedIn provider returned HTTP {status} without an account status. "
                "Check that SEQUENCER_LINKEDIN_URL points to the provider's API"
            )
        return False, (
            f"the LinkedIn provider reports the account as {account_status!r}, not "
            f"{LINKEDIN_CONNECTED_STATUS!r}. {_RECONNECT_HINT}"
        )

    error = _describe_http_error(status, payload, response)
    if status in (401, 403):
        return False, f"the LinkedIn provider rejected the request with {error}. {_RECONNECT_HINT}"
    if status == 429 or status >= 500:
        return False, f"the LinkedIn provider returned {error}. A later check may pass"
    return False, (
        f"unexpected {error} from the LinkedIn provider at {provider}. Check "
        f"SEQUENCER_LINKEDIN_URL and that the provider supports GET {LINKEDIN_ACCOUNT_ENDPOINT}"
    )


def _describe_http_error(status: int, payload: dict[str, Any], response: httpx.Response) -> str:
    """Return `HTTP 401 (session_expired: ...)`, with the response text when it is not JSON."""
    parts = [str(part) for part in (payload.get("error"), payload.get("detail")) if part]
    if not parts and not payload:
        text = " ".join(response.text.split())[:_MAX_QUOTED_RESPONSE]
        parts = [text] if text else []
    return f"HTTP {status} ({': '.join(parts)})" if parts else f"HTTP {status}"


def _linkedin_result(*, ok: bool, detail: str) -> AccountCheck:
    detail = " ".join(detail.split())
    if ok:
        logger.info("LinkedIn account check passed")
    else:
        logger.warning("LinkedIn account check failed: %s", detail)
    return AccountCheck(ok=ok, detail=detail)


class AccountActivities:
    """The `check_account` activity, with the worker's SMTP credentials and LinkedIn provider.

    A LinkedIn client passed in is used as given, and the caller closes it. Without one, the
    activities create a client when a provider is configured, and `aclose()` closes it.
    """

    def __init__(
        self,
        *,
        smtp_username: str | None = None,
        smtp_password: str | None = None,
        linkedin_url: str | None = None,
        linkedin_api_key: str | None = None,
        linkedin_client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_CHECK_TIMEOUT,
    ) -> None:
        """Set up the checks. `timeout` is in seconds, as in the check functions."""
        if smtp_password is not None and smtp_username is None:
            raise ValueError("an SMTP password was given without an SMTP username")
        if timeout <= 0:
            raise ValueError(f"invalid check timeout {timeout!r}: expected a positive number")
        if linkedin_url is not None:
            parts = urlsplit(linkedin_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"invalid LinkedIn provider URL {linkedin_url!r}: expected "
                    "http://HOST:PORT or https://HOST. Check SEQUENCER_LINKEDIN_URL"
                )
            if not linkedin_api_key:
                raise ValueError(
                    "the LinkedIn provider API key is empty. Set SEQUENCER_LINKEDIN_API_KEY"
                )
        self._smtp_username = smtp_username
        self._smtp_password = smtp_password
        self._linkedin_url = linkedin_url
        self._linkedin_api_key = linkedin_api_key or ""
        self._timeout = timeout
        self._owns_client = linkedin_client is None and linkedin_url is not None
        self._client = linkedin_client
        if self._owns_client:
            self._client = httpx.AsyncClient()

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    @activity.defn(name="check_account")
    async def check_account(self, input: AccountCheckInput) -> AccountCheck:
        """Check whether the sender account of one channel can be used now.

        Returns ok=False with a detail, instead of raising, for network, TLS, login, SMTP reply
        and HTTP status problems of the account, its server or its provider.
        """
        if input.channel == "email":
            # The input model requires a sender for email checks.
            assert input.sender is not None
            return await check_email_account(
                input.sender,
                username=self._smtp_username,
                password=self._smtp_password,
                timeout=self._timeout,
            )

        if self._linkedin_url is None:
            return _linkedin_result(
                ok=False,
                detail="no LinkedIn provider is configured for this worker. Set "
                "SEQUENCER_LINKEDIN_URL and SEQUENCER_LINKEDIN_API_KEY and restart the worker",
            )
        return await check_linkedin_account(
            self._linkedin_url, self._linkedin_api_key, self._client, self._timeout
        )
