"""event inbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 13:10:00.000000
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
        "event_inbox",
        sa.Column("group_name", sa.String(length=100), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=255), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("correlation_id", sa.String(length=255), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("group_name", "event_id", name=op.f("pk_event_inbox")),
    )
    with op.batch_alter_table("event_inbox", schema=None) as batch_op:
        batch_op.create_index(
            "ix_event_inbox_group_processed", ["group_name", "processed_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("event_inbox", schema=None) as batch_op:
        batch_op.drop_index("ix_event_inbox_group_processed")
    op.drop_table("event_inbox")
