"""Settings read from the environment: defaults, the stack file, and invalid values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from sequencer.config import SANDBOX_IMAP_PASSWORD, load_settings


def settings_for(tmp_path: Path, **variables: str):
    return load_settings({"SEQUENCER_HOME": str(tmp_path), **variables})


def test_mailbox_defaults(tmp_path):
    settings = settings_for(tmp_path)

    assert settings.imap_url is None
    assert settings.imap_password is None
    assert settings.mailbox_poll_interval == timedelta(minutes=1)
    assert settings.soft_bounce_limit == 3
    assert settings.soft_bounce_window == timedelta(days=7)


def test_stack_file_gives_imap_server(tmp_path):
    (tmp_path / "stack.json").write_text(
        json.dumps({"imap_url": "imap://127.0.0.1:1143", "mailbox_poll_interval": "2s"})
    )

    settings = settings_for(tmp_path)

    assert settings.imap_url == "imap://127.0.0.1:1143"
    assert settings.imap_password == SANDBOX_IMAP_PASSWORD
    assert settings.mailbox_poll_interval == timedelta(seconds=2)


def test_environment_wins_over_stack_file(tmp_path):
    (tmp_path / "stack.json").write_text(json.dumps({"imap_url": "imap://127.0.0.1:1143"}))

    settings = settings_for(
        tmp_path,
        SEQUENCER_IMAP_URL="imaps://imap.acme.test",
        SEQUENCER_IMAP_PASSWORD="secret",
        SEQUENCER_SOFT_BOUNCE_LIMIT="5",
        SEQUENCER_SOFT_BOUNCE_WINDOW="2d",
    )

    assert settings.imap_url == "imaps://imap.acme.test"
    assert settings.imap_password == "secret"
    assert settings.soft_bounce_limit == 5
    assert settings.soft_bounce_window == timedelta(days=2)


def test_imap_password_not_in_repr(tmp_path):
    settings = settings_for(tmp_path, SEQUENCER_IMAP_PASSWORD="very-secret-value")

    assert "very-secret-value" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SEQUENCER_IMAP_URL", "pop3://x", "expected imap://HOST:PORT"),
        ("SEQUENCER_IMAP_URL", "imap://127.0.0.1:99999", "the port must be 1 to 65535"),
        ("SEQUENCER_IMAP_URL", "imap://host/Archive", "remove the path"),
        ("SEQUENCER_IMAP_URL", "imap://user:pw@host", "credentials must not be written"),
        ("SEQUENCER_MAILBOX_POLL_INTERVAL", "abc", "SEQUENCER_MAILBOX_POLL_INTERVAL"),
        ("SEQUENCER_MAILBOX_POLL_INTERVAL", "0s", "is not positive"),
        ("SEQUENCER_SOFT_BOUNCE_LIMIT", "0", "a whole number of 1 or more"),
        ("SEQUENCER_SOFT_BOUNCE_LIMIT", "three", "a whole number of 1 or more"),
        ("SEQUENCER_SOFT_BOUNCE_WINDOW", "abc", "SEQUENCER_SOFT_BOUNCE_WINDOW"),
    ],
)
def test_invalid_value_names_setting(tmp_path, name, value, message):
    with pytest.raises(ValueError) as raised:
        settings_for(tmp_path, **{name: value})

    assert str(raised.value).startswith(f"{name}: ")
    assert message in str(raised.value)


def test_cli_reports_invalid_setting(tmp_path):
    environment = {
        **os.environ,
        "SEQUENCER_HOME": str(tmp_path),
        "SEQUENCER_SOFT_BOUNCE_LIMIT": "0",
    }

    result = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "leads", "any-campaign"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert " ".join(result.stderr.split()).startswith(
        "error: invalid setting: SEQUENCER_SOFT_BOUNCE_LIMIT: '0'"
    )
    assert "Traceback" not in result.stderr


def test_cli_rejects_file_without_headers(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some notes\nwithout any header\n")

    result = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "event", "mail", str(text)],
        env={**os.environ, "SEQUENCER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "is not an email message" in " ".join(result.stderr.split())
