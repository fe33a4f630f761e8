"""workflow_runs.workflow_queue: the queue of a run's workflow tasks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 08:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, without a default: rows from before keep sending their tasks to
    # the acting process's workflow queue, as they did.
    op.add_column("workflow_runs", sa.Column("workflow_queue", sa.String(255), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite rebuilds the table to drop a column.
    with op.batch_alter_table("workflow_runs") as batch:
        batch.drop_column("workflow_queue")
