"""Settings read from the environment, with the defaults of the local stack."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sequencer.codec import (
    KEYS_FILE_VARIABLE,
    KEYS_VARIABLE,
    LOCAL_KEY_FILE,
    SWITCH_VARIABLE,
    PayloadKey,
    parse_keys,
    read_key_file,
)
from sequencer.durations import parse_duration
from sequencer.models import QUEUED_CHANNELS, WORKER_ROLES

DEFAULT_TEMPORAL_ADDRESS = "127.0.0.1:7233"
DEFAULT_SMTP_PORT = 2525
DEFAULT_LINKEDIN_PORT = 8765
DEFAULT_UI_PORT = 8233
SANDBOX_API_KEY = "sandbox-key"
SANDBOX_WEBHOOK_SECRET = "sandbox-webhook-secret"
DEFAULT_ACCOUNT_CHECK_INTERVAL = timedelta(minutes=15)
DEFAULT_MAILBOX_POLL_INTERVAL = timedelta(minutes=1)
# Workflows a worker keeps in memory between their tasks. A lead workflow in the cache took
# about 0.4 MB (532 MB of resident memory with the SDK's default of 1,000, at 10,000 sleeping
# leads), so this keeps the worker near 200 MB. A workflow that is not cached is replayed from
# its history when it wakes up, which costs CPU time but no correctness.
DEFAULT_WORKFLOW_CACHE_SIZE = 250
# An address is suppressed after this many soft bounces within the window.
DEFAULT_SOFT_BOUNCE_LIMIT = 3
DEFAULT_SOFT_BOUNCE_WINDOW = timedelta(days=7)
# The password of every mailbox of the local stack's IMAP server, used when the stack file
# names that server and SEQUENCER_IMAP_PASSWORD is unset.
SANDBOX_IMAP_PASSWORD = "sandbox-imap"


# Activities a Temporal worker runs at once when no limit is set (the SDK's fixed tuner).
SDK_MAX_CONCURRENT = 100


@dataclass(frozen=True)
class ChannelLimits:
    """Limits of the workers of one channel's task queue. None leaves the SDK's default."""

    # Activities one worker process runs at once (default SDK_MAX_CONCURRENT).
    max_concurrent: int | None = None
    # Activities started per second on the channel's queue, across all its workers. The
    # Temporal server enforces it. The campaign's caps and spacing per sender apply as well.
    per_second: float | None = None

    def describe(self) -> str:
        """Describe the limits for a log line, such as `20 at once, 2 a second`."""
        at_once = self.max_concurrent or SDK_MAX_CONCURRENT
        rate = "no rate limit" if self.per_second is None else f"{self.per_second:g} a second"
        return f"{at_once} at once, {rate}"

    def worker_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.max_concurrent is not None:
            options["max_concurrent_activities"] = self.max_concurrent
        if self.per_second is not None:
            options["max_task_queue_activities_per_second"] = self.per_second
        return options


@dataclass(frozen=True)
class Settings:
    home: Path
    temporal_address: str
    temporal_namespace: str
    database_url: str
    linkedin_url: str
    linkedin_api_key: str = field(repr=False)
    smtp_username: str | None
    smtp_password: str | None = field(repr=False)
    # How often a disconnected sender account is checked.
    account_check_interval: timedelta = DEFAULT_ACCOUNT_CHECK_INTERVAL
    # The secret the LinkedIn provider signs its webhooks with.
    linkedin_webhook_secret: str = field(default=SANDBOX_WEBHOOK_SECRET, repr=False)
    # Email provider webhooks, each off until its settings are set. SES is on when
    # ses_webhook_enabled is true or ses_topic_arns is not empty.
    ses_webhook_enabled: bool = False
    # The SNS topics whose messages are accepted. Empty accepts every topic.
    ses_topic_arns: tuple[str, ...] = ()
    # The verification key of SendGrid's signed event webhook (base64 DER, as SendGrid shows it).
    sendgrid_public_key: str | None = None
    mailgun_signing_key: str | None = field(default=None, repr=False)
    # The basic auth credentials put in the Postmark webhook URL.
    postmark_webhook_user: str | None = None
    postmark_webhook_password: str | None = field(default=None, repr=False)
    # The IMAP server of senders whose campaign names none (imap:// or imaps://), the login
    # (default: the sender's address) and password of their mailboxes, and how often a
    # mailbox is read.
    imap_url: str | None = None
    imap_username: str | None = None
    imap_password: str | None = field(default=None, repr=False)
    mailbox_poll_interval: timedelta = DEFAULT_MAILBOX_POLL_INTERVAL
    soft_bounce_limit: int = DEFAULT_SOFT_BOUNCE_LIMIT
    soft_bounce_window: timedelta = DEFAULT_SOFT_BOUNCE_WINDOW
    # The keys of the payload codec (sequencer.codec): the first encrypts, all decrypt. With
    # payload_encryption false, new payloads are written in plaintext.
    payload_keys: tuple[PayloadKey, ...] = field(default=(), repr=False)
    payload_encryption: bool = True
    # Where payload_keys come from, as error messages name it.
    payload_keys_source: str = KEYS_VARIABLE
    # Connection security for a Temporal server outside this machine (Temporal Cloud, a
    # cluster with TLS), under the variable names of Temporal's own clients: TEMPORAL_API_KEY,
    # TEMPORAL_TLS, TEMPORAL_TLS_CLIENT_CERT_PATH, TEMPORAL_TLS_CLIENT_KEY_PATH and
    # TEMPORAL_TLS_SERVER_CA_CERT_PATH. TLS is on when an API key or a client certificate is set.
    workflow_cache_size: int = DEFAULT_WORKFLOW_CACHE_SIZE
    # The task queues a worker process polls (SEQUENCER_WORKER_ROLES), and the limits of each
    # channel's workers by channel (SEQUENCER_EMAIL_MAX_CONCURRENT, SEQUENCER_EMAIL_PER_SECOND
    # and the same for LINKEDIN).
    worker_roles: tuple[str, ...] = WORKER_ROLES
    channel_limits: Mapping[str, ChannelLimits] = field(default_factory=dict)
    # Whether the leads this deployment starts send from their channels' task queues
    # (SEQUENCER_CHANNEL_QUEUES), for separate channel workers. Off, they send from the lead's
    # queue, where Temporal hands a step to the worker that scheduled it (eager execution).
    channel_queues: bool = False
    temporal_api_key: str | None = field(default=None, repr=False)
    temporal_tls: bool = False
    temporal_tls_client_cert: Path | None = None
    temporal_tls_client_key: Path | None = None
    temporal_tls_server_ca_cert: Path | None = None
    # The origins (scheme://host:port) of Temporal UIs allowed to call the codec server.
    codec_cors_origins: tuple[str, ...] = ()

    @property
    def stack_file(self) -> Path:
        return self.home / "stack.json"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read settings from the environment; `sequencer up` writes its addresses to stack.json,
    which fills whatever the environment leaves unset."""
    env = os.environ if environ is None else environ
    home = Path(env.get("SEQUENCER_HOME") or default_home(env)).expanduser().resolve()
    stack = read_stack_file(home / "stack.json")
    payload_keys, payload_keys_source = _payload_keys(env, home)
    return Settings(
        home=home,
        temporal_address=env.get("TEMPORAL_ADDRESS")
        or stack.get("temporal_address", DEFAULT_TEMPORAL_ADDRESS),
        temporal_namespace=env.get("TEMPORAL_NAMESPACE", "default"),
        database_url=env.get("DATABASE_URL") or f"sqlite:///{home / 'sequencer.db'}",
        linkedin_url=env.get("SEQUENCER_LINKEDIN_URL")
        or stack.get("linkedin_url", f"http://127.0.0.1:{DEFAULT_LINKEDIN_PORT}"),
        linkedin_api_key=env.get("SEQUENCER_LINKEDIN_API_KEY", SANDBOX_API_KEY),
        smtp_username=env.get("SEQUENCER_SMTP_USERNAME") or None,
        smtp_password=env.get("SEQUENCER_SMTP_PASSWORD") or None,
        account_check_interval=_interval(
            "SEQUENCER_ACCOUNT_CHECK_INTERVAL",
            env.get("SEQUENCER_ACCOUNT_CHECK_INTERVAL"),
            DEFAULT_ACCOUNT_CHECK_INTERVAL,
        ),
        linkedin_webhook_secret=env.get("SEQUENCER_LINKEDIN_WEBHOOK_SECRET")
        or SANDBOX_WEBHOOK_SECRET,
        ses_webhook_enabled=_flag("SEQUENCER_SES_ENABLED", env.get("SEQUENCER_SES_ENABLED")),
        ses_topic_arns=tuple(
            arn.strip() for arn in env.get("SEQUENCER_SES_TOPIC_ARNS", "").split(",") if arn.strip()
        ),
        sendgrid_public_key=env.get("SEQUENCER_SENDGRID_PUBLIC_KEY") or None,
        mailgun_signing_key=env.get("SEQUENCER_MAILGUN_SIGNING_KEY") or None,
        postmark_webhook_user=env.get("SEQUENCER_POSTMARK_WEBHOOK_USER") or None,
        postmark_webhook_password=env.get("SEQUENCER_POSTMARK_WEBHOOK_PASSWORD") or None,
        imap_url=_imap_url(env.get("SEQUENCER_IMAP_URL") or stack.get("imap_url") or None),
        imap_username=env.get("SEQUENCER_IMAP_USERNAME") or None,
        imap_password=env.get("SEQUENCER_IMAP_PASSWORD")
        or (SANDBOX_IMAP_PASSWORD if stack.get("imap_url") else None),
        mailbox_poll_interval=_interval(
            "SEQUENCER_MAILBOX_POLL_INTERVAL",
            env.get("SEQUENCER_MAILBOX_POLL_INTERVAL") or stack.get("mailbox_poll_interval"),
            DEFAULT_MAILBOX_POLL_INTERVAL,
        ),
        soft_bounce_limit=_count(
            "SEQUENCER_SOFT_BOUNCE_LIMIT",
            env.get("SEQUENCER_SOFT_BOUNCE_LIMIT"),
            DEFAULT_SOFT_BOUNCE_LIMIT,
        ),
        soft_bounce_window=_interval(
            "SEQUENCER_SOFT_BOUNCE_WINDOW",
            env.get("SEQUENCER_SOFT_BOUNCE_WINDOW"),
            DEFAULT_SOFT_BOUNCE_WINDOW,
        ),
        payload_keys=payload_keys,
        payload_keys_source=payload_keys_source,
        workflow_cache_size=_count(
            "SEQUENCER_WORKFLOW_CACHE_SIZE",
            env.get("SEQUENCER_WORKFLOW_CACHE_SIZE"),
            DEFAULT_WORKFLOW_CACHE_SIZE,
        ),
        worker_roles=_roles("SEQUENCER_WORKER_ROLES", env.get("SEQUENCER_WORKER_ROLES")),
        channel_limits=_channel_limits(env),
        channel_queues=_flag("SEQUENCER_CHANNEL_QUEUES", env.get("SEQUENCER_CHANNEL_QUEUES")),
        **_temporal_security(env),
        payload_encryption=_switch(SWITCH_VARIABLE, env.get(SWITCH_VARIABLE), default=True),
        codec_cors_origins=_origins(
            "SEQUENCER_CODEC_CORS_ORIGINS", env.get("SEQUENCER_CODEC_CORS_ORIGINS", "")
        ),
    )


