"""What an operator asks of the store: lists of runs, and the ones that are stuck.

A run is stuck when it makes no progress and no waiting explains it: its
workflow task keeps failing (nondeterminism, a bug), a compensation is
dead-lettered, or an activity has been scheduled or retrying for longer than the
threshold (no worker serves its queue, or it fails over and over). A run that
waits on a timer or a signal is not stuck.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from orchestrator.db import as_utc
from orchestrator.schema import activity_tasks, workflow_runs

if TYPE_CHECKING:
    from orchestrator.engine import Engine


def list_runs(
    engine: Engine,
    *,
    status: str | None = None,
    workflow_type: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Runs, newest first, filtered by status, type and start time."""
    query = select(workflow_runs).order_by(workflow_runs.c.created_at.desc()).limit(limit)
    if status is not None:
        query = query.where(workflow_runs.c.status == status.upper())
    if workflow_type is not None:
        query = query.where(workflow_runs.c.workflow_type == workflow_type)
    if since is not None:
        query = query.where(workflow_runs.c.created_at >= since)
    with engine.sessions() as session:
        return [_summary(row) for row in session.execute(query).mappings().all()]


def stuck_runs(engine: Engine, *, after: timedelta, limit: int = 50) -> list[dict[str, Any]]:
    """Open runs that make no progress, each with the reason it is flagged."""
    cutoff = engine.clock() - after
    found: dict[str, dict[str, Any]] = {}
    with engine.sessions() as session:
        failing = session.execute(
            select(workflow_runs)
            .where(
                workflow_runs.c.closed_at.is_(None),
                workflow_runs.c.task_failure.is_not(None),
            )
            .limit(limit)
        ).mappings()
        for row in failing:
            failure = row["task_failure"] or {}
            found[row["run_id"]] = _summary(
                row,
                reason=f"workflow task failing ({row['task_failures']}x): "
                f"{failure.get('type')}: {failure.get('message')}",
            )
        blocked = session.execute(
            select(workflow_runs)
            .where(workflow_runs.c.status == "COMPENSATION_BLOCKED")
            .limit(limit)
        ).mappings()
        for row in blocked:
            found.setdefault(row["run_id"], _summary(row, reason="a compensation is dead-lettered"))
        slow = session.execute(
            select(workflow_runs, activity_tasks.c.activity_type, activity_tasks.c.attempt)
            .join(activity_tasks, activity_tasks.c.run_id == workflow_runs.c.run_id)
            .where(
                workflow_runs.c.closed_at.is_(None),
                activity_tasks.c.status.in_(("SCHEDULED", "BACKOFF")),
                activity_tasks.c.scheduled_at < cutoff,
            )
            .limit(limit)
        ).mappings()
        for row in slow:
            found.setdefault(
                row["run_id"],
                _summary(
                    row,
                    reason=f"activity {row['activity_type']} not done after "
                    f"{after.total_seconds():g}s (attempt {row['attempt']})",
                ),
            )
    return list(found.values())[:limit]


def _summary(row: Any, reason: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "workflow_id": row["workflow_id"],
        "run_id": row["run_id"],
        "workflow_type": row["workflow_type"],
        "status": row["status"],
        "paused": bool(row["paused"]),
        "events": row["history_length"],
        "created_at": as_utc(row["created_at"]).isoformat(),
        "closed_at": as_utc(row["closed_at"]).isoformat() if row["closed_at"] else None,
    }
    if reason is not None:
        data["reason"] = reason
    return data
