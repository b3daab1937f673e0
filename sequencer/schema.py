"""Schema migrations of the reporting database, with Alembic.

`Store` brings its database to the latest revision when it opens it, so the local stack and
the tests need no step of their own. In production the compose file runs `sequencer db
upgrade` once before the workers and the API start; they then find the schema current and
change nothing. A database made before migrations existed has no version table: the first
revision creates the tables it lacks, as those releases did, and the later ones follow.

Two processes that open a new database at once do not both migrate it: PostgreSQL takes an
advisory lock for the migration, and SQLite a lock on a file beside the database.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).with_name("migrations")
# Any number that the application alone uses as a PostgreSQL advisory lock key.
ADVISORY_LOCK_KEY = 0x5EC0E4CE


class SchemaError(Exception):
    """The database's schema cannot be brought to the revision this code expects."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Return an Alembic configuration for our migrations, migrating `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str:
    """Return the latest revision of the migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migration in {MIGRATIONS}"
    return head


def current_revision(engine: Engine) -> str | None:
    """Return the database's revision, or None for a database without a version table."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> str | None:
    """Bring the database to the latest revision; return the revision it was at.

    Raises SchemaError when the database is at a revision that this code does not know, as
    after a downgrade of Sequencer to an older version.
    """
    before = current_revision(engine)
    if before == head_revision():
        return before
    with _migration_lock(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
            )
        before = MigrationContext.configure(connection).get_current_revision()
        try:
            command.upgrade(alembic_config(connection), "head")
        except CommandError as error:
            raise SchemaError(
                f"the database {engine.url.render_as_string(hide_password=True)} is at schema "
                f"revision {before}, which this version of Sequencer does not know (its latest "
                f"is {head_revision()}): run a version of Sequencer at least as new as the one "
                f"that last upgraded it, or restore a backup ({error})"
            ) from None
    return before


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Hold a lock on a SQLite database's migration while the block runs (a no-op for other
    databases, which lock inside the migration's transaction)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
