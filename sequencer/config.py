"""Settings read from the environment, with the defaults of the local stack."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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
        account_check_interval=_interval(env.get("SEQUENCER_ACCOUNT_CHECK_INTERVAL")),
        linkedin_webhook_secret=env.get("SEQUENCER_LINKEDIN_WEBHOOK_SECRET")
        or SANDBOX_WEBHOOK_SECRET,
    )


def _interval(value: str | None) -> timedelta:
    if not value:
        return DEFAULT_ACCOUNT_CHECK_INTERVAL
    try:
        interval = parse_duration(value)
    except ValueError as error:
        raise ValueError(f"SEQUENCER_ACCOUNT_CHECK_INTERVAL: {error}") from None
    if interval <= timedelta(0):
        raise ValueError(
            f"SEQUENCER_ACCOUNT_CHECK_INTERVAL: {value!r} is not positive; use a duration "
            "such as 15m"
        )
    return interval


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
