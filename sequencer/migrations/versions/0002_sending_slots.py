"""Sending slots booked in the database, and the sender accounts they belong to.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sender_accounts",
        sa.Column("id", sa.String(length=160), nullable=False),
        sa.Column("account", sa.JSON(), nullable=False),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "sending_slots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("workflow_id", sa.String(length=128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "workflow_id", "step"),
    )
    op.create_index("ix_sending_slots_account_at", "sending_slots", ["account_id", "at"])
    op.create_index(
        "ix_sending_slots_account_kind_at", "sending_slots", ["account_id", "kind", "at"]
    )
    op.create_index("ix_sending_slots_workflow_id", "sending_slots", ["workflow_id"])


def downgrade() -> None:
    op.drop_table("sending_slots")
    op.drop_table("sender_accounts")
