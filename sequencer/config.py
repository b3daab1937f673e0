"""Settings read from the environment, with the defaults of the local stack."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEMPORAL_ADDRESS = "127.0.0.1:7233"
DEFAULT_SMTP_PORT = 2525
DEFAULT_LINKEDIN_PORT = 8765
DEFAULT_UI_PORT = 8233
SANDBOX_API_KEY = "sandbox-key"


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
    )


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
