"""The safety net for lost messages: re-dispatch work that has stalled.

The outbox makes sure every message is published, but a consumer can still lose
one: a task that fails on a database outage is acked like any failed task, and
nothing would ever ask for that step again. The watchdog finds runs with
unprocessed events and activity attempts still waiting to start, untouched for
``stale_after`` seconds, and sends their message again. Consumers check state, so
a message sent again for work that was merely slow does nothing.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select, update

from orchestrator import messages
from orchestrator.engine import Engine
from orchestrator.schema import activity_tasks, workflow_runs

log = logging.getLogger("orchestrator.watchdog")


def redispatch_stalled(engine: Engine, *, stale_after: float, limit: int = 100) -> int:
    """Send again the messages of stalled runs and activity attempts; return how many."""
    now = engine.clock()
    cutoff = now - timedelta(seconds=stale_after)
    with engine.sessions() as session:
        runs = session.execute(
            select(
                workflow_runs.c.run_id, workflow_runs.c.workflow_id, workflow_runs.c.workflow_queue
            )
            .where(
                workflow_runs.c.closed_at.is_(None),
                workflow_runs.c.paused.is_(False),
                workflow_runs.c.processed_seq < workflow_runs.c.history_length,
                workflow_runs.c.updated_at < cutoff,
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        attempts = session.execute(
            select(
                activity_tasks.c.run_id,
                activity_tasks.c.activity_id,
                activity_tasks.c.activity_type,
                activity_tasks.c.attempt,
                activity_tasks.c.task_queue,
                workflow_runs.c.workflow_id,
            )
            .join(workflow_runs, workflow_runs.c.run_id == activity_tasks.c.run_id)
            .where(
                activity_tasks.c.status == "SCHEDULED",
                activity_tasks.c.attempt_scheduled_at < cutoff,
                workflow_runs.c.paused.is_(False),
                workflow_runs.c.closed_at.is_(None),
            )
            .limit(limit)
            .with_for_update(of=activity_tasks, skip_locked=True)
        ).all()
        if not runs and not attempts:
            return 0
        outgoing = [
            # The run's own queue: this watchdog may serve runs of several apps.
            messages.workflow_task(run_id, wid, engine.workflow_queue(run_queue))
            for run_id, wid, run_queue in runs
        ]
        outgoing += [
            messages.activity_task(
                run_id=run_id,
                workflow_id=workflow_id,
                activity_id=activity_id,
                activity_type=activity_type,
                attempt=attempt,
                queue=task_queue,
            )
            for run_id, activity_id, activity_type, attempt, task_queue, workflow_id in attempts
        ]
        # Touch what was re-sent so the next scan waits another stale_after.
        for run_id, *_ in runs:
            session.execute(
                update(workflow_runs).where(workflow_runs.c.run_id == run_id).values(updated_at=now)
            )
        for run_id, activity_id, *_ in attempts:
            session.execute(
                update(activity_tasks)
                .where(
                    activity_tasks.c.run_id == run_id,
                    activity_tasks.c.activity_id == activity_id,
                )
                .values(attempt_scheduled_at=now)
            )
        engine.outbox.add(session, outgoing)
        session.commit()
    log.warning(
        "re-dispatched %d stalled workflow task(s) and %d activity attempt(s)",
        len(runs),
        len(attempts),
    )
    return len(outgoing)
