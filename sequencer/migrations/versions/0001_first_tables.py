"""Tables of the releases from before migrations.

Databases made by those releases already have some or all of these tables (each release
created the tables it lacked when it opened the database), so this revision creates only the
missing ones.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "activity" not in existing:
        op.create_table(
            "activity",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("workflow_id", sa.String(length=128), nullable=False),
            sa.Column("entry_key", sa.String(length=64), nullable=False),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("kind", sa.String(length=8), nullable=False),
            sa.Column("status", sa.String(length=32), nullable=False),
            sa.Column("step", sa.Integer(), nullable=True),
            sa.Column("step_type", sa.String(length=32), nullable=True),
            sa.Column("channel", sa.String(length=16), nullable=True),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("detail", sa.Text(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("workflow_id", "entry_key"),
        )
        op.create_index("ix_activity_workflow_id", "activity", ["workflow_id"])
    if "api_keys" not in existing:
        op.create_table(
            "api_keys",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("name", sa.String(length=100), nullable=False),
            sa.Column("prefix", sa.String(length=16), nullable=False),
            sa.Column("digest", sa.String(length=64), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("digest"),
        )
    if "campaigns" not in existing:
        op.create_table(
            "campaigns",
            sa.Column("id", sa.String(length=64), nullable=False),
            sa.Column("name", sa.Text(), nullable=False),
            sa.Column("definition", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    if "email_sends" not in existing:
        op.create_table(
            "email_sends",
            sa.Column("send_key", sa.String(length=255), nullable=False),
            sa.Column("workflow_id", sa.String(length=128), nullable=False),
            sa.Column("step", sa.Integer(), nullable=False),
            sa.Column("state", sa.String(length=16), nullable=False),
            sa.Column("attempt", sa.String(length=64), nullable=False),
            sa.Column("detail", sa.Text(), nullable=True),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("send_key"),
        )
        op.create_index("ix_email_sends_workflow_id", "email_sends", ["workflow_id"])
    if "enrollments" not in existing:
        op.create_table(
            "enrollments",
            sa.Column("workflow_id", sa.String(length=128), nullable=False),
            sa.Column("campaign_id", sa.String(length=64), nullable=False),
            sa.Column("lead_key", sa.Text(), nullable=False),
            sa.Column("lead", sa.JSON(), nullable=False),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("unsubscribed", sa.Boolean(), nullable=False),
            sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("workflow_id"),
            sa.UniqueConstraint("campaign_id", "lead_key"),
        )
        op.create_index("ix_enrollments_campaign_id", "enrollments", ["campaign_id"])
    if "inbound_messages" not in existing:
        op.create_table(
            "inbound_messages",
            sa.Column("message_key", sa.String(length=255), nullable=False),
            sa.Column("kind", sa.String(length=32), nullable=False),
            sa.Column("summary", sa.Text(), nullable=False),
            sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("message_key"),
        )
    if "soft_bounces" not in existing:
        op.create_table(
            "soft_bounces",
            sa.Column("address", sa.String(length=320), nullable=False),
            sa.Column("message_key", sa.String(length=255), nullable=False),
            sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("address", "message_key"),
        )
    if "suppressions" not in existing:
        op.create_table(
            "suppressions",
            sa.Column("address", sa.String(length=320), nullable=False),
            sa.Column("reason", sa.String(length=32), nullable=False),
            sa.Column("source", sa.Text(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("address"),
        )
    if "tasks" not in existing:
        op.create_table(
            "tasks",
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("workflow_id", sa.String(length=128), nullable=False),
            sa.Column("campaign_id", sa.String(length=64), nullable=False),
            sa.Column("lead_key", sa.Text(), nullable=False),
            sa.Column("step", sa.Integer(), nullable=False),
            sa.Column("step_type", sa.String(length=32), nullable=False),
            sa.Column("instructions", sa.Text(), nullable=False),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("note", sa.Text(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("workflow_id", "step"),
        )


def downgrade() -> None:
    op.drop_table("tasks")
    op.drop_table("suppressions")
    op.drop_table("soft_bounces")
    op.drop_table("inbound_messages")
    op.drop_table("enrollments")
    op.drop_table("email_sends")
    op.drop_table("campaigns")
    op.drop_table("api_keys")
    op.drop_table("activity")