def _payload_keys(
    env: dict[str, str] | os._Environ[str], home: Path
) -> tuple[tuple[PayloadKey, ...], str]:
    """Return the payload keys and where they come from: SEQUENCER_PAYLOAD_KEYS, else the
    file SEQUENCER_PAYLOAD_KEYS_FILE names, else the local stack's key file when it exists."""
    inline = env.get(KEYS_VARIABLE, "").strip()
    path = env.get(KEYS_FILE_VARIABLE, "").strip()
    if inline and path:
        raise ValueError(
            f"{KEYS_VARIABLE} and {KEYS_FILE_VARIABLE} are both set: keep only one of them"
        )
    if inline:
        keys = parse_keys(inline, KEYS_VARIABLE)
        return keys, KEYS_VARIABLE
    if path:
        source = f"{KEYS_FILE_VARIABLE} ({path})"
        return read_key_file(Path(path).expanduser(), source), source
    local = home / LOCAL_KEY_FILE
    if local.exists():
        source = f"the local stack's key file {local}"
        return read_key_file(local, source), source
    return (), KEYS_VARIABLE


def _origins(name: str, value: str) -> tuple[str, ...]:
    """Parse comma-separated origins such as https://temporal.example.com:8443."""
    origins = []
    for origin in (item.strip().rstrip("/") for item in value.split(",")):
        if not origin:
            continue
        if not _is_origin(origin):
            raise ValueError(
                f"{name}: {origin!r} is not an origin; write scheme://host[:port] with no path, "
                "such as https://temporal.example.com"
            )
        origins.append(origin)
    return tuple(origins)


