"""Alembic's environment: migrate the connection that `sequencer.schema` hands over."""

from __future__ import annotations

from alembic import context

from sequencer.storage import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot alter most columns in place: batch mode copies the table instead.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
