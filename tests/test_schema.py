"""Schema migrations of the reporting database, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from sequencer.models import Lead
from sequencer.schema import SchemaError, current_revision, head_revision, upgrade
from sequencer.storage import Store, enrollments, metadata


def test_new_database_is_at_head(database_url):
    store = Store(database_url)

    assert current_revision(store.engine) == head_revision()
    store.close()


def test_migrations_match_tables(database_url):
    """The migrations build exactly the tables that sequencer/storage.py declares."""
    store = Store(database_url)

    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    store.close()

    assert differences == []


def test_database_from_before_migrations(database_url):
    """A database made by a release without migrations keeps its rows and gains the tables
    its release did not have."""
    engine = create_engine(database_url)
    # email_sends came with the last release before migrations; the other two with 0002.
    later = {"email_sends", "sender_accounts", "sending_slots"}
    metadata.create_all(engine, tables=[t for t in metadata.sorted_tables if t.name not in later])
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            enrollments.insert().values(
                workflow_id="lead-1",
                campaign_id="campaign-1",
                lead_key="ann@example.com",
                lead=Lead(email="ann@example.com").model_dump(mode="json"),
                status="running",
                unsubscribed=False,
                enrolled_at=now,
                updated_at=now,
            )
        )
    engine.dispose()

    store = Store(database_url)

    assert current_revision(store.engine) == head_revision()
    assert "email_sends" in inspect(store.engine).get_table_names()
    assert [row.workflow_id for row in store.list_enrollments("campaign-1")] == ["lead-1"]
    store.close()


def test_unknown_revision_is_rejected(database_url):
    store = Store(database_url)
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    store.close()

    with pytest.raises(SchemaError, match="revision ffff.*does not know.*restore a backup"):
        Store(database_url)


def test_concurrent_openings_migrate_once(database_url):
    """Workers that start together on a new database all open it."""
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(database_url).close()
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    store = Store(database_url)
    assert current_revision(store.engine) == head_revision()
    store.close()


def test_upgrade_returns_previous_revision(database_url):
    engine = create_engine(database_url)

    assert upgrade(engine) is None
    assert upgrade(engine) == head_revision()
    engine.dispose()


def run_db(database_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "db", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_db_commands_upgrade_and_report(database_url):
    before = run_db(database_url, "status")
    upgraded = run_db(database_url, "upgrade")
    again = run_db(database_url, "upgrade")
    after = run_db(database_url, "status")

    assert before.returncode == 1
    assert "schema revision: none" in before.stdout
    assert "sequencer db upgrade" in before.stderr
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"from schema revision none to {head_revision()}" in upgraded.stdout
    assert "nothing to do" in again.stdout
    assert after.returncode == 0
    assert f"schema revision: {head_revision()} (latest: {head_revision()})" in after.stdout


def test_db_upgrade_unreachable_server():
    result = run_db("postgresql+psycopg://sequencer:secret@127.0.0.1:1/sequencer", "upgrade")

    message = " ".join(result.stderr.split())  # the console wraps long lines
    assert result.returncode == 1
    assert "cannot open the database postgresql+psycopg://sequencer:***@127.0.0.1:1" in message
    assert "Check DATABASE_URL" in message
    assert "secret" not in message
    assert "Traceback" not in message


def test_db_status_invalid_url():
    result = run_db("nonsense://sequencer:secret@127.0.0.1/sequencer", "status")

    message = " ".join(result.stderr.split())  # the console wraps long lines
    assert result.returncode == 1
    assert "invalid DATABASE_URL (scheme 'nonsense')" in message
    assert "postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME" in message
    assert "secret" not in message
    assert "Traceback" not in message


def test_concurrent_openings_of_new_sqlite_files(tmp_path):
    """Connections that open a new SQLite file together all leave it in WAL mode.

    SQLite rejects the switch to WAL at once while another connection opens the file. A single
    opening rarely meets that race, so the test opens many new files.
    """
    errors: list[BaseException] = []

    def open_store(url: str) -> None:
        try:
            Store(url).close()
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    for index in range(20):
        url = f"sqlite:///{tmp_path / f'sequencer-{index}.db'}"
        threads = [threading.Thread(target=open_store, args=(url,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        store = Store(url)
        with store.engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        store.close()

    assert errors == []
