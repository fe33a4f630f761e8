"""The state transitions of runs: start, workflow task, signal, cancel, terminate.

Each public method is one transaction that locks the run, appends to its history
and writes the messages that follow from it to the outbox, so a transition and
its messages commit together or not at all. Consumers are idempotent by state: a
message names the state it expects (a run with new events, an activity attempt
that is scheduled), and a duplicate or stale message finds that state gone and
does nothing. Activity attempts live in :mod:`orchestrator.activity_runner`,
timers in :mod:`orchestrator.timers`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine as DbEngine
from sqlalchemy import bindparam, insert, null, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from activities.failure import Failure
from events import EventEnvelope, event_message
from orchestrator import audit, messages, metrics
from orchestrator.activity_runner import (
    EAGER_ALLOWED,
    EAGER_CLAIM,
    ActivityRunner,
    ClaimedAttempt,
    EagerObserver,
)
from orchestrator.db import once_more_on_disconnect, session_factory, utcnow
from orchestrator.dead_letters import DeadLetters
from orchestrator.errors import (
    HistoryLimitError,
    NondeterminismError,
    RunClosedError,
    UnknownWorkflowTypeError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)
from orchestrator.history import (
    CLOSING_EVENTS,
    ActivityScheduled,
    CancelRequested,
    ChildWorkflowClosed,
    ChildWorkflowScheduled,
    EventEmitted,
    HistoryEvent,
    RecordedEvent,
    SignalReceived,
    TimerCancelled,
    TimerStarted,
    WorkflowCompensated,
    WorkflowCompleted,
    WorkflowContinuedAsNew,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowTerminated,
    load_event,
)
from orchestrator.instance import ActivityDefaults, WorkflowInstance
from orchestrator.lifecycle import WorkflowClosed, WorkflowRunStarted, lifecycle_message
from orchestrator.pipeline import commit
from orchestrator.policies import IdConflictPolicy, IdReusePolicy, ParentClosePolicy, RunStatus
from orchestrator.registry import Registry
from orchestrator.run_closed import RUN_CLOSED_CHANNEL
from orchestrator.runs import (
    PREFETCHED_HISTORY,
    InstanceCache,
    LockedRun,
    load_history,
    lock_run,
    save_run,
    snapshot,
)
from orchestrator.schema import activity_tasks, workflow_runs
from orchestrator.sessions import after_commit, bound_to, on_close
from orchestrator.settings import Settings
from orchestrator.timers import TimerService, cancel_timer, delete_run_timers, start_timer
from orchestrator.writes import write
from outbox.message import OutboxMessage
from outbox.writer import OutboxWriter

log = logging.getLogger("orchestrator.engine")

Clock = Callable[[], datetime]

# A start that finds the workflow id held by an open run inserts nothing; the
# unique index on open runs' ids decides, without an error.
_INSERT_RUN = insert(workflow_runs).returning(workflow_runs.c.run_id)
_INSERT_RUN_UNLESS_OPEN = {
    "postgresql": postgresql.insert(workflow_runs)
    .on_conflict_do_nothing()
    .returning(workflow_runs.c.run_id),
    "sqlite": sqlite.insert(workflow_runs)
    .on_conflict_do_nothing()
    .returning(workflow_runs.c.run_id),
}
# The same insert, not read back (PostgreSQL): a start that commits in the
# round trip of its writes. When an open run holds the workflow id it inserts
# nothing, and the rows that refer to the new run fail the commit with a
# foreign-key violation: the caller starts again the careful way.
_INSERT_RUN_UNREAD = postgresql.insert(workflow_runs).on_conflict_do_nothing()
# The session flag of such a start.
UNREAD_START = "unread_start"
# The session key of the instances a transaction's decisions took or made.
_TAKEN = "taken_instances"
_START_ATTEMPTS = 3

_CANCEL_OPEN_ACTIVITIES = (
    update(activity_tasks)
    .where(
        activity_tasks.c.run_id == bindparam("b_run_id"),
        activity_tasks.c.status.in_(("SCHEDULED", "STARTED", "BACKOFF")),
    )
    .values(status="CANCELLED", deadline_at=None)
)


@dataclass(frozen=True)
class StartResult:
    run_id: str
    created: bool


@dataclass(frozen=True)
class ParentLink:
    """Where a child run reports when it closes."""

    run_id: str
    child_id: str
    close_policy: ParentClosePolicy


def log_started(workflow_id: str, run_id: str, workflow_type: str) -> None:
    log.info(
        "workflow started",
        extra={"workflow_id": workflow_id, "run_id": run_id, "workflow_type": workflow_type},
    )


class Engine:
    """Runs' transitions over one database and one outbox."""

    def __init__(
        self,
        *,
        registry: Registry,
        settings: Settings,
        db: DbEngine,
        outbox: OutboxWriter,
        clock: Clock = utcnow,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.db = db
        self.outbox = outbox
        self.clock = clock
        self.sessions = session_factory(db)
        self.cache = InstanceCache(settings.instance_cache_size)
        # The activity queues this process serves (a worker's): an activity decided
        # here on one of them runs here at once (eager dispatch). Empty elsewhere.
        self.eager_queues: frozenset[str] = frozenset()
        self.eager_observer: EagerObserver | None = None
        self.activities = ActivityRunner(self)
        self.timers = TimerService(self)
        self.dead_letters = DeadLetters(self)
        self._defaults = ActivityDefaults(
            start_to_close=settings.default_start_to_close_seconds,
            max_payload_bytes=settings.max_payload_bytes,
            max_pending=settings.max_pending,
            history_warn_events=settings.history_warn_events,
        )

    def remember(self, run: LockedRun, history: list[RecordedEvent], *, after: int) -> None:
        """Bring this process's instance of ``run`` up to date, both read just now.

        ``history`` holds the run's events after ``after``: the whole of it for
        a run this process has no instance of (``after`` 0), the ones its cached
        instance has not applied otherwise. Only for an open run with nothing
        left to process; the row is kept as known, for the next result to be
        recorded without reading it (see ``InstanceCache.known_run``). An
        instance that does not replay cleanly is dropped: the careful path
        meets the problem again and handles it.
        """
        instance = self.cache.take(run.run_id)
        if (instance is None) != (after == 0) or (
            instance is not None and instance.applied_seq != after
        ):
            # Evicted, or moved on, since the claim looked: nothing to bring up.
            if instance is not None:
                self.cache.put(instance)
            return
        if (
            not run.is_open
            or run.paused
            or run.has_task_failure
            or run.processed_seq != run.history_length
            or [event.seq for event in history] != list(range(after + 1, run.history_length + 1))
            or not self.registry.has_workflow(run.workflow_type)
        ):
            if instance is not None:
                self.cache.put(instance)
            return
        if instance is None:
            instance = WorkflowInstance(
                self.registry.workflow(run.workflow_type),
                run_id=run.run_id,
                workflow_id=run.workflow_id,
                defaults=self._defaults,
            )
        try:
            clean = not instance.advance(history, run.processed_seq) and not instance.closed
        except Exception:
            log.debug("replay ahead of a result failed", exc_info=True)
            clean = False
        if not clean:
            instance.close()
            return
        instance.known_run = run
        self.cache.put(instance)

    def serve_locally(self, queues: frozenset[str], observer: EagerObserver | None) -> None:
        """Run activities decided on ``queues`` in this process (see ``eager_queues``)."""
        self.eager_queues = queues
        self.eager_observer = observer

    # Entry points of the broker's consumers.
    def activity_task(self, run_id: str, activity_id: str, attempt: int) -> Failure | None:
        """Run an attempt a message asked for (see ``ActivityRunner.run_attempt``)."""
        return self.activities.run_attempt(run_id, activity_id, attempt)

    def fire_due(self, limit: int = 100) -> int:
        return self.timers.fire_due(limit)

    # ------------------------------------------------------------------ starting
    def start(
        self,
        session: Session,
        workflow_type: str,
        payload: Any,
        *,
        workflow_id: str,
        id_reuse_policy: IdReusePolicy,
        id_conflict_policy: IdConflictPolicy,
        parent: ParentLink | None = None,
    ) -> StartResult:
        """Create a run inside ``session``'s transaction (the caller commits).

        The database decides a race for the workflow id: the run row's insert
        does nothing when an open run holds the id (no error, so the caller's
        transaction stays usable), and the policies then decide what to return.
        """
        # This start's own insert only: a child started by its first step reads its own.
        unread = bool(session.info.pop(UNREAD_START, False))
        for _ in range(_START_ATTEMPTS):
            if id_reuse_policy is not IdReusePolicy.ALLOW_DUPLICATE:
                # Only a closed run can refuse a start here: the insert sees open ones.
                decided = self._answer_existing(
                    session, workflow_id, id_reuse_policy, id_conflict_policy
                )
                if decided is not None:
                    return decided
            run_id = self._insert_run(
                session,
                workflow_type,
                workflow_id,
                payload,
                parent,
                # Where an open run is the expected case (signal-with-start), its
                # code must not run for a run that is not created.
                decide_first=id_conflict_policy is not IdConflictPolicy.USE_EXISTING,
                unread=unread,
            )
            if run_id is not None:
                if not unread:  # its caller logs after the commit
                    log_started(workflow_id, run_id, workflow_type)
                return StartResult(run_id=run_id, created=True)
            decided = self._answer_existing(
                session, workflow_id, id_reuse_policy, id_conflict_policy
            )
            if decided is not None:
                return decided
            # The run that held the id closed in the meantime: try again.
        raise WorkflowAlreadyStartedError(workflow_id, "", "RUNNING")

    def _insert_run(
        self,
        session: Session,
        workflow_type: str,
        workflow_id: str,
        payload: Any,
        parent: ParentLink | None,
        *,
        signals: list[SignalReceived] | None = None,
        decide_first: bool = True,
        unread: bool = False,
    ) -> str | None:
        """Insert a run row, its first events and the message asking for its first task.

        ``signals`` follow the WorkflowStarted event: those a run that continued as
        new received too late to handle. None, and nothing written, if an open
        run holds the workflow id. With ``decide_first``, the first step is
        decided before the row is written, so that the row goes in as that step
        leaves it; otherwise only once the row is in (one update more).
        """
        now = self.clock()
        run_id = str(uuid.uuid4())
        run = LockedRun(
            run_id=run_id,
            workflow_id=workflow_id,
            workflow_type=workflow_type,
            status=RunStatus.RUNNING,
            history_length=0,
            processed_seq=0,
            cancel_requested=False,
            created_at=now,
            parent_run_id=parent.run_id if parent else None,
            parent_child_id=parent.child_id if parent else None,
            parent_close_policy=parent.close_policy.value if parent else None,
            workflow_queue=self.settings.workflow_queue,
        )
        run.append(
            WorkflowStarted(
                workflow_type=workflow_type,
                workflow_id=workflow_id,
                input=payload,
                seed=uuid.uuid4().int >> 65,
            )
        )
        for signal in signals or ():
            run.append(signal)
        decided = self._first_decision(session, run, now) if decide_first else None
        length = run.history_length + (len(decided[1]) if decided else 0)
        processed = length if decided else 0
        try:
            inserted = self._insert_run_row(
                session, run, payload, length=length, processed=processed, now=now, unread=unread
            )
        except BaseException:
            if decided:
                decided[0].close()
            raise
        if not inserted:  # an open run holds the workflow id
            if decided:
                decided[0].close()
            return None
        run.stored = {"history_length": length, "processed_seq": processed, "updated_at": now}
        if not decide_first:
            decided = self._first_decision(session, run, now)
        outgoing: list[OutboxMessage] = []
        if decided:
            instance, commands = decided
            self._record(session, run, instance, commands, now, outgoing=outgoing)
            # The next step runs in a worker; the starting process keeps no instance
            # (one that hit the history limit was closed and never registered).
            registered = session.info.get("instances", [])
            for entry in [entry for entry in registered if entry[0] is instance]:
                registered.remove(entry)
                instance.close()
        else:
            save_run(session, run, now)
            outgoing.append(self._task_message(run))
        if self.settings.lifecycle_events:
            started = WorkflowRunStarted(
                workflow_id=workflow_id, run_id=run_id, workflow_type=workflow_type
            )
            outgoing.append(lifecycle_message(started, suffix="started"))
        self.outbox.add(session, outgoing)
        return run_id

    @staticmethod
    def _insert_run_row(
        session: Session,
        run: LockedRun,
        payload: Any,
        *,
        length: int,
        processed: int,
        now: datetime,
        unread: bool = False,
    ) -> bool:
        """Insert the row; False, with nothing written, if an open run holds the id.

        In an unread start (:data:`UNREAD_START`) the insert is not read back and
        this is always True; the commit tells.
        """
        dialect = bound_to(session).dialect.name
        values = {
            "run_id": run.run_id,
            "workflow_id": run.workflow_id,
            "workflow_type": run.workflow_type,
            "status": RunStatus.RUNNING.value,
            "input": payload,
            "history_length": length,
            "processed_seq": processed,
            "cancel_requested": False,
            "paused": False,
            "task_failures": 0,
            "parent_run_id": run.parent_run_id,
            "parent_child_id": run.parent_child_id,
            "parent_close_policy": run.parent_close_policy,
            "parent_notified": False,
            "workflow_queue": run.workflow_queue,
            "created_at": now,
            "updated_at": now,
        }
        if unread and dialect == "postgresql":
            write(session, _INSERT_RUN_UNREAD, values)
            return True
        statement = _INSERT_RUN_UNLESS_OPEN.get(dialect, _INSERT_RUN)
        return session.execute(statement, values).first() is not None

    def _first_decision(
        self, session: Session, run: LockedRun, now: datetime
    ) -> tuple[WorkflowInstance, list[HistoryEvent]] | None:
        """On the fast path, decide a new run's first step in the transaction that starts it.

        It saves a workflow task (a message and a transaction) per run; a process
        without the workflow's code, or a decision that fails, leaves the first
        step to a worker as usual. None if nothing was decided here.
        """
        if not (self.settings.fast_path and self.registry.has_workflow(run.workflow_type)):
            return None
        try:
            return self._decide(session, run, now)
        except DBAPIError:
            raise
        except Exception as exc:
            log.warning("first step left to a worker: %s", exc, extra={"run_id": run.run_id})
            return None

    def _answer_existing(
        self,
        session: Session,
        workflow_id: str,
        reuse: IdReusePolicy,
        conflict: IdConflictPolicy,
    ) -> StartResult | None:
        """What the policies make of the id's latest run; None: start a new one."""
        existing = self._latest_run(session, workflow_id)
        if existing is None:
            return None
        return self._decide_duplicate(workflow_id, existing, reuse, conflict)

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
        claim: ClaimedAttempt | None = None
        try:
            claim = self._workflow_task(run_id)
        except NondeterminismError as exc:
            self._record_task_failure(run_id, exc)
        except Exception as exc:
            log.exception("workflow task failed", extra={"run_id": run_id})
            self._record_task_failure(run_id, exc)
        if claim is not None:
            self.activities.run_claimed(claim, eager=True)

    @once_more_on_disconnect
    def _workflow_task(self, run_id: str) -> ClaimedAttempt | None:
        with self.sessions() as session:
            session.info[EAGER_ALLOWED] = self.settings.eager_max_steps > 0
            run = lock_run(session, run_id)
            if (
                run is None
                or not run.is_open
                or run.paused
                or run.processed_seq >= run.history_length
            ):
                return None
            self._advance(session, run, self.clock())
            self.commit(session)
            claim: ClaimedAttempt | None = session.info.pop(EAGER_CLAIM, None)
            return claim

    def _advance(self, session: Session, run: LockedRun, now: datetime) -> None:
        """Apply the run's new events to its workflow code and record what it decides."""
        instance, commands = self._decide(session, run, now)
        self._record(session, run, instance, commands, now)

    def _decide(
        self, session: Session, run: LockedRun, now: datetime
    ) -> tuple[WorkflowInstance, list[HistoryEvent]]:
        """Run the workflow code over the events it has not seen; write nothing.

        Events appended in this transaction and not saved yet are fed from memory
        with ``now`` as their time, the time ``save_run`` will give them, so the
        code sees exactly what a later replay will see. A cached instance that is
        up to date needs no read at all.
        """
        defn = self.registry.workflow(run.workflow_type)
        instance = self.cache.take(run.run_id)
        if instance is not None and instance.applied_seq > run.history_length:
            instance.close()  # ahead of the run: advanced by a step that did not commit
            instance = None
        if instance is None:
            instance = WorkflowInstance(
                defn, run_id=run.run_id, workflow_id=run.workflow_id, defaults=self._defaults
            )
        # Closed by discard if the transaction does not commit, whatever it got to.
        session.info.setdefault(_TAKEN, []).append(instance)
        on_close(session, self.discard)
        saved = run.history_length - len(run.appended)
        history: list[RecordedEvent] = []
        if instance.applied_seq == saved:
            self.cache.settled(run.run_id)  # nothing came from outside since its last step
        if instance.applied_seq < saved:
            prefetched = session.info.pop(PREFETCHED_HISTORY, None)
            if prefetched is not None and prefetched[0] == run.run_id:
                # Read from the first event, under the run's lock: all of it.
                history = [e for e in prefetched[1] if instance.applied_seq < e.seq <= saved]
            else:
                history = load_history(session, run.run_id, after=instance.applied_seq)
        # Copies, rebuilt from their stored form: workflow code that changes a
        # value it received must not change the event about to be saved.
        history += [
            RecordedEvent(
                seq=seq, created_at=now, event=load_event(event.TYPE, event.model_dump(mode="json"))
            )
            for seq, event in run.appended
            if seq > instance.applied_seq
        ]
        try:
            commands = instance.advance(history, run.processed_seq)
        except BaseException:
            instance.close()
            raise
        return instance, commands

    def _record(
        self,
        session: Session,
        run: LockedRun,
        instance: WorkflowInstance,
        commands: list[HistoryEvent],
        now: datetime,
        *,
        outgoing: list[OutboxMessage] | None = None,
    ) -> None:
        """Append what the code decided and act on it; the instance is cached after commit.

        The messages to send go to the outbox, or into ``outgoing`` for a caller
        that writes more of them in the same transaction (one insert for all).
        """
        if run.history_length + len(commands) > self.settings.max_history_events:
            self._fail_on_history_limit(session, run, now)
            instance.close()
            return
        sending: list[OutboxMessage] = [] if outgoing is None else outgoing
        follow_ups: list[HistoryEvent] = []
        for issued in commands:
            command = (
                self._continue_as_new(session, run, issued, instance.carried_signals)
                if isinstance(issued, WorkflowContinuedAsNew)
                else issued
            )
            run.append(command)
            if isinstance(command, ActivityScheduled):
                message = self.activities.schedule(session, run, command, now)
                if message is not None:
                    sending.append(message)
            elif isinstance(command, TimerStarted):
                start_timer(session, run, command.timer_id, command.seconds, now)
            elif isinstance(command, TimerCancelled):
                cancel_timer(session, run, command.timer_id)
            elif isinstance(command, EventEmitted):
                sending.append(event_message(EventEnvelope.model_validate(command.envelope)))
            elif isinstance(command, ChildWorkflowScheduled):
                follow_ups.extend(self._start_child(session, run, command))
            elif command.TYPE in CLOSING_EVENTS:
                self._close(session, run, command, now, instance=instance)
        instance.recorded(len(commands))
        run.processed_seq = run.history_length
        run.changes["processed_seq"] = run.history_length
        if run.has_task_failure:
            run.changes["task_failure"] = null()  # SQL NULL, not a JSON null
            run.has_task_failure = False
        for event in follow_ups:
            # Results known at once (a child that could not start) are new events
            # for the next workflow task.
            run.append(event)
        save_run(session, run, now)
        if follow_ups:
            sending.append(self._task_message(run))
        if outgoing is None and sending:
            self.outbox.add(session, sending)
        session.info.setdefault("instances", []).append((instance, run))

    def _fail_on_history_limit(self, session: Session, run: LockedRun, now: datetime) -> None:
        limit = self.settings.max_history_events
        error = HistoryLimitError(
            f"run {run.run_id} would exceed {limit} history events; "
            "use workflow.continue_as_new to keep entity histories bounded"
        )
        command = WorkflowFailed(failure=Failure.from_exception(error).to_json())
        run.append(command)
        self._close(session, run, command, now)
        run.processed_seq = run.history_length
        run.changes["processed_seq"] = run.history_length
        save_run(session, run, now)

    def _continue_as_new(
        self,
        session: Session,
        run: LockedRun,
        command: WorkflowContinuedAsNew,
        carried: list[SignalReceived],
    ) -> WorkflowContinuedAsNew:
        """Close this run and start its successor under the same workflow id."""
        # The old run must be closed before the new one takes the open-id slot.
        session.execute(
            update(workflow_runs)
            .where(workflow_runs.c.run_id == run.run_id)
            .values(closed_at=self.clock(), status=RunStatus.CONTINUED_AS_NEW.value)
        )
        parent = self._parent_of(run)
        new_run_id = self._insert_run(
            session, run.workflow_type, run.workflow_id, command.input, parent, signals=carried
        )
        if new_run_id is None:  # pragma: no cover - this run held the id until just now
            raise RuntimeError(f"workflow id {run.workflow_id} was taken while continuing as new")
        # The successor reports to the parent; this run no longer does.
        session.execute(
            update(workflow_runs)
            .where(workflow_runs.c.run_id == run.run_id)
            .values(parent_notified=True)
        )
        return command.model_copy(
            update={
                "new_run_id": new_run_id,
                "carried_signals": [s.model_dump(mode="json") for s in carried],
            }
        )

    def workflow_queue(self, stored: str | None) -> str:
        """The queue of a run's workflow tasks, from its row's ``workflow_queue``.

        That of the app that started it; this process's own for a row from
        before the column.
        """
        return stored or self.settings.workflow_queue

    def _task_message(self, run: LockedRun) -> OutboxMessage:
        """The message asking for ``run``'s next workflow task, on its own queue."""
        return messages.workflow_task(
            run.run_id, run.workflow_id, self.workflow_queue(run.workflow_queue)
        )

    @staticmethod
    def _parent_of(run: LockedRun) -> ParentLink | None:
        if run.parent_run_id is None or run.parent_child_id is None:
            return None
        assert run.parent_close_policy is not None, "a child run records its close policy"
        return ParentLink(
            run_id=run.parent_run_id,
            child_id=run.parent_child_id,
            close_policy=ParentClosePolicy(run.parent_close_policy),
        )

    def _start_child(
        self, session: Session, run: LockedRun, command: ChildWorkflowScheduled
    ) -> list[HistoryEvent]:
        parent = ParentLink(
            run_id=run.run_id,
            child_id=command.child_id,
            close_policy=ParentClosePolicy(command.parent_close_policy),
        )
        try:
            # A type no worker here knows would leave the child stuck forever.
            self.registry.workflow(command.workflow_type)
            self.start(
                session,
                command.workflow_type,
                command.input,
                workflow_id=command.workflow_id,
                id_reuse_policy=IdReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=IdConflictPolicy.FAIL,
                parent=parent,
            )
        except (WorkflowAlreadyStartedError, UnknownWorkflowTypeError) as exc:
            return [
                ChildWorkflowClosed(
                    child_id=command.child_id,
                    workflow_id=command.workflow_id,
                    status="START_FAILED",
                    failure=Failure.from_exception(exc).to_json(),
                )
            ]
        return []

    def _close(
        self,
        session: Session,
        run: LockedRun,
        command: HistoryEvent,
        now: datetime,
        *,
        instance: WorkflowInstance | None = None,
    ) -> None:
        """Close the run and everything it left open.

        ``instance``, the run's code up to this step, tells what the run may have
        left open (timers, attempts, children); without it, all is looked for.
        """
        status = RunStatus(CLOSING_EVENTS[command.TYPE])
        metrics.run_closed(session, run.workflow_type, status.value, run.created_at, now)
        run.status = status
        run.changes.update(status=status.value, closed_at=now)
        if isinstance(command, WorkflowCompleted):
            run.changes["result"] = command.result
        elif isinstance(command, WorkflowFailed | WorkflowCompensated):
            run.changes["failure"] = command.failure
        elif isinstance(command, WorkflowContinuedAsNew):
            run.changes["result"] = {"continued_as": command.new_run_id}
        elif isinstance(command, WorkflowTerminated):
            run.changes["failure"] = Failure(
                type="Terminated", message=command.reason or "terminated"
            ).to_json()
        may_have_open_work = instance is None or instance.may_have_open_work
        if may_have_open_work:
            delete_run_timers(session, run.run_id)
        # Activities not done yet will never be asked for: no attempt may start,
        # and the outcome of one still running is dropped. That includes one this
        # transaction claimed to run eagerly (scheduled by the step that closes).
        claim = session.info.get(EAGER_CLAIM)
        if claim is not None and claim.info.run_id == run.run_id:
            del session.info[EAGER_CLAIM]
        if may_have_open_work:
            session.execute(_CANCEL_OPEN_ACTIVITIES, {"b_run_id": run.run_id, "closed_at": now})
        may_have_children = instance is None or instance.started_children
        outgoing = self._close_children(session, run) if may_have_children else []
        if self.settings.lifecycle_events:
            failure = run.changes.get("failure")
            closed = WorkflowClosed(
                workflow_id=run.workflow_id,
                run_id=run.run_id,
                workflow_type=run.workflow_type,
                status=status.value,
                failure_type=failure.get("type") if isinstance(failure, dict) else None,
                failure_message=failure.get("message") if isinstance(failure, dict) else None,
            )
            outgoing.append(lifecycle_message(closed, suffix="closed"))
        if status is not RunStatus.CONTINUED_AS_NEW:
            outgoing += self._notify_parent(run, status, run.changes)
        if outgoing:
            self.outbox.add(session, outgoing)
        extra = {"workflow_id": run.workflow_id, "run_id": run.run_id}
        # Said once the close has committed: a close refused at its commit is made again.
        after_commit(session, lambda: log.info("workflow closed %s", status.value, extra=extra))
        doorbell = self.outbox.doorbell
        if doorbell is not None:
            # Wakes whoever waits for the result (see run_closed).
            run_id = run.run_id
            after_commit(session, lambda: doorbell.ring(RUN_CLOSED_CHANNEL, run_id))

    def _close_children(self, session: Session, run: LockedRun) -> list[OutboxMessage]:
        children = session.execute(
            select(
                workflow_runs.c.run_id,
                workflow_runs.c.workflow_id,
                workflow_runs.c.parent_close_policy,
                workflow_runs.c.workflow_queue,
            ).where(
                workflow_runs.c.parent_run_id == run.run_id,
                workflow_runs.c.closed_at.is_(None),
            )
        ).all()
        return [
            messages.run_control(
                child_run_id,
                child_workflow_id,
                "terminate" if policy == ParentClosePolicy.TERMINATE.value else "cancel",
                f"parent {run.workflow_id} closed",
                self.workflow_queue(queue),
            )
            for child_run_id, child_workflow_id, policy, queue in children
            if policy != ParentClosePolicy.ABANDON.value
        ]

    def _notify_parent(
        self, run: LockedRun, status: RunStatus, changes: dict[str, Any]
    ) -> list[OutboxMessage]:
        parent = self._parent_of(run)
        if parent is None:
            return []
        return [
            messages.child_closed(
                parent_run_id=parent.run_id,
                child_id=parent.child_id,
                child_run_id=run.run_id,
                child_workflow_id=run.workflow_id,
                status=status.value,
                result=changes.get("result"),
                failure=changes.get("failure"),
                # The parent's: a child runs where its parent started it.
                queue=self.workflow_queue(run.workflow_queue),
            )
        ]

    def after_result(self, session: Session, run: LockedRun, now: datetime) -> None:
        """A result event was appended: save it, and advance here or ask for a workflow task.

        The fast path decides before writing anything, so a decision that fails
        (a nondeterminism, a bug) leaves the result recorded and falls back to a
        workflow task, which retries the decision and records its failure.
        """
        if not run.is_open or run.paused:
            save_run(session, run, now)  # a paused run catches up when it is resumed
            return
        if self.settings.fast_path and self.registry.has_workflow(run.workflow_type):
            try:
                instance, commands = self._decide(session, run, now)
            except DBAPIError:
                # The database's error (perhaps a queued write's, surfacing at the
                # history read): the transaction is lost, not the decision.
                raise
            except Exception as exc:
                log.warning(
                    "fast path failed, falling back to a workflow task: %s",
                    exc,
                    extra={"run_id": run.run_id},
                )
            else:
                self._record(session, run, instance, commands, now)
                return
        save_run(session, run, now)
        self.outbox.add(session, [self._task_message(run)])

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
                    updated_at=self.clock(),
                )
            )

    def commit(self, session: Session) -> None:
        """Commit and hand the instances this transaction advanced back to the cache."""

        def cache_instances() -> None:
            # Before the messages go out: the next step may come back here at once.
            taken = session.info.pop(_TAKEN, [])
            cached = set()
            for instance, run in session.info.pop("instances", []):
                instance.known_run = snapshot(run)
                self.cache.put(instance)
                cached.add(id(instance))
            for instance in taken:
                if id(instance) not in cached:
                    instance.close()

        try:
            commit(session, committed=cache_instances)
        except BaseException:
            self.discard(session)
            raise

    def discard(self, session: Session) -> int:
        """Close the instances a transaction took or advanced that will not commit; how many."""
        instances = {id(instance): instance for instance in session.info.pop(_TAKEN, [])}
        for instance, _run in session.info.pop("instances", []):
            instances[id(instance)] = instance
        for instance in instances.values():
            instance.close()
        return len(instances)

    # ------------------------------------------------- events from outside a run
    def _open_run(self, session: Session, run_id: str, *, follow: bool = False) -> LockedRun:
        """Lock an open run; with ``follow``, the run a continued one handed over to."""
        run = lock_run(session, run_id)
        while run is not None and follow and run.status is RunStatus.CONTINUED_AS_NEW:
            successor = session.execute(
                select(workflow_runs.c.result).where(workflow_runs.c.run_id == run.run_id)
            ).scalar_one()
            run = lock_run(session, successor["continued_as"])
        if run is None:
            raise WorkflowNotFoundError(f"no run {run_id}")
        if not run.is_open:
            raise RunClosedError(f"run {run_id} is already {run.status.value}")
        return run

    def request_cancel(self, run_id: str, reason: str = "", *, actor: str | None = None) -> bool:
        """Ask a run to cancel; False if it was already asked. RunClosedError if closed."""
        with self.sessions() as session:
            run = self._open_run(session, run_id)
            if run.cancel_requested:
                return False
            now = self.clock()
            run.cancel_requested = True
            run.changes["cancel_requested"] = True
            run.append(CancelRequested(reason=reason))
            self._audit(session, run, "cancel", actor=actor, reason=reason, now=now)
            self.after_result(session, run, now)
            self.commit(session)
        return True

    def terminate(self, run_id: str, reason: str = "", *, actor: str | None = None) -> None:
        """Close a run at once, running none of its code (no compensation)."""
        with self.sessions() as session:
            run = self._open_run(session, run_id)
            now = self.clock()
            event = WorkflowTerminated(reason=reason)
            run.append(event)
            self._close(session, run, event, now)
            run.processed_seq = run.history_length
            run.changes["processed_seq"] = run.history_length
            save_run(session, run, now)
            self._audit(session, run, "terminate", actor=actor, reason=reason, now=now)
            session.commit()
        dropped = self.cache.take(run_id)
        if dropped is not None:
            dropped.close()

    def signal(
        self, session: Session, run_id: str, name: str, payload: Any, *, actor: str | None = None
    ) -> None:
        """Record a signal inside ``session`` (the caller commits through ``commit``).

        A signal for an entity that has just continued as new goes to its new run.
        """
        run = self._open_run(session, run_id, follow=True)
        now = self.clock()
        run.append(SignalReceived(name=name, input=payload))
        self._audit(
            session, run, "signal", actor=actor, reason=None, now=now, details={"signal": name}
        )
        self.after_result(session, run, now)

    def pause(self, run_id: str, reason: str = "", *, actor: str | None = None) -> bool:
        """Stop a run dispatching anything new; False if it was already paused."""
        with self.sessions() as session:
            run = self._open_run(session, run_id)
            if run.paused:
                return False
            now = self.clock()
            run.changes["paused"] = True
            save_run(session, run, now)
            self._audit(session, run, "pause", actor=actor, reason=reason, now=now)
            session.commit()
        return True

    def resume(self, run_id: str, reason: str = "", *, actor: str | None = None) -> bool:
        """Let a paused run go on: it catches up on what arrived while it was paused."""
        with self.sessions() as session:
            run = self._open_run(session, run_id)
            if not run.paused:
                return False
            now = self.clock()
            run.paused = False
            run.changes["paused"] = False
            save_run(session, run, now)
            self._audit(session, run, "resume", actor=actor, reason=reason, now=now)
            waiting = session.execute(
                select(
                    activity_tasks.c.activity_id,
                    activity_tasks.c.activity_type,
                    activity_tasks.c.attempt,
                    activity_tasks.c.task_queue,
                ).where(activity_tasks.c.run_id == run_id, activity_tasks.c.status == "SCHEDULED")
            ).all()
            outgoing = [self._task_message(run)]
            outgoing += [
                messages.activity_task(
                    run_id=run.run_id,
                    workflow_id=run.workflow_id,
                    activity_id=activity_id,
                    activity_type=activity_type,
                    attempt=attempt,
                    queue=task_queue,
                )
                for activity_id, activity_type, attempt, task_queue in waiting
            ]
            self.outbox.add(session, outgoing)
            session.commit()
        return True

    @staticmethod
    def _audit(
        session: Session,
        run: LockedRun,
        action: str,
        *,
        actor: str | None,
        reason: str | None,
        now: datetime,
        details: dict[str, Any] | None = None,
    ) -> None:
        audit.record(
            session,
            action=action,
            at=now,
            actor=actor,
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            reason=reason,
            details=details,
        )

    def query(self, run_id: str, name: str, payload: Any) -> Any:
        """Replay a run's processed history in a private instance and ask it ``name``."""
        with self.sessions() as session:
            row = session.execute(
                select(
                    workflow_runs.c.workflow_id,
                    workflow_runs.c.workflow_type,
                    workflow_runs.c.processed_seq,
                ).where(workflow_runs.c.run_id == run_id)
            ).first()
            if row is None:
                raise WorkflowNotFoundError(f"no run {run_id}")
            workflow_id, workflow_type, processed_seq = row
            history = [e for e in load_history(session, run_id) if e.seq <= processed_seq]
        instance = WorkflowInstance(
            self.registry.workflow(workflow_type),
            run_id=run_id,
            workflow_id=workflow_id,
            defaults=self._defaults,
        )
        try:
            instance.advance(history, processed_seq)
            return instance.query(name, payload)
        finally:
            instance.close()

    def child_closed(
        self,
        *,
        parent_run_id: str,
        child_id: str,
        child_run_id: str,
        child_workflow_id: str,
        status: str,
        result: Any,
        failure: Any,
    ) -> None:
        """Deliver a child's outcome to its parent, once."""
        with self.sessions() as session:
            run = lock_run(session, parent_run_id)
            if run is None or not run.is_open:
                return
            # The flag on the child row makes a redelivered outcome a no-op.
            claimed = session.execute(  # type: ignore[attr-defined]
                update(workflow_runs)
                .where(
                    workflow_runs.c.run_id == child_run_id,
                    workflow_runs.c.parent_notified.is_(False),
                )
                .values(parent_notified=True)
            ).rowcount
            if not claimed:
                return
            run.append(
                ChildWorkflowClosed(
                    child_id=child_id,
                    workflow_id=child_workflow_id,
                    run_id=child_run_id,
                    status=status,
                    result=result,
                    failure=failure,
                )
            )
            self.after_result(session, run, self.clock())
            self.commit(session)

    def run_control(self, run_id: str, action: str, reason: str) -> None:
        """Terminate or cancel a run on another run's behalf (a parent closing)."""
        try:
            if action == "terminate":
                self.terminate(run_id, reason)
            else:
                self.request_cancel(run_id, reason)
        except (RunClosedError, WorkflowNotFoundError):
            return
