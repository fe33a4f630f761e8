"""The engine's tables, on the project's one MetaData (shared with the outbox).

Status scans use partial indexes so that finished rows cost nothing to skip.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    text,
)

# The events package's inbox lives on the same MetaData: one migration history.
import events.schema  # noqa: F401
from outbox.schema import metadata, outbox_messages

__all__ = [
    "activity_tasks",
    "audit_log",
    "dead_letters",
    "metadata",
    "outbox_messages",
    "timers",
    "workflow_events",
    "workflow_runs",
]

workflow_runs = Table(
    "workflow_runs",
    metadata,
    Column("run_id", String(36), primary_key=True),
    Column("workflow_id", String(255), nullable=False),
    Column("workflow_type", String(255), nullable=False),
    Column("status", String(32), nullable=False),
    Column("input", JSON, nullable=True),
    Column("result", JSON, nullable=True),
    Column("failure", JSON, nullable=True),
    # Last history seq, and the last one a workflow task has applied: events past
    # processed_seq are new to the workflow code.
    Column("history_length", Integer, nullable=False, server_default=text("0")),
    Column("processed_seq", Integer, nullable=False, server_default=text("0")),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    # A paused run dispatches nothing new until it is resumed.
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    # The last workflow task that failed (nondeterminism, a bug in workflow code):
    # recorded outside the history, which stays untouched.
    Column("task_failure", JSON, nullable=True),
    Column("task_failures", Integer, nullable=False, server_default=text("0")),
    # A child run reports its outcome to its parent's history once.
    Column("parent_run_id", String(36), nullable=True),
    Column("parent_child_id", String(32), nullable=True),
    Column("parent_close_policy", String(16), nullable=True),
    Column("parent_notified", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    # The queue of the workers that run this workflow's tasks (those of the app
    # that started it). Whoever else touches the run (another app's client
    # signalling it, a scheduler or watchdog serving several apps, an
    # operator) asks for its next task there. Null in rows older than the
    # column: their tasks go to the acting process's own workflow queue.
    Column("workflow_queue", String(255), nullable=True),
)
# At most one open run per workflow id: the database, not a read-then-write, decides.
Index(
    "uq_workflow_runs_open_workflow_id",
    workflow_runs.c.workflow_id,
    unique=True,
    postgresql_where=workflow_runs.c.closed_at.is_(None),
    sqlite_where=workflow_runs.c.closed_at.is_(None),
)
Index("ix_workflow_runs_workflow_id", workflow_runs.c.workflow_id, workflow_runs.c.created_at)
Index("ix_workflow_runs_status", workflow_runs.c.status, workflow_runs.c.workflow_type)
Index(
    "ix_workflow_runs_parent",
    workflow_runs.c.parent_run_id,
    postgresql_where=workflow_runs.c.parent_run_id.is_not(None),
    sqlite_where=workflow_runs.c.parent_run_id.is_not(None),
)
# The watchdog scans open runs by last update.
Index(
    "ix_workflow_runs_open_updated",
    workflow_runs.c.updated_at,
    postgresql_where=workflow_runs.c.closed_at.is_(None),
    sqlite_where=workflow_runs.c.closed_at.is_(None),
)

workflow_events = Table(
    "workflow_events",
    metadata,
    Column(
        "run_id",
        String(36),
        ForeignKey("workflow_runs.run_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("event_type", String(64), nullable=False),
    Column("attributes", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

activity_tasks = Table(
    "activity_tasks",
    metadata,
    Column(
        "run_id",
        String(36),
        ForeignKey("workflow_runs.run_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("activity_id", String(32), primary_key=True),
    Column("activity_type", String(255), nullable=False),
    Column("task_queue", String(255), nullable=False),
    Column("input", JSON, nullable=True),
    Column("attempt", Integer, nullable=False),
    # Attempts before this one do not count against the retry policy (a dead
    # letter replayed by an operator gets a fresh budget).
    Column("attempt_base", Integer, nullable=False, server_default=text("0")),
    # SCHEDULED -> STARTED -> COMPLETED | BACKOFF (a retry timer waits) | FAILED
    Column("status", String(16), nullable=False),
    Column("retry_policy", JSON, nullable=False),
    Column("start_to_close", Float, nullable=False),
    Column("schedule_to_close", Float, nullable=True),
    Column("heartbeat_timeout", Float, nullable=True),
    Column("is_compensation", Boolean, nullable=False, server_default=text("false")),
    Column("idempotency_key", String(512), nullable=False),
    Column("scheduled_at", DateTime(timezone=True), nullable=False),
    Column("attempt_scheduled_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    # The earliest deadline of the current attempt; NULL once nothing can time out.
    Column("deadline_at", DateTime(timezone=True), nullable=True),
    Column("heartbeat_details", JSON, nullable=True),
    Column("last_failure", JSON, nullable=True),
    Column("attempt_failures", JSON, nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
)
Index(
    "ix_activity_tasks_waiting",
    activity_tasks.c.attempt_scheduled_at,
    postgresql_where=activity_tasks.c.status == "SCHEDULED",
    sqlite_where=activity_tasks.c.status == "SCHEDULED",
)
Index(
    "ix_activity_tasks_deadline",
    activity_tasks.c.deadline_at,
    postgresql_where=activity_tasks.c.deadline_at.is_not(None),
    sqlite_where=activity_tasks.c.deadline_at.is_not(None),
)

timers = Table(
    "timers",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column(
        "run_id",
        String(36),
        ForeignKey("workflow_runs.run_id", ondelete="CASCADE"),
        nullable=False,
    ),
    # ACTIVITY_RETRY: ref is the activity id and attempt the attempt it starts.
    Column("kind", String(32), nullable=False),
    Column("ref", String(64), nullable=False),
    Column("attempt", Integer, nullable=True),
    Column("fire_at", DateTime(timezone=True), nullable=False),
    Column("note", Text, nullable=True),
)
Index("ix_timers_fire_at", timers.c.fire_at)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(32), nullable=False),  # "compensation"
    Column("run_id", String(36), nullable=False),
    Column("workflow_id", String(255), nullable=False),
    Column("workflow_type", String(255), nullable=False),
    Column("activity_id", String(32), nullable=False),
    Column("activity_type", String(255), nullable=False),
    Column("input", JSON, nullable=True),
    Column("attempts", JSON, nullable=False),  # every attempt's error, in order
    Column("status", String(16), nullable=False),  # OPEN | REPLAYED | DISCARDED
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    Column("resolved_by", String(255), nullable=True),
    Column("resolution", Text, nullable=True),
)
Index(
    "ix_dead_letters_open",
    dead_letters.c.created_at,
    postgresql_where=dead_letters.c.status == "OPEN",
    sqlite_where=dead_letters.c.status == "OPEN",
)

audit_log = Table(
    "audit_log",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("workflow_id", String(255), nullable=True),
    Column("run_id", String(36), nullable=True),
    Column("reason", Text, nullable=True),
    Column("details", JSON, nullable=True),
)
Index("ix_audit_log_at", audit_log.c.at)
