"""Activity attempts: schedule, claim, run, record, retry, time out.

An attempt is claimed in a short transaction before the user's code runs (so a
duplicate or stale message finds it taken), and its outcome is recorded under the
run's lock afterwards. Retries wait in durable timers; deadlines (start-to-close,
heartbeat, schedule-to-close) are enforced by the scheduler.

Eager dispatch: a worker that records a result and decides the next activity,
on a queue it serves itself, claims that attempt in the same transaction and
runs it right after the commit, instead of sending a message for another worker
to claim. The claimed attempt is exactly what a worker that took the message
would have: if this process dies before recording its outcome, the attempt's
start-to-close (or heartbeat) deadline expires and the retry policy decides,
as for any worker lost mid-attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Executable, bindparam, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from activities.context import ActivityInfo
from activities.definition import ActivityDefinition
from activities.errors import ActivityCancelledError
from activities.execution import Outcome, execute
from activities.failure import Failure
from activities.retry import RetryPolicy
from orchestrator import messages, metrics
from orchestrator.db import as_utc, once_more_on_disconnect
from orchestrator.history import ActivityCompleted, ActivityFailed, ActivityScheduled
from orchestrator.pipeline import (
    abandon_pipeline,
    check_refused,
    commit,
    pipelined,
    queue_checks,
    read_together,
)
from orchestrator.runs import (
    LOAD_HISTORY,
    LOCK_RUN,
    PREFETCHED_HISTORY,
    RUN_UNCHANGED,
    SELECT_RUN,
    LockedRun,
    history_rows,
    known_run_params,
    lock_run,
    locked_run_from,
    save_run,
)
from orchestrator.schema import activity_tasks, timers, workflow_runs
from orchestrator.sessions import bound_to
from orchestrator.writes import write
from outbox.crashpoints import crash_point
from outbox.message import OutboxMessage

if TYPE_CHECKING:
    from orchestrator.engine import Engine

log = logging.getLogger("orchestrator.activities")

ACTIVITY_RETRY = "ACTIVITY_RETRY"
_KEEP_ATTEMPT_FAILURES = 20


@dataclass(frozen=True)
class ClaimedAttempt:
    """An attempt this process has claimed and is about to run."""

    info: ActivityInfo
    definition: ActivityDefinition
    payload: Any
    # What the claim read of the run for its cached instance to catch up with,
    # once the attempt has run: the run's row, its events after ``after``.
    catch_up: tuple[Mapping[str, Any], list[dict[str, Any]], int] | None = None


# Statements of the hot path, built once (see orchestrator.runs).
_INSERT_ACTIVITY = insert(activity_tasks)
_ONE_ACTIVITY = (
    activity_tasks.c.run_id == bindparam("b_run_id"),
    activity_tasks.c.activity_id == bindparam("b_activity_id"),
)
_SELECT_ACTIVITY = select(activity_tasks).where(*_ONE_ACTIVITY)
# The SET clause comes from the parameters' names.
_UPDATE_ACTIVITY = update(activity_tasks).where(*_ONE_ACTIVITY)
_CLAIM_ACTIVITY = (
    select(
        activity_tasks,
        workflow_runs.c.workflow_id,
        workflow_runs.c.workflow_type,
        workflow_runs.c.paused,
        workflow_runs.c.closed_at.label("run_closed_at"),
    )
    .join(workflow_runs, workflow_runs.c.run_id == activity_tasks.c.run_id)
    .where(*_ONE_ACTIVITY)
    .with_for_update(of=activity_tasks)
)

# Recording an outcome reads or updates the attempt after the run's lock is
# taken, in a statement of its own: a statement that locked the run and *read*
# the attempt at once could, after waiting for the lock, see the attempt as it
# was before the transaction it waited for (which may have timed it out or
# cancelled it). An update is another matter: it checks its conditions again on
# the row as that transaction left it (see _COMPLETE_KNOWN_RUN). A success
# closes the attempt only if it is still the current one and running; the row
# it returns is the proof, and no row means a stale outcome.
_COMPLETE_ATTEMPT = (
    update(activity_tasks)
    .where(
        *_ONE_ACTIVITY,
        activity_tasks.c.attempt == bindparam("b_attempt"),
        activity_tasks.c.status == "STARTED",
    )
    .values(status="COMPLETED", closed_at=bindparam("b_now"), deadline_at=None)
    .returning(activity_tasks.c.activity_type)
)

# The same close for a run this process knows, as a check (see queue_checks):
# it locks the run's row if the row is still as the process left it
# (RUN_UNCHANGED), then closes the attempt if it is still current and running.
# It refuses, with a division by zero, when either is not so: the run changed,
# or the outcome is stale. One statement for both, the run's lock first: the
# uncorrelated EXISTS is evaluated once, before the attempt's row is read, so
# ``held`` has locked the run by then. The statement's snapshot predates any
# wait for that lock, but neither part trusts it: a locked or updated row that
# another transaction changed meanwhile has its conditions checked again on
# the row as that transaction committed it, so a run changed, or an attempt
# timed out or cancelled, while this waited is refused, never overwritten.
_COMPLETE_KNOWN_RUN = text(
    f"""
    WITH held AS (
      SELECT 1 FROM workflow_runs WHERE {RUN_UNCHANGED} FOR UPDATE
    ), closed AS (
      UPDATE activity_tasks SET status = 'COMPLETED', closed_at = :b_now, deadline_at = NULL
      WHERE run_id = :b_run_id AND activity_id = :b_activity_id
        AND attempt = :b_attempt AND status = 'STARTED'
        AND EXISTS (SELECT FROM held)
      RETURNING 1
    )
    SELECT 1 / count(*) AS completed FROM closed
    """
)

_CLAIM_WITHOUT_FLUSH = text("SET LOCAL synchronous_commit TO OFF")

# The claim in one statement (PostgreSQL): the attempt is marked started only
# if it is still the current one, scheduled, and its run open and not paused,
# with the deadline _attempt_deadline computes, and of a type this process
# runs. No row: not claimed, and the step-by-step claim finds out why.
# Both rows are reached by their primary keys only: ``IS NOT DISTINCT FROM``
# (the same as ``=`` on a column that is never null) does not let the planner
# use the partial index of scheduled attempts, and the run is read in a
# subquery the planner keeps apart (``OFFSET 0``), so the partial indexes of
# open runs stay out too. On tables it has no statistics for yet (a new
# database, until autovacuum first analyzes it) it otherwise read every
# scheduled attempt and every open run for each claim.
_CLAIM_AT_ONCE = text(
    """
    UPDATE activity_tasks AS a
    SET status = 'STARTED',
        started_at = :b_now,
        deadline_at = LEAST(
            :b_now + a.start_to_close * interval '1 second',
            CASE WHEN a.heartbeat_timeout > 0
                THEN :b_now + a.heartbeat_timeout * interval '1 second' END,
            CASE WHEN a.schedule_to_close > 0
                THEN a.scheduled_at + a.schedule_to_close * interval '1 second' END
        )
    FROM (
      SELECT workflow_id, workflow_type, closed_at, paused
      FROM workflow_runs WHERE run_id = :b_run_id OFFSET 0
    ) AS r
    WHERE a.run_id = :b_run_id AND a.activity_id = :b_activity_id
      AND a.attempt = :b_attempt AND a.status IS NOT DISTINCT FROM 'SCHEDULED'
      AND a.activity_type = ANY(:b_types)
      AND r.closed_at IS NULL AND NOT r.paused
    RETURNING a.activity_type, a.idempotency_key, a.task_queue, a.scheduled_at,
      a.deadline_at, a.heartbeat_details, a.is_compensation, a.input,
      r.workflow_id, r.workflow_type
    """
)


class EagerObserver(Protocol):
    """Told about the attempts that run eagerly (no broker message, so no task events)."""

    def started(self, info: ActivityInfo) -> None: ...

    def finished(self, info: ActivityInfo, failure: Failure | None, runtime: float) -> None: ...

    def flush(self) -> None:
        """The chain of eager attempts has ended."""


# The session flag of a transaction whose caller runs an eager claim after its commit,
# and the key the claim is kept under until then.
EAGER_ALLOWED = "eager_allowed"
EAGER_CLAIM = "eager_claim"
# A chain of eager attempts stops taking new ones after this long: the broker
# message that began it stays unacknowledged until the chain ends, and RabbitMQ
# closes a channel that holds one too long (consumer_timeout, 30 minutes).
EAGER_MAX_SECONDS = 60.0


def _attempt_deadline(
    now: datetime,
    start_to_close: float,
    heartbeat_timeout: float | None,
    close_deadline: datetime | None,
) -> datetime:
    deadline = now + timedelta(seconds=start_to_close)
    if heartbeat_timeout:
        deadline = min(deadline, now + timedelta(seconds=heartbeat_timeout))
    if close_deadline is not None:
        deadline = min(deadline, close_deadline)
    return deadline


def _close_deadline(row: Any) -> datetime | None:
    if not row["schedule_to_close"]:
        return None
    return as_utc(row["scheduled_at"]) + timedelta(seconds=row["schedule_to_close"])


class ActivityRunner:
    """The activity side of the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---------------------------------------------------------------- scheduling
    def schedule(
        self, session: Session, run: LockedRun, command: ActivityScheduled, now: datetime
    ) -> OutboxMessage | None:
        """Record a new activity; the message that asks for it, or None if it runs here."""
        close_deadline = (
            now + timedelta(seconds=command.schedule_to_close)
            if command.schedule_to_close
            else None
        )
        idempotency_key = f"{run.workflow_id}/{run.run_id}/{command.activity_id}"
        eager = self._eager_candidate(session, run, command)
        started_at: datetime | None = None
        deadline_at = close_deadline
        if eager is not None:
            started_at = now
            deadline_at = _attempt_deadline(
                now, command.start_to_close, command.heartbeat_timeout, close_deadline
            )
            session.info[EAGER_CLAIM] = ClaimedAttempt(
                info=ActivityInfo(
                    activity_id=command.activity_id,
                    activity_type=command.activity_type,
                    workflow_id=run.workflow_id,
                    workflow_type=run.workflow_type,
                    run_id=run.run_id,
                    attempt=1,
                    idempotency_key=idempotency_key,
                    task_queue=command.task_queue,
                    scheduled_at=now,
                    started_at=now,
                    deadline=deadline_at,
                    heartbeat_details=None,
                    is_compensation=command.is_compensation,
                ),
                definition=eager,
                payload=command.input,
            )
        write(
            session,
            _INSERT_ACTIVITY,
            {
                "run_id": run.run_id,
                "activity_id": command.activity_id,
                "activity_type": command.activity_type,
                "task_queue": command.task_queue,
                "input": command.input,
                "attempt": 1,
                "status": "SCHEDULED" if eager is None else "STARTED",
                "retry_policy": command.retry_policy,
                "start_to_close": command.start_to_close,
                "schedule_to_close": command.schedule_to_close,
                "heartbeat_timeout": command.heartbeat_timeout,
                "is_compensation": command.is_compensation,
                "idempotency_key": idempotency_key,
                "scheduled_at": now,
                "attempt_scheduled_at": now,
                "started_at": started_at,
                "deadline_at": deadline_at,
                "attempt_failures": [],
            },
        )
        if eager is not None:
            return None
        return messages.activity_task(
            run_id=run.run_id,
            workflow_id=run.workflow_id,
            activity_id=command.activity_id,
            activity_type=command.activity_type,
            attempt=1,
            queue=command.task_queue,
        )

    def _eager_candidate(
        self, session: Session, run: LockedRun, command: ActivityScheduled
    ) -> ActivityDefinition | None:
        """The definition to run ``command`` with here, or None to send it to a worker.

        One per transaction: further activities a step schedules (a fan-out) go
        to the queue, so that other workers take them in parallel.
        """
        engine = self.engine
        if (
            not session.info.get(EAGER_ALLOWED)
            or EAGER_CLAIM in session.info
            or run.paused
            or command.task_queue not in engine.eager_queues
            or not engine.registry.has_activity(command.activity_type)
        ):
            return None
        return engine.registry.activity(command.activity_type)

    # ------------------------------------------------------------------ running
    def run_attempt(self, run_id: str, activity_id: str, attempt: int) -> Failure | None:
        """Run one attempt, if it is still the current one, and record its outcome.

        Then run, one after the other, the attempts its outcome claimed here
        (eager dispatch), up to ``eager_max_steps`` of them; the rest of the run
        goes on through the broker. Returns the failure of the attempt asked
        for (None if it succeeded or did not run), which the broker's task
        reports as its own state.
        """
        claimed = self._claim(run_id, activity_id, attempt)
        if claimed is None:
            return None
        return self.run_claimed(claimed, eager=False)

    def run_claimed(self, claimed: ClaimedAttempt, *, eager: bool) -> Failure | None:
        """Run a claimed attempt and the eager attempts that follow; the first one's failure."""
        budget = self.engine.settings.eager_max_steps
        until = time.monotonic() + EAGER_MAX_SECONDS
        observer = self.engine.eager_observer
        try:
            next_claim, first_failure = self._run(claimed, eager=eager, eager_allowed=budget > 0)
            budget -= 1
            while next_claim is not None:
                allowed = budget > 0 and time.monotonic() < until
                next_claim, _ = self._run(next_claim, eager=True, eager_allowed=allowed)
                budget -= 1
        finally:
            if observer is not None:
                observer.flush()
        return first_failure

    def _run(
        self, claimed: ClaimedAttempt, *, eager: bool, eager_allowed: bool
    ) -> tuple[ClaimedAttempt | None, Failure | None]:
        info = claimed.info
        observer = self.engine.eager_observer if eager else None
        if observer is not None:
            observer.started(info)
        crash_point("activity.started")

        def heartbeat(details: Any) -> None:
            self._heartbeat(info.run_id, info.activity_id, info.attempt, details)

        started = time.monotonic()
        outcome = execute(
            claimed.definition,
            info,
            claimed.payload,
            heartbeat=heartbeat,
            limit=self.engine.settings.max_payload_bytes,
        )
        runtime = time.monotonic() - started
        metrics.record_activity(
            info.activity_type,
            metrics.ACTIVITY_COMPLETED if outcome.failure is None else metrics.ACTIVITY_FAILED,
            runtime,
        )
        if observer is not None:
            observer.finished(info, outcome.failure, runtime)
        crash_point("activity.executed")
        if claimed.catch_up is not None:
            self._catch_up(*claimed.catch_up)
        return self._finish(info, outcome, eager_allowed=eager_allowed), outcome.failure

    def _catch_up(self, row: Mapping[str, Any], events: list[dict[str, Any]], after: int) -> None:
        """Bring the cached instance up to what the claim read (see ``Engine.remember``).

        After the attempt has run, not before: the replay must not delay the
        user's code (it still counts against the attempt's deadline, as the
        careful path's replay would). Anything that goes wrong here (an event this code does
        not know, in a rolling deploy) leaves the instance to the careful path,
        which meets the problem again and handles it.
        """
        try:
            self.engine.remember(locked_run_from(row), history_rows(events), after=after)
        except Exception:
            log.warning("could not catch up with the run before its outcome", exc_info=True)

    @once_more_on_disconnect
    def _claim(self, run_id: str, activity_id: str, attempt: int) -> ClaimedAttempt | None:
        engine = self.engine
        now = engine.clock()
        with engine.sessions() as session, pipelined(session, lean=True):
            if bound_to(session).dialect.name == "postgresql":
                params = {
                    "b_run_id": run_id,
                    "b_activity_id": activity_id,
                    "b_attempt": attempt,
                    "b_now": now,
                    "b_types": engine.registry.activity_types,
                }
                reads: list[tuple[Executable, Mapping[str, Any]]] = [(_CLAIM_AT_ONCE, params)]
                # The run's row and the events this process's instance of it has
                # not applied (all of them if it has none) come along, so that
                # the outcome can be recorded as for a known run.
                known = engine.cache.applied_seq(run_id)
                catch_up = engine.settings.fast_path and engine.cache.enabled
                if catch_up:
                    reads.append((SELECT_RUN, {"b_run_id": run_id}))
                    reads.append((LOAD_HISTORY, {"b_run_id": run_id, "b_after": known or 0}))
                # The claim's commit does not wait for its flush to disk. A claim
                # that a database crash loses was never made: the attempt is
                # scheduled again, the result of this run of it is refused as
                # stale, and the attempt runs again (activities run at least once).
                # Whatever later commits durably flushes it along.
                queue_checks(session, [(_CLAIM_WITHOUT_FLUSH, {})])
                rows = read_together(session, reads, then_commit=True)
                if rows is not None:
                    if rows[0]:
                        claimed = self._claimed(rows[0][0], run_id, activity_id, attempt, now)
                        if catch_up and rows[1]:
                            claimed = replace(claimed, catch_up=(rows[1][0], rows[2], known or 0))
                        return claimed
                    # Not claimed: the transaction below finds out why, for the log.
                    return self._claim_checked(run_id, activity_id, attempt, now)
            return self._claim_checked(run_id, activity_id, attempt, now, session=session)

    def _claim_checked(
        self,
        run_id: str,
        activity_id: str,
        attempt: int,
        now: datetime,
        *,
        session: Session | None = None,
    ) -> ClaimedAttempt | None:
        """The claim step by step: read the attempt and its run, check, mark it started."""
        if session is None:
            with self.engine.sessions() as own:
                return self._claim_checked(run_id, activity_id, attempt, now, session=own)
        engine = self.engine
        row = (
            session.execute(_CLAIM_ACTIVITY, {"b_run_id": run_id, "b_activity_id": activity_id})
            .mappings()
            .first()
        )
        if row is not None and row["run_closed_at"] is not None:
            log.info("run is closed; activity %s not started", activity_id)
            return None
        if row is not None and row["paused"]:
            # Stays SCHEDULED: resuming the run sends its message again.
            log.info("run is paused; activity %s waits", activity_id, extra={"run_id": run_id})
            return None
        if row is None or row["attempt"] != attempt or row["status"] != "SCHEDULED":
            log.info(
                "dropping stale activity message",
                extra={"run_id": run_id, "activity_id": activity_id, "attempt": attempt},
            )
            return None
        engine.registry.activity(row["activity_type"])  # raises before anything is written
        deadline = _attempt_deadline(
            now, row["start_to_close"], row["heartbeat_timeout"], _close_deadline(row)
        )
        set_activity(
            session, run_id, activity_id, status="STARTED", started_at=now, deadline_at=deadline
        )
        commit(session)
        return self._claimed({**row, "deadline_at": deadline}, run_id, activity_id, attempt, now)

    def _claimed(
        self, row: Any, run_id: str, activity_id: str, attempt: int, now: datetime
    ) -> ClaimedAttempt:
        """The attempt a claim marked started, from its row and its run's."""
        info = ActivityInfo(
            activity_id=activity_id,
            activity_type=row["activity_type"],
            workflow_id=row["workflow_id"],
            workflow_type=row["workflow_type"],
            run_id=run_id,
            attempt=attempt,
            idempotency_key=row["idempotency_key"],
            task_queue=row["task_queue"],
            scheduled_at=as_utc(row["scheduled_at"]),
            started_at=now,
            deadline=as_utc(row["deadline_at"]),
            heartbeat_details=row["heartbeat_details"],
            is_compensation=bool(row["is_compensation"]),
        )
        definition = self.engine.registry.activity(row["activity_type"])
        return ClaimedAttempt(info=info, definition=definition, payload=row["input"])

    def _heartbeat(self, run_id: str, activity_id: str, attempt: int, details: Any) -> None:
        """Record progress, push the heartbeat deadline, and pass on a cancellation."""
        engine = self.engine
        now = engine.clock()
        with engine.sessions.begin() as session:
            row = (
                session.execute(
                    select(
                        activity_tasks.c.attempt,
                        activity_tasks.c.status,
                        activity_tasks.c.started_at,
                        activity_tasks.c.start_to_close,
                        activity_tasks.c.heartbeat_timeout,
                        activity_tasks.c.schedule_to_close,
                        activity_tasks.c.scheduled_at,
                        workflow_runs.c.cancel_requested,
                        workflow_runs.c.closed_at,
                    )
                    .join(workflow_runs, workflow_runs.c.run_id == activity_tasks.c.run_id)
                    .where(
                        activity_tasks.c.run_id == run_id,
                        activity_tasks.c.activity_id == activity_id,
                    )
                )
                .mappings()
                .first()
            )
            if row is None or row["attempt"] != attempt or row["status"] != "STARTED":
                raise ActivityCancelledError("this attempt is no longer current")
            if row["cancel_requested"] or row["closed_at"] is not None:
                raise ActivityCancelledError("the workflow was cancelled")
            values: dict[str, Any] = {"heartbeat_details": details}
            if row["heartbeat_timeout"]:
                deadline = min(
                    as_utc(row["started_at"]) + timedelta(seconds=row["start_to_close"]),
                    now + timedelta(seconds=row["heartbeat_timeout"]),
                )
                close = _close_deadline(row)
                values["deadline_at"] = min(deadline, close) if close else deadline
            session.execute(
                update(activity_tasks)
                .where(
                    activity_tasks.c.run_id == run_id,
                    activity_tasks.c.activity_id == activity_id,
                    activity_tasks.c.attempt == attempt,
                    activity_tasks.c.status == "STARTED",
                )
                .values(**values)
            )

    @once_more_on_disconnect
    def _finish(
        self, info: ActivityInfo, outcome: Outcome, *, eager_allowed: bool
    ) -> ClaimedAttempt | None:
        """Record an attempt's outcome; the next attempt claimed here, if any."""
        engine = self.engine
        run_id, activity_id, attempt = info.run_id, info.activity_id, info.attempt
        if outcome.failure is None:
            known = engine.cache.known_run(run_id)
            if known is not None:
                recorded, next_claim = self._complete_known_run(
                    known, info, outcome, eager_allowed=eager_allowed
                )
                if recorded:
                    return next_claim
        with engine.sessions() as session, pipelined(session):
            session.info[EAGER_ALLOWED] = eager_allowed
            now = engine.clock()
            if outcome.failure is None:
                run, activity_type = self._lock_and_complete(
                    session, run_id, activity_id, attempt, now
                )
                if run is None or activity_type is None:
                    return self._stale(run_id, activity_id, attempt)
                # After the lock wait: the events follow the last holder's in time.
                now = engine.clock()
                # A run that closed while this ran (terminated, say) keeps the
                # record but gets nothing after its closing event.
                appended = run.is_open
                if appended:
                    run.append(
                        ActivityCompleted(
                            activity_id=activity_id,
                            activity_type=activity_type,
                            attempt=attempt,
                            result=outcome.result,
                        )
                    )
            else:
                run = lock_run(session, run_id)
                if run is None:
                    return self._stale(run_id, activity_id, attempt)
                row = activity_row(session, run_id, activity_id)
                if row is None or row["attempt"] != attempt or row["status"] != "STARTED":
                    return self._stale(run_id, activity_id, attempt)
                appended = self.attempt_failed(session, run, row, outcome.failure, now)
            if appended:
                engine.after_result(session, run, now)  # saves the run
            else:
                save_run(session, run, now)
            engine.commit(session)
            claim: ClaimedAttempt | None = session.info.pop(EAGER_CLAIM, None)
            return claim

    def _complete_known_run(
        self, run: LockedRun, info: ActivityInfo, outcome: Outcome, *, eager_allowed: bool
    ) -> tuple[bool, ClaimedAttempt | None]:
        """Record a result in one round trip, deciding before the run is read.

        ``run`` is the run as this process last committed it, and its cached
        instance has applied all of it: while the row is still so, the careful
        path would read nothing else. One check goes first: it locks the row if
        it is unchanged, then closes the attempt if it is still current and
        running. If it refuses (someone else changed the run, or the outcome is
        stale), nothing of the transaction stays and this returns False: the
        caller records the outcome the careful way.
        """
        engine = self.engine
        now = engine.clock()
        complete = {
            **known_run_params(run),
            "b_activity_id": info.activity_id,
            "b_attempt": info.attempt,
            "b_now": now,
        }
        with engine.sessions() as session, pipelined(session, lean=True):
            try:
                if not queue_checks(session, [(_COMPLETE_KNOWN_RUN, complete)]):
                    return False, None
                session.info[EAGER_ALLOWED] = eager_allowed
                run.append(
                    ActivityCompleted(
                        activity_id=info.activity_id,
                        activity_type=info.activity_type,
                        attempt=info.attempt,
                        result=outcome.result,
                    )
                )
                engine.after_result(session, run, now)
                engine.commit(session)
            except DBAPIError as exc:
                # A refusal comes out wherever the driver reads it: at a later
                # statement, a read, or the commit.
                if not check_refused(exc):
                    raise
                abandon_pipeline(session)
                engine.discard(session)
                engine.cache.contended(run.run_id)
                log.debug(
                    "run changed since this worker recorded it; reading it again",
                    extra={"run_id": run.run_id, "activity_id": info.activity_id},
                )
                return False, None
            claim: ClaimedAttempt | None = session.info.pop(EAGER_CLAIM, None)
            return True, claim

    def _lock_and_complete(
        self, session: Session, run_id: str, activity_id: str, attempt: int, now: datetime
    ) -> tuple[LockedRun | None, str | None]:
        """Lock the run, then close the attempt if it is still current and running.

        The run (None if it is gone) and the attempt's activity type (None if the
        outcome is stale). In a pipeline the two statements share one round trip,
        and so does the run's history when no cached instance holds it (the
        first step a worker records for a run).
        """
        complete = {
            "b_run_id": run_id,
            "b_activity_id": activity_id,
            "b_attempt": attempt,
            "b_now": now,
        }
        reads: list[tuple[Executable, Mapping[str, Any]]] = [
            (LOCK_RUN, {"b_run_id": run_id}),
            (_COMPLETE_ATTEMPT, complete),
        ]
        cold = run_id not in self.engine.cache
        if cold:
            reads.append((LOAD_HISTORY, {"b_run_id": run_id, "b_after": 0}))
        rows = read_together(session, reads)
        if rows is None:
            run = lock_run(session, run_id)
            if run is None:
                return None, None
            return run, session.execute(_COMPLETE_ATTEMPT, complete).scalar()
        if not rows[0]:
            return None, None
        if cold:
            session.info[PREFETCHED_HISTORY] = (run_id, history_rows(rows[2]))
        return locked_run_from(rows[0][0]), rows[1][0]["activity_type"] if rows[1] else None

    @staticmethod
    def _stale(run_id: str, activity_id: str, attempt: int) -> None:
        log.info(
            "activity outcome arrived for an attempt that is no longer current",
            extra={"run_id": run_id, "activity_id": activity_id, "attempt": attempt},
        )

    def attempt_failed(
        self, session: Session, run: LockedRun, row: Any, failure: Failure, now: datetime
    ) -> bool:
        """Schedule a durable retry or fail the activity for good; True if an event was appended."""
        attempt = row["attempt"]
        counted = attempt - (row["attempt_base"] or 0)
        policy = RetryPolicy.from_json(row["retry_policy"])
        failures = [
            *list(row["attempt_failures"] or [])[-(_KEEP_ATTEMPT_FAILURES - 1) :],
            {"attempt": attempt, "at": now.isoformat(), "failure": failure.to_json()},
        ]
        delay = policy.delay_after(counted)
        close_deadline = _close_deadline(row)
        retry = (
            run.is_open
            and policy.should_retry(counted, failure)
            and (close_deadline is None or now + delay < close_deadline)
        )
        log.warning(
            "activity attempt failed: %s: %s%s",
            failure.type,
            failure.message,
            f"; retry in {delay.total_seconds():g}s" if retry else "; no more retries",
            extra={
                "workflow_id": run.workflow_id,
                "run_id": run.run_id,
                "activity": row["activity_type"],
                "attempt": attempt,
            },
        )
        if retry:
            set_activity(
                session,
                run.run_id,
                row["activity_id"],
                status="BACKOFF",
                deadline_at=None,
                last_failure=failure.to_json(),
                attempt_failures=failures,
            )
            session.execute(
                insert(timers).values(
                    run_id=run.run_id,
                    kind=ACTIVITY_RETRY,
                    ref=row["activity_id"],
                    attempt=attempt + 1,
                    fire_at=now + delay,
                )
            )
            return False
        if row["is_compensation"] and run.is_open:
            # Never drop a compensation: park it for an operator (the workflow keeps
            # waiting for it), and report the new event so the run records it.
            self.engine.dead_letters.record(
                session, run, row, failure=failure, attempts=failures, now=now
            )
            return True
        set_activity(
            session,
            run.run_id,
            row["activity_id"],
            status="FAILED",
            deadline_at=None,
            closed_at=now,
            last_failure=failure.to_json(),
            attempt_failures=failures,
        )
        if not run.is_open:
            return False
        run.append(
            ActivityFailed(
                activity_id=row["activity_id"],
                activity_type=row["activity_type"],
                attempt=attempt,
                failure=failure.to_json(),
            )
        )
        return True

    # --------------------------------------------------- retries and deadlines
    def retry_due(self, session: Session, run: LockedRun, timer: Any, now: datetime) -> bool:
        """A retry timer fired: schedule the next attempt if the activity still waits."""
        row = activity_row(session, run.run_id, timer["ref"])
        if (
            row is None
            or row["status"] != "BACKOFF"
            or row["attempt"] + 1 != timer["attempt"]
            or not run.is_open
        ):
            return False
        set_activity(
            session,
            run.run_id,
            row["activity_id"],
            status="SCHEDULED",
            attempt=timer["attempt"],
            attempt_scheduled_at=now,
            started_at=None,
            deadline_at=_close_deadline(row),
        )
        self.engine.outbox.add(
            session,
            [
                messages.activity_task(
                    run_id=run.run_id,
                    workflow_id=run.workflow_id,
                    activity_id=row["activity_id"],
                    activity_type=row["activity_type"],
                    attempt=timer["attempt"],
                    queue=row["task_queue"],
                )
            ],
        )
        return True

    def expire(self, run_id: str, activity_id: str) -> int:
        """Time out an attempt past its deadline (under the run's lock, re-checked)."""
        engine = self.engine
        with engine.sessions() as session:
            run = lock_run(session, run_id, skip_locked=True)
            if run is None:
                return 0
            row = activity_row(session, run_id, activity_id)
            now = engine.clock()
            if (
                row is None
                or row["deadline_at"] is None
                or as_utc(row["deadline_at"]) > now
                or row["status"] not in ("SCHEDULED", "STARTED")
            ):
                return 0
            close = _close_deadline(row)
            if close is not None and now >= close:
                failure = Failure(
                    type="ActivityTimeout",
                    message=f"schedule-to-close timeout of {row['schedule_to_close']:g}s "
                    f"exceeded on attempt {row['attempt']}",
                    non_retryable=True,
                )
            elif row["heartbeat_timeout"] and now < as_utc(row["started_at"]) + timedelta(
                seconds=row["start_to_close"]
            ):
                failure = Failure(
                    type="ActivityTimeout",
                    message=f"no heartbeat for {row['heartbeat_timeout']:g}s "
                    f"on attempt {row['attempt']}",
                )
            else:
                failure = Failure(
                    type="ActivityTimeout",
                    message=f"start-to-close timeout of {row['start_to_close']:g}s "
                    f"exceeded on attempt {row['attempt']}",
                )
            appended = self.attempt_failed(session, run, row, failure, now)
            if appended:
                engine.after_result(session, run, now)  # saves the run
            else:
                save_run(session, run, now)
            engine.commit(session)
            return 1


def activity_row(session: Session, run_id: str, activity_id: str) -> Any:
    return (
        session.execute(_SELECT_ACTIVITY, {"b_run_id": run_id, "b_activity_id": activity_id})
        .mappings()
        .first()
    )


def set_activity(session: Session, run_id: str, activity_id: str, **values: Any) -> None:
    session.execute(_UPDATE_ACTIVITY, {"b_run_id": run_id, "b_activity_id": activity_id, **values})