def _is_origin(text: str) -> bool:
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        return False
    if port == 0:
        return False
    extras = parts.path or parts.query or parts.fragment or parts.username or parts.password
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not extras


def _imap_url(value: str | None) -> str | None:
    # Imported here because the campaign module imports much more than settings need.
    from sequencer.campaign import check_imap_url

    if value is None:
        return None
    try:
        return check_imap_url(value)
    except ValueError as error:
        raise ValueError(f"SEQUENCER_IMAP_URL: {error}") from None


def _count(name: str, value: str | None, default: int) -> int:
    if not value:
        return default
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"{name}: {value!r} is not a whole number of 1 or more; use a number such as 3"
        )
    return count


def _roles(name: str, value: str | None) -> tuple[str, ...]:
    """Parse worker roles separated by commas or spaces. `all`, or no value, means every role."""
    words = (value or "").replace(",", " ").split()
    if not words or words == ["all"]:
        return WORKER_ROLES
    if "all" in words:
        raise ValueError(
            f"{name}: {value!r} combines all with other roles; use all alone, or list the roles"
        )
    unknown = [word for word in words if word not in WORKER_ROLES]
    if unknown:
        raise ValueError(
            f"{name}: unknown role {unknown[0]!r}; use all, or one or more of "
            f"{', '.join(WORKER_ROLES)} separated by commas"
        )
    return tuple(role for role in WORKER_ROLES if role in words)


