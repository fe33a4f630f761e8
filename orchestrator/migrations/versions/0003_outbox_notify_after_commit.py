"""outbox: relays are woken after commit, not by an insert trigger

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 20:20:00.000000
"""

from __future__ import annotations

from alembic import op

from orchestrator.migrations.outbox_trigger import postgres_notify_ddl, postgres_notify_drop_ddl

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in postgres_notify_drop_ddl():
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in postgres_notify_ddl():
            op.execute(statement)
