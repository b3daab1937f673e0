"""Alembic migrations of the reporting database; `sequencer.schema` runs them."""
