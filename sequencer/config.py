"""Settings read from the environment, with the defaults of the local stack."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sequencer.durations import parse_duration

DEFAULT_TEMPORAL_ADDRESS = "127.0.0.1:7233"
DEFAULT_SMTP_PORT = 2525
DEFAULT_LINKEDIN_PORT = 8765
DEFAULT_UI_PORT = 8233
SANDBOX_API_KEY = "sandbox-key"
SANDBOX_WEBHOOK_SECRET = "sandbox-webhook-secret"
DEFAULT_ACCOUNT_CHECK_INTERVAL = timedelta(minutes=15)
DEFAULT_MAILBOX_POLL_INTERVAL = timedelta(minutes=1)
# An address is suppressed after this many soft bounces within the window.
DEFAULT_SOFT_BOUNCE_LIMIT = 3
DEFAULT_SOFT_BOUNCE_WINDOW = timedelta(days=7)
# The password of every mailbox of the local stack's IMAP server, used when the stack file
# names that server and SEQUENCER_IMAP_PASSWORD is unset.
SANDBOX_IMAP_PASSWORD = "sandbox-imap"


@dataclass(frozen=True)
class Settings:
    home: Path
    temporal_address: str
    temporal_namespace: str
    database_url: str
    linkedin_url: str
    linkedin_api_key: str
    smtp_username: str | None
    smtp_password: str | None
    # How often a disconnected sender account is checked.
    account_check_interval: timedelta = DEFAULT_ACCOUNT_CHECK_INTERVAL
    # The secret the LinkedIn provider signs its webhooks with.
    linkedin_webhook_secret: str = SANDBOX_WEBHOOK_SECRET
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

    @property
    def stack_file(self) -> Path:
        return self.home / "stack.json"


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read settings from the environment; `sequencer up` writes its addresses to stack.json,
    which fills whatever the environment leaves unset."""
    env = os.environ if environ is None else environ
    home = Path(env.get("SEQUENCER_HOME") or default_home(env)).expanduser().resolve()
    stack = read_stack_file(home / "stack.json")
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
    )


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


def _flag(name: str, value: str | None) -> bool:
    if value is None or not value.strip():
        return False
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: {value!r} is not a boolean; use true or false")


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