def _channel_limits(env: Mapping[str, str]) -> dict[str, ChannelLimits]:
    limits = {}
    for channel in QUEUED_CHANNELS:
        prefix = f"SEQUENCER_{channel.upper()}"
        concurrent = env.get(f"{prefix}_MAX_CONCURRENT")
        per_second = env.get(f"{prefix}_PER_SECOND")
        limits[channel] = ChannelLimits(
            max_concurrent=_count(f"{prefix}_MAX_CONCURRENT", concurrent, 0) or None,
            per_second=_rate(f"{prefix}_PER_SECOND", per_second),
        )
    return limits


def _rate(name: str, value: str | None) -> float | None:
    if not value:
        return None
    try:
        rate = float(value)
    except ValueError:
        rate = 0.0
    if not rate > 0 or rate == float("inf"):
        raise ValueError(
            f"{name}: {value!r} is not a positive number; use activities per second, such as 5 "
            "or 0.5"
        )
    return rate


def _interval(name: str, value: str | None, default: timedelta) -> timedelta:
    if not value:
        return default
    try:
        interval = parse_duration(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if interval <= timedelta(0):
        raise ValueError(f"{name}: {value!r} is not positive; use a duration such as 15m")
    return interval


def _temporal_security(env: Mapping[str, str]) -> dict[str, Any]:
    def path(name: str) -> Path | None:
        value = env.get(name, "").strip()
        return Path(value).expanduser() if value else None

    api_key = env.get("TEMPORAL_API_KEY", "").strip() or None
    client_cert = path("TEMPORAL_TLS_CLIENT_CERT_PATH")
    client_key = path("TEMPORAL_TLS_CLIENT_KEY_PATH")
    if (client_cert is None) != (client_key is None):
        raise ValueError(
            "TEMPORAL_TLS_CLIENT_CERT_PATH and TEMPORAL_TLS_CLIENT_KEY_PATH go together: set "
            "both for mutual TLS, or neither"
        )
    server_ca = path("TEMPORAL_TLS_SERVER_CA_CERT_PATH")
    implied = api_key is not None or client_cert is not None or server_ca is not None
    return {
        "temporal_api_key": api_key,
        "temporal_tls": _switch("TEMPORAL_TLS", env.get("TEMPORAL_TLS"), default=implied),
        "temporal_tls_client_cert": client_cert,
        "temporal_tls_client_key": client_key,
        "temporal_tls_server_ca_cert": server_ca,
    }


def _flag(name: str, value: str | None) -> bool:
    return _switch(name, value, default=False)


def _switch(name: str, value: str | None, *, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: {value!r} is not a boolean; use on or off (or true or false)")


def default_home(env: dict[str, str] | os._Environ[str]) -> Path:
    """Return the per-user data directory, the same whatever the current directory is.

    Every command must use the worker's database, so the default must not depend on where a
    command is run from.
    """
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "sequencer"


def read_stack_file(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
