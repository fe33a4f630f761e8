"""The state transitions of runs: start, workflow task, activity attempt, timers.

Each public method is one transaction (the activity attempt is two, around the
user's code) that locks the run, appends to its history and writes the messages
that follow from it to the outbox, so a transition and its messages commit
together or not at all. Consumers are idempotent by state: a message names the
state it expects (a run with new events, an activity attempt that is scheduled),
and a duplicate or stale message finds that state gone and does nothing.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine as DbEngine
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from activities.context import ActivityInfo
from activities.definition import ActivityDefinition
from activities.execution import Outcome, execute
from activities.failure import Failure
from activities.retry import RetryPolicy
from orchestrator import messages
from orchestrator.db import as_utc, session_factory, utcnow
from orchestrator.definition import WorkflowDefinition
from orchestrator.errors import (
    NondeterminismError,
    RunClosedError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)
from orchestrator.history import (
    CLOSING_EVENTS,
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    CancelRequested,
    HistoryEvent,
    WorkflowCompensated,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from orchestrator.instance import ActivityDefaults, WorkflowInstance
from orchestrator.policies import IdConflictPolicy, IdReusePolicy, RunStatus
from orchestrator.registry import Registry
from orchestrator.runs import InstanceCache, LockedRun, load_history, lock_run, save_run
from orchestrator.schema import activity_tasks, timers, workflow_runs
from orchestrator.settings import Settings
from outbox.crashpoints import crash_point
from outbox.message import OutboxMessage
from outbox.writer import OutboxWriter

log = logging.getLogger("orchestrator.engine")

ACTIVITY_RETRY = "ACTIVITY_RETRY"
_KEEP_ATTEMPT_FAILURES = 20


@dataclass(frozen=True)
class StartResult:
    run_id: str
    created: bool


class Engine:
    """Runs' transitions over one database and one outbox."""

    def __init__(
        self,
        *,
        registry: Registry,
        settings: Settings,
        db: DbEngine,
        outbox: OutboxWriter,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.db = db
        self.outbox = outbox
        self.sessions = session_factory(db)
        self.cache = InstanceCache(settings.instance_cache_size)
        self._defaults = ActivityDefaults(
            start_to_close=settings.default_start_to_close_seconds,
            max_payload_bytes=settings.max_payload_bytes,
        )

    # ------------------------------------------------------------------ starting
    def start(
        self,
        session: Session,
        defn: WorkflowDefinition,
        payload: Any,
        *,
        workflow_id: str,
        id_reuse_policy: IdReusePolicy,
        id_conflict_policy: IdConflictPolicy,
    ) -> StartResult:
        """Create a run inside ``session``'s transaction (the caller commits)."""
        existing = self._latest_run(session, workflow_id)
        if existing is not None:
            decided = self._decide_duplicate(
                workflow_id, existing, id_reuse_policy, id_conflict_policy
            )
            if decided is not None:
                return decided
        now = utcnow()
        run_id = str(uuid.uuid4())
        started = WorkflowStarted(
            workflow_type=defn.name,
            workflow_id=workflow_id,
            input=payload,
            seed=uuid.uuid4().int >> 65,
        )
        try:
            # A savepoint, so that losing a race for the id leaves the caller's
            # transaction usable.
            with session.begin_nested():
                session.execute(
                    insert(workflow_runs).values(
                        run_id=run_id,
                        workflow_id=workflow_id,
                        workflow_type=defn.name,
                        status=RunStatus.RUNNING.value,
                        input=payload,
                        history_length=0,
                        processed_seq=0,
                        cancel_requested=False,
                        task_failures=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
                run = LockedRun(
                    run_id=run_id,
                    workflow_id=workflow_id,
                    workflow_type=defn.name,
                    status=RunStatus.RUNNING,
                    history_length=0,
                    processed_seq=0,
                    cancel_requested=False,
                )
                run.append(started)
                save_run(session, run, now)
        except IntegrityError:
            existing = self._latest_run(session, workflow_id)
            if existing is None:
                raise
            decided = self._decide_duplicate(
                workflow_id, existing, id_reuse_policy, id_conflict_policy
            )
            if decided is None:
                raise
            return decided
        self.outbox.add(
            session,
            [messages.workflow_task(run_id, workflow_id, self.settings.workflow_queue)],
        )
        log.info(
            "workflow started",
            extra={"workflow_id": workflow_id, "run_id": run_id, "workflow_type": defn.name},
        )
        return StartResult(run_id=run_id, created=True)

    @staticmethod
    def _latest_run(session: Session, workflow_id: str) -> tuple[str, RunStatus] | None:
        row = session.execute(
            select(workflow_runs.c.run_id, workflow_runs.c.status)
            .where(workflow_runs.c.workflow_id == workflow_id)
            .order_by(workflow_runs.c.closed_at.is_(None).desc(), workflow_runs.c.created_at.desc())
            .limit(1)
        ).first()
        return (row[0], RunStatus(row[1])) if row else None

    @staticmethod
    def _decide_duplicate(
        workflow_id: str,
        existing: tuple[str, RunStatus],
        reuse: IdReusePolicy,
        conflict: IdConflictPolicy,
    ) -> StartResult | None:
        run_id, status = existing
        if not status.is_closed:
            if conflict is IdConflictPolicy.USE_EXISTING:
                return StartResult(run_id=run_id, created=False)
            raise WorkflowAlreadyStartedError(workflow_id, run_id, status.value)
        refused = reuse is IdReusePolicy.REJECT_DUPLICATE or (
            reuse is IdReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY and status is RunStatus.COMPLETED
        )
        if refused:
            raise WorkflowAlreadyStartedError(workflow_id, run_id, status.value)
        return None

    # ------------------------------------------------------------- workflow tasks
    def workflow_task(self, run_id: str) -> None:
        """Advance a run past the events it has not processed; a no-op if there are none."""
        try:
            with self.sessions() as session:
                run = lock_run(session, run_id)
                if run is None or not run.is_open or run.processed_seq >= run.history_length:
                    return
                self._advance(session, run)
                self.commit(session)
        except NondeterminismError as exc:
            self._record_task_failure(run_id, exc)
        except Exception as exc:
            log.exception("workflow task failed", extra={"run_id": run_id})
            self._record_task_failure(run_id, exc)

    def _advance(self, session: Session, run: LockedRun) -> None:
        """Apply the run's new events to its workflow code and record what it decides.

        Must be called with the run locked. The instance goes back to the cache only
        once the transaction has committed.
        """
        defn = self.registry.workflow(run.workflow_type)
        instance = self.cache.take(run.run_id)
        if instance is None or instance.applied_seq > run.history_length:
            instance = WorkflowInstance(
                defn, run_id=run.run_id, workflow_id=run.workflow_id, defaults=self._defaults
            )
        # The caller has saved what it appended, so the history read here is complete.
        history = load_history(session, run.run_id, after=instance.applied_seq)
        commands = instance.advance(history, run.processed_seq)
        now = utcnow()
        outgoing: list[OutboxMessage] = []
        for command in commands:
            run.append(command)
            if isinstance(command, ActivityScheduled):
                outgoing.append(self._schedule_activity(session, run, command, now))
            elif command.TYPE in CLOSING_EVENTS:
                self._close(run, command, now)
        instance.recorded(len(commands))
        run.processed_seq = run.history_length
        run.changes["processed_seq"] = run.history_length
        run.changes["task_failure"] = None
        save_run(session, run, now)
        if outgoing:
            self.outbox.add(session, outgoing)
        session.info.setdefault("instances", []).append(instance)

    def _close(self, run: LockedRun, command: HistoryEvent, now: datetime) -> None:
        status = RunStatus(CLOSING_EVENTS[command.TYPE])
        run.status = status
        run.changes.update(status=status.value, closed_at=now)
        if isinstance(command, WorkflowCompleted):
            run.changes["result"] = command.result
        elif isinstance(command, WorkflowFailed | WorkflowCompensated):
            run.changes["failure"] = command.failure
        log.info(
            "workflow closed %s",
            status.value,
            extra={"workflow_id": run.workflow_id, "run_id": run.run_id},
        )

    def _schedule_activity(
        self, session: Session, run: LockedRun, command: ActivityScheduled, now: datetime
    ) -> OutboxMessage:
        close_deadline = (
            now + timedelta(seconds=command.schedule_to_close)
            if command.schedule_to_close
            else None
        )
        session.execute(
            insert(activity_tasks).values(
                run_id=run.run_id,
                activity_id=command.activity_id,
                activity_type=command.activity_type,
                task_queue=command.task_queue,
                input=command.input,
                attempt=1,
                status="SCHEDULED",
                retry_policy=command.retry_policy,
                start_to_close=command.start_to_close,
                schedule_to_close=command.schedule_to_close,
                is_compensation=command.is_compensation,
                idempotency_key=f"{run.workflow_id}/{run.run_id}/{command.activity_id}",
                scheduled_at=now,
                attempt_scheduled_at=now,
                deadline_at=close_deadline,
                attempt_failures=[],
            )
        )
        return messages.activity_task(
            run_id=run.run_id,
            workflow_id=run.workflow_id,
            activity_id=command.activity_id,
            activity_type=command.activity_type,
            attempt=1,
            queue=command.task_queue,
        )

    def _after_result(self, session: Session, run: LockedRun) -> None:
        """A result event was appended: advance here (fast path) or ask for a workflow task."""
        if not run.is_open:
            return
        if self.settings.fast_path and self.registry.has_workflow(run.workflow_type):
            try:
                with session.begin_nested():
                    self._advance(session, run)
                return
            except Exception as exc:
                # The result stays recorded; the workflow task retries the decision
                # (and records the failure if it fails again).
                log.warning(
                    "fast path failed, falling back to a workflow task: %s",
                    exc,
                    extra={"run_id": run.run_id},
                )
                session.info.pop("instances", None)
        self.outbox.add(
            session,
            [messages.workflow_task(run.run_id, run.workflow_id, self.settings.workflow_queue)],
        )

    def _record_task_failure(self, run_id: str, exc: BaseException) -> None:
        failure = Failure.from_exception(exc)
        log.error(
            "workflow task failed: %s: %s", failure.type, failure.message, extra={"run_id": run_id}
        )
        with self.sessions.begin() as session:
            session.execute(
                update(workflow_runs)
                .where(workflow_runs.c.run_id == run_id)
                .values(
                    task_failure=failure.to_json(),
                    task_failures=workflow_runs.c.task_failures + 1,
                    updated_at=utcnow(),
                )
            )

    def commit(self, session: Session) -> None:
        """Commit and hand the instances this transaction advanced back to the cache."""
        instances = session.info.pop("instances", [])
        session.commit()
        for instance in instances:
            self.cache.put(instance)

    # ---------------------------------------------------------------- cancelling
    def request_cancel(self, run_id: str, reason: str = "") -> bool:
        """Ask a run to cancel; False if it was already asked. RunClosedError if closed."""
        with self.sessions() as session:
            run = lock_run(session, run_id)
            if run is None:
                raise WorkflowNotFoundError(f"no run {run_id}")
            if not run.is_open:
                raise RunClosedError(f"run {run_id} is already {run.status.value}")
            if run.cancel_requested:
                return False
            run.cancel_requested = True
            run.changes["cancel_requested"] = True
            run.append(CancelRequested(reason=reason))
            save_run(session, run, utcnow())
            self._after_result(session, run)
            self.commit(session)
        return True

    # ------------------------------------------------------------ activity tasks
    def activity_task(self, run_id: str, activity_id: str, attempt: int) -> None:
        """Run one activity attempt, if it is still the current one, and record its outcome."""
        claimed = self._claim_attempt(run_id, activity_id, attempt)
        if claimed is None:
            return
        info, defn, payload = claimed
        crash_point("activity.started")

        def heartbeat(details: Any) -> None:
            self._heartbeat(run_id, activity_id, attempt, details)

        outcome = execute(
            defn, info, payload, heartbeat=heartbeat, limit=self.settings.max_payload_bytes
        )
        crash_point("activity.executed")
        self._finish_attempt(run_id, activity_id, attempt, outcome)

    def _claim_attempt(
        self, run_id: str, activity_id: str, attempt: int
    ) -> tuple[ActivityInfo, ActivityDefinition, Any] | None:
        now = utcnow()
        with self.sessions.begin() as session:
            row = (
                session.execute(
                    select(
                        activity_tasks, workflow_runs.c.workflow_id, workflow_runs.c.workflow_type
                    )
                    .join(workflow_runs, workflow_runs.c.run_id == activity_tasks.c.run_id)
                    .where(
                        activity_tasks.c.run_id == run_id,
                        activity_tasks.c.activity_id == activity_id,
                    )
                    .with_for_update(of=activity_tasks)
                )
                .mappings()
                .first()
            )
            if row is None or row["attempt"] != attempt or row["status"] != "SCHEDULED":
                log.info(
                    "dropping stale activity message",
                    extra={"run_id": run_id, "activity_id": activity_id, "attempt": attempt},
                )
                return None
            defn = self.registry.activity(row["activity_type"])
            deadline = now + timedelta(seconds=row["start_to_close"])
            if row["schedule_to_close"]:
                close = as_utc(row["scheduled_at"]) + timedelta(seconds=row["schedule_to_close"])
                deadline = min(deadline, close)
            session.execute(
                update(activity_tasks)
                .where(
                    activity_tasks.c.run_id == run_id,
                    activity_tasks.c.activity_id == activity_id,
                )
                .values(status="STARTED", started_at=now, deadline_at=deadline)
            )
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
            deadline=deadline,
            heartbeat_details=row["heartbeat_details"],
            is_compensation=bool(row["is_compensation"]),
        )
        return info, defn, row["input"]

    def _heartbeat(self, run_id: str, activity_id: str, attempt: int, details: Any) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(activity_tasks)
                .where(
                    activity_tasks.c.run_id == run_id,
                    activity_tasks.c.activity_id == activity_id,
                    activity_tasks.c.attempt == attempt,
                )
                .values(heartbeat_details=details)
            )

    def _finish_attempt(
        self, run_id: str, activity_id: str, attempt: int, outcome: Outcome
    ) -> None:
        with self.sessions() as session:
            run = lock_run(session, run_id)
            row = self._activity_row(session, run_id, activity_id)
            if (
                run is None
                or row is None
                or row["attempt"] != attempt
                or row["status"] != "STARTED"
            ):
                log.info(
                    "activity outcome arrived for an attempt that is no longer current",
                    extra={"run_id": run_id, "activity_id": activity_id, "attempt": attempt},
                )
                return
            now = utcnow()
            if outcome.failure is None:
                self._set_activity(session, run_id, activity_id, status="COMPLETED", closed_at=now)
                run.append(
                    ActivityCompleted(
                        activity_id=activity_id,
                        activity_type=row["activity_type"],
                        attempt=attempt,
                        result=outcome.result,
                    )
                )
                appended = True
            else:
                appended = self._attempt_failed(session, run, row, outcome.failure, now)
            save_run(session, run, now)
            if appended:
                self._after_result(session, run)
            self.commit(session)

    @staticmethod
    def _activity_row(session: Session, run_id: str, activity_id: str) -> Any:
        return (
            session.execute(
                select(activity_tasks).where(
                    activity_tasks.c.run_id == run_id,
                    activity_tasks.c.activity_id == activity_id,
                )
            )
            .mappings()
            .first()
        )

    @staticmethod
    def _set_activity(session: Session, run_id: str, activity_id: str, **values: Any) -> None:
        session.execute(
            update(activity_tasks)
            .where(activity_tasks.c.run_id == run_id, activity_tasks.c.activity_id == activity_id)
            .values(**values)
        )

    def _attempt_failed(
        self, session: Session, run: LockedRun, row: Any, failure: Failure, now: datetime
    ) -> bool:
        """Schedule a durable retry or fail the activity for good; True if an event was appended."""
        attempt = row["attempt"]
        policy = RetryPolicy.from_json(row["retry_policy"])
        failures = [
            *list(row["attempt_failures"] or [])[-(_KEEP_ATTEMPT_FAILURES - 1) :],
            {"attempt": attempt, "at": now.isoformat(), "failure": failure.to_json()},
        ]
        delay = policy.delay_after(attempt)
        close_deadline = (
            as_utc(row["scheduled_at"]) + timedelta(seconds=row["schedule_to_close"])
            if row["schedule_to_close"]
            else None
        )
        retry = policy.should_retry(attempt, failure) and (
            close_deadline is None or now + delay < close_deadline
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
            self._set_activity(
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
        self._set_activity(
            session,
            run.run_id,
            row["activity_id"],
            status="FAILED",
            deadline_at=None,
            closed_at=now,
            last_failure=failure.to_json(),
            attempt_failures=failures,
        )
        run.append(
            ActivityFailed(
                activity_id=row["activity_id"],
                activity_type=row["activity_type"],
                attempt=attempt,
                failure=failure.to_json(),
            )
        )
        return True

    # -------------------------------------------------- timers and deadlines
    def fire_due(self, limit: int = 100) -> int:
        """Fire due retry timers and expire activities past their deadline.

        Safe to run in several processes at once: each item is handled under its
        run's lock, taken with SKIP LOCKED, and re-checked before it acts.
        """
        now = utcnow()
        with self.sessions() as session:
            due_timers = session.execute(
                select(timers.c.id, timers.c.run_id)
                .where(timers.c.fire_at <= now)
                .order_by(timers.c.fire_at)
                .limit(limit)
            ).all()
            expired = session.execute(
                select(activity_tasks.c.run_id, activity_tasks.c.activity_id)
                .where(activity_tasks.c.deadline_at <= now)
                .order_by(activity_tasks.c.deadline_at)
                .limit(limit)
            ).all()
        done = 0
        for timer_id, run_id in due_timers:
            done += self._fire_timer(timer_id, run_id)
        for run_id, activity_id in expired:
            done += self._expire_activity(run_id, activity_id)
        return done

    def _fire_timer(self, timer_id: int, run_id: str) -> int:
        with self.sessions() as session:
            run = lock_run(session, run_id, skip_locked=True)
            if run is None:
                return 0
            timer = (
                session.execute(select(timers).where(timers.c.id == timer_id)).mappings().first()
            )
            if timer is None:
                return 0
            session.execute(delete(timers).where(timers.c.id == timer_id))
            row = self._activity_row(session, run_id, timer["ref"])
            fired = 0
            if (
                timer["kind"] == ACTIVITY_RETRY
                and row is not None
                and row["status"] == "BACKOFF"
                and row["attempt"] + 1 == timer["attempt"]
                and run.is_open
            ):
                now = utcnow()
                close_deadline = (
                    as_utc(row["scheduled_at"]) + timedelta(seconds=row["schedule_to_close"])
                    if row["schedule_to_close"]
                    else None
                )
                self._set_activity(
                    session,
                    run_id,
                    row["activity_id"],
                    status="SCHEDULED",
                    attempt=timer["attempt"],
                    attempt_scheduled_at=now,
                    started_at=None,
                    deadline_at=close_deadline,
                )
                self.outbox.add(
                    session,
                    [
                        messages.activity_task(
                            run_id=run_id,
                            workflow_id=run.workflow_id,
                            activity_id=row["activity_id"],
                            activity_type=row["activity_type"],
                            attempt=timer["attempt"],
                            queue=row["task_queue"],
                        )
                    ],
                )
                fired = 1
            self.commit(session)
            return fired

    def _expire_activity(self, run_id: str, activity_id: str) -> int:
        with self.sessions() as session:
            run = lock_run(session, run_id, skip_locked=True)
            if run is None:
                return 0
            row = self._activity_row(session, run_id, activity_id)
            now = utcnow()
            if (
                row is None
                or row["deadline_at"] is None
                or as_utc(row["deadline_at"]) > now
                or row["status"] not in ("SCHEDULED", "STARTED")
            ):
                return 0
            closing = row["schedule_to_close"] and now >= as_utc(row["scheduled_at"]) + timedelta(
                seconds=row["schedule_to_close"]
            )
            if closing:
                failure = Failure(
                    type="ActivityTimeout",
                    message=f"schedule-to-close timeout of {row['schedule_to_close']:g}s "
                    f"exceeded on attempt {row['attempt']}",
                    non_retryable=True,
                )
            else:
                failure = Failure(
                    type="ActivityTimeout",
                    message=f"start-to-close timeout of {row['start_to_close']:g}s "
                    f"exceeded on attempt {row['attempt']}",
                )
            appended = self._attempt_failed(session, run, row, failure, now)
            save_run(session, run, now)
            if appended:
                self._after_result(session, run)
            self.commit(session)
            return 1
