"""Settings read from the environment: defaults, the stack file, and invalid values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from sequencer.config import SANDBOX_IMAP_PASSWORD, load_settings
from sequencer.temporal import client_security

REPO = Path(__file__).resolve().parents[1]


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
        ("SEQUENCER_WORKER_ROLES", "workflows,sms", "unknown role 'sms'; use all, or one or more"),
        ("SEQUENCER_WORKER_ROLES", "all,email", "combines all with other roles; use all alone"),
        ("SEQUENCER_EMAIL_MAX_CONCURRENT", "0", "a whole number of 1 or more"),
        ("SEQUENCER_LINKEDIN_MAX_CONCURRENT", "many", "a whole number of 1 or more"),
        ("SEQUENCER_EMAIL_PER_SECOND", "-1", "is not a positive number"),
        ("SEQUENCER_LINKEDIN_PER_SECOND", "nan", "is not a positive number"),
        ("SEQUENCER_LINKEDIN_PER_SECOND", "inf", "is not a positive number"),
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


def test_temporal_security_off_by_default():
    settings = load_settings({"SEQUENCER_HOME": "/tmp/sequencer-settings-test"})

    assert client_security(settings) == {"tls": False, "api_key": None}


def test_temporal_api_key_turns_tls_on():
    settings = load_settings(
        {"SEQUENCER_HOME": "/tmp/sequencer-settings-test", "TEMPORAL_API_KEY": "cloud-key"}
    )

    security = client_security(settings)
    assert isinstance(security["tls"], TLSConfig)
    assert security["api_key"] == "cloud-key"
    assert "cloud-key" not in repr(settings)


def test_temporal_mutual_tls_reads_files(tmp_path):
    (tmp_path / "client.pem").write_bytes(b"CERT")
    (tmp_path / "client.key").write_bytes(b"KEY")
    settings = load_settings(
        {
            "SEQUENCER_HOME": str(tmp_path),
            "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "client.pem"),
            "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "client.key"),
        }
    )

    tls = client_security(settings)["tls"]
    assert tls.client_cert == b"CERT"
    assert tls.client_private_key == b"KEY"
    assert tls.server_root_ca_cert is None


def test_temporal_client_cert_without_key():
    with pytest.raises(ValueError, match="TEMPORAL_TLS_CLIENT_KEY_PATH go together"):
        load_settings(
            {
                "SEQUENCER_HOME": "/tmp/sequencer-settings-test",
                "TEMPORAL_TLS_CLIENT_CERT_PATH": "/etc/client.pem",
            }
        )


def test_temporal_unreadable_certificate(tmp_path):
    settings = load_settings(
        {
            "SEQUENCER_HOME": str(tmp_path),
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tmp_path / "missing-ca.pem"),
        }
    )

    with pytest.raises(ValueError, match="TEMPORAL_TLS_SERVER_CA_CERT_PATH=.*missing-ca.pem"):
        client_security(settings)


def test_temporal_api_key_without_tls_is_rejected():
    settings = load_settings(
        {
            "SEQUENCER_HOME": "/tmp/sequencer-settings-test",
            "TEMPORAL_API_KEY": "cloud-key",
            "TEMPORAL_TLS": "off",
        }
    )

    with pytest.raises(ValueError, match="TEMPORAL_API_KEY is set but TEMPORAL_TLS is off"):
        client_security(settings)


def test_worker_rejects_api_key_without_tls(tmp_path):
    environment = {
        **os.environ,
        "SEQUENCER_HOME": str(tmp_path),
        "SEQUENCER_PAYLOAD_ENCRYPTION": "off",
        "TEMPORAL_API_KEY": "cloud-key",
        "TEMPORAL_TLS": "off",
    }

    result = subprocess.run(
        [sys.executable, str(REPO / "worker.py")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "Invalid setting: TEMPORAL_API_KEY is set but TEMPORAL_TLS is off" in result.stderr
    assert "cloud-key" not in result.stderr


def test_workflow_cache_size_setting():
    default = load_settings({"SEQUENCER_HOME": "/tmp/sequencer-settings-test"})
    chosen = load_settings(
        {"SEQUENCER_HOME": "/tmp/sequencer-settings-test", "SEQUENCER_WORKFLOW_CACHE_SIZE": "40"}
    )

    assert default.workflow_cache_size == 250
    assert chosen.workflow_cache_size == 40
    with pytest.raises(ValueError, match="SEQUENCER_WORKFLOW_CACHE_SIZE: '0'"):
        load_settings(
            {"SEQUENCER_HOME": "/tmp/sequencer-settings-test", "SEQUENCER_WORKFLOW_CACHE_SIZE": "0"}
        )


def test_worker_roles_and_channel_limits():
    home = {"SEQUENCER_HOME": "/tmp/sequencer-settings-test"}
    default = load_settings(home)
    every = load_settings({**home, "SEQUENCER_WORKER_ROLES": " all "})
    empty = load_settings({**home, "SEQUENCER_WORKER_ROLES": " "})
    channels = load_settings(
        {
            **home,
            "SEQUENCER_WORKER_ROLES": "linkedin email",
            "SEQUENCER_EMAIL_MAX_CONCURRENT": "8",
            "SEQUENCER_LINKEDIN_PER_SECOND": "0.5",
        }
    )

    assert default.worker_roles == ("workflows", "email", "linkedin")
    assert every.worker_roles == default.worker_roles
    assert empty.worker_roles == default.worker_roles
    assert channels.worker_roles == ("email", "linkedin")
    assert default.channel_limits["email"].worker_options() == {}
    assert channels.channel_limits["email"].worker_options() == {"max_concurrent_activities": 8}
    assert channels.channel_limits["linkedin"].worker_options() == {
        "max_task_queue_activities_per_second": 0.5
    }
    assert channels.channel_limits["email"].describe() == "8 at once, no rate limit"
    assert channels.channel_limits["linkedin"].describe() == "100 at once, 0.5 a second"
