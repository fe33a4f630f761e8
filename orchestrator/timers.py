"""Durable timers and deadlines, fired by the scheduler.

Two kinds of timer rows exist: an activity's retry back-off and a workflow's own
timer (``workflow.sleep``, ``asyncio.sleep``, a wait's timeout). Both are handled
under their run's lock, taken with SKIP LOCKED, and re-checked, so several
schedulers may scan at once and each timer fires once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, delete, func, insert, select
from sqlalchemy.orm import Session

from orchestrator.activity_runner import ACTIVITY_RETRY
from orchestrator.db import as_utc
from orchestrator.history import TimerFired
from orchestrator.runs import LockedRun, lock_run
from orchestrator.schema import activity_tasks, timers, workflow_runs

if TYPE_CHECKING:
    from orchestrator.engine import Engine

WORKFLOW_TIMER = "WORKFLOW_TIMER"
# Only an attempt that waits or runs can pass a deadline.
_WAITING = activity_tasks.c.status.in_(("SCHEDULED", "STARTED"))


def start_timer(
    session: Session, run: LockedRun, timer_id: str, seconds: float, now: datetime
) -> None:
    session.execute(
        insert(timers).values(
            run_id=run.run_id,
            kind=WORKFLOW_TIMER,
            ref=timer_id,
            fire_at=now + timedelta(seconds=seconds),
        )
    )


def cancel_timer(session: Session, run: LockedRun, timer_id: str) -> None:
    session.execute(
        delete(timers).where(
            timers.c.run_id == run.run_id,
            timers.c.kind == WORKFLOW_TIMER,
            timers.c.ref == timer_id,
        )
    )


_DELETE_RUN_TIMERS = delete(timers).where(timers.c.run_id == bindparam("b_run_id"))


def delete_run_timers(session: Session, run_id: str) -> None:
    session.execute(_DELETE_RUN_TIMERS, {"b_run_id": run_id})


class TimerService:
    """Scans for due timers and expired activity deadlines."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def fire_due(self, limit: int = 100) -> int:
        """Fire what is due now; return how many timers and deadlines were handled."""
        engine = self.engine
        now = engine.clock()
        with engine.sessions() as session:
            due_timers = session.execute(
                select(timers.c.id, timers.c.run_id)
                .join(workflow_runs, workflow_runs.c.run_id == timers.c.run_id)
                # A paused run's timers wait; they fire once it is resumed.
                .where(timers.c.fire_at <= now, workflow_runs.c.paused.is_(False))
                .order_by(timers.c.fire_at)
                .limit(limit)
            ).all()
            expired = session.execute(
                select(activity_tasks.c.run_id, activity_tasks.c.activity_id)
                .where(activity_tasks.c.deadline_at <= now, _WAITING)
                .order_by(activity_tasks.c.deadline_at)
                .limit(limit)
            ).all()
        done = 0
        for timer_id, run_id in due_timers:
            done += self._fire(timer_id, run_id)
        for run_id, activity_id in expired:
            done += engine.activities.expire(run_id, activity_id)
        return done

    def next_due(self) -> datetime | None:
        """When the next timer or deadline falls due, if any."""
        with self.engine.sessions() as session:
            timer_at = session.execute(
                select(func.min(timers.c.fire_at))
                .join(workflow_runs, workflow_runs.c.run_id == timers.c.run_id)
                .where(workflow_runs.c.paused.is_(False))
            ).scalar()
            deadline_at = session.execute(
                select(func.min(activity_tasks.c.deadline_at)).where(_WAITING)
            ).scalar()
        candidates = [as_utc(value) for value in (timer_at, deadline_at) if value is not None]
        return min(candidates) if candidates else None

    def _fire(self, timer_id: int, run_id: str) -> int:
        engine = self.engine
        with engine.sessions() as session:
            run = lock_run(session, run_id, skip_locked=True)
            if run is None:
                return 0
            timer = (
                session.execute(select(timers).where(timers.c.id == timer_id)).mappings().first()
            )
            if timer is None:
                return 0
            session.execute(delete(timers).where(timers.c.id == timer_id))
            now = engine.clock()
            fired = 0
            if timer["kind"] == ACTIVITY_RETRY:
                fired = int(engine.activities.retry_due(session, run, timer, now))
            elif timer["kind"] == WORKFLOW_TIMER and run.is_open:
                run.append(TimerFired(timer_id=timer["ref"]))
                engine.after_result(session, run, now)
                fired = 1
            engine.commit(session)
            return fired
