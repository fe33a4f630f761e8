"""Reading and writing one run under its lock: the row, its history, its cache.

Every transition of a run takes the run row's lock first (SELECT ... FOR UPDATE;
BEGIN IMMEDIATE on SQLite), so history sequence numbers never race and lock order
is always run row first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ClauseElement

from orchestrator.db import as_utc
from orchestrator.history import HistoryEvent, RecordedEvent, load_event
from orchestrator.instance import WorkflowInstance
from orchestrator.policies import RunStatus
from orchestrator.schema import workflow_events, workflow_runs
from orchestrator.writes import write


@dataclass
class LockedRun:
    """A run row held under lock, and the events this transaction appends to it."""

    run_id: str
    workflow_id: str
    workflow_type: str
    status: RunStatus
    history_length: int
    processed_seq: int
    cancel_requested: bool
    paused: bool = False
    created_at: datetime | None = None
    parent_run_id: str | None = None
    parent_child_id: str | None = None
    parent_close_policy: str | None = None
    has_task_failure: bool = False
    workflow_queue: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    # Column values the row already holds (a row inserted in this transaction):
    # a save that would only write these again writes nothing.
    stored: dict[str, Any] = field(default_factory=dict)
    appended: list[tuple[int, HistoryEvent]] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return not self.status.is_closed

    def append(self, event: HistoryEvent) -> int:
        self.history_length += 1
        self.appended.append((self.history_length, event))
        return self.history_length


# Statements of the hot path, built once: building a statement costs about as
# much as running it. Parameters are bound by name at each execution.
_RUN_COLUMNS = (
    workflow_runs.c.run_id,
    workflow_runs.c.workflow_id,
    workflow_runs.c.workflow_type,
    workflow_runs.c.status,
    workflow_runs.c.history_length,
    workflow_runs.c.processed_seq,
    workflow_runs.c.cancel_requested,
    workflow_runs.c.paused,
    workflow_runs.c.created_at,
    workflow_runs.c.parent_run_id,
    workflow_runs.c.parent_child_id,
    workflow_runs.c.parent_close_policy,
    workflow_runs.c.task_failure.is_not(None).label("has_task_failure"),
    workflow_runs.c.workflow_queue,
)
SELECT_RUN = select(*_RUN_COLUMNS).where(workflow_runs.c.run_id == bindparam("b_run_id"))
LOCK_RUN = SELECT_RUN.with_for_update()
_LOCK_RUN_SKIP_LOCKED = SELECT_RUN.with_for_update(skip_locked=True)
_INSERT_EVENTS = insert(workflow_events)
LOAD_HISTORY = (
    select(
        workflow_events.c.seq,
        workflow_events.c.event_type,
        workflow_events.c.attributes,
        workflow_events.c.created_at,
    )
    .where(
        workflow_events.c.run_id == bindparam("b_run_id"),
        workflow_events.c.seq > bindparam("b_after"),
    )
    .order_by(workflow_events.c.seq)
)
# The session key of a run's history read in the same round trip as its lock:
# (run_id, events); the decision uses it instead of reading again.
PREFETCHED_HISTORY = "prefetched_history"
# The SET clause comes from the parameters' names.
_UPDATE_RUN = update(workflow_runs).where(workflow_runs.c.run_id == bindparam("b_run_id"))


# The run's row is still as ``known`` (see known_run_params) left it: a
# condition for a statement that locks the row (``FOR UPDATE``).
# ``IS NOT DISTINCT FROM`` (the same as ``=`` on a column that is never null)
# keeps the status index out of the plan: on tables the planner has no
# statistics for yet (a new database, until autovacuum first analyzes it), the
# check otherwise reached its run through that index, reading every running
# run, and a prepared check kept that plan until then (see
# tests/integration/test_query_plans.py).
RUN_UNCHANGED = """
      run_id = :b_run_id AND status IS NOT DISTINCT FROM :b_status
        AND history_length = :b_length AND processed_seq = :b_processed
        AND NOT paused AND cancel_requested = :b_cancel AND task_failure IS NULL
"""


def snapshot(run: LockedRun) -> LockedRun:
    """A copy of a saved run, as it stands in the database after the commit."""
    return replace(run, changes={}, stored={}, appended=[])


def known_run_params(run: LockedRun) -> dict[str, Any]:
    """The parameters of :data:`RUN_UNCHANGED` for ``run`` as this process left it."""
    return {
        "b_run_id": run.run_id,
        "b_status": run.status.value,
        "b_length": run.history_length,
        "b_processed": run.processed_seq,
        "b_cancel": run.cancel_requested,
    }


def history_rows(rows: Iterable[Mapping[str, Any]]) -> list[RecordedEvent]:
    """The events of rows of :data:`LOAD_HISTORY` read as mappings (see read_together)."""
    return history_from(
        (row["seq"], row["event_type"], row["attributes"], row["created_at"]) for row in rows
    )


def locked_run_from(row: Any) -> LockedRun:
    """The run of a row of :data:`LOCK_RUN`."""
    return LockedRun(
        run_id=row["run_id"],
        workflow_id=row["workflow_id"],
        workflow_type=row["workflow_type"],
        status=RunStatus(row["status"]),
        history_length=row["history_length"],
        processed_seq=row["processed_seq"],
        cancel_requested=bool(row["cancel_requested"]),
        paused=bool(row["paused"]),
        created_at=as_utc(row["created_at"]),
        parent_run_id=row["parent_run_id"],
        parent_child_id=row["parent_child_id"],
        parent_close_policy=row["parent_close_policy"],
        has_task_failure=bool(row["has_task_failure"]),
        workflow_queue=row["workflow_queue"],
    )


def lock_run(session: Session, run_id: str, *, skip_locked: bool = False) -> LockedRun | None:
    """Lock and load a run, or None if it does not exist (or is busy, with skip_locked)."""
    statement = _LOCK_RUN_SKIP_LOCKED if skip_locked else LOCK_RUN
    row = session.execute(statement, {"b_run_id": run_id}).mappings().first()
    return None if row is None else locked_run_from(row)


def save_run(session: Session, run: LockedRun, now: datetime) -> None:
    """Write the appended events and the row's changes (still inside the lock)."""
    if run.appended:
        write(
            session,
            _INSERT_EVENTS,
            [
                {
                    "run_id": run.run_id,
                    "seq": seq,
                    "event_type": event.TYPE,
                    "attributes": event.model_dump(mode="json"),
                    "created_at": now,
                }
                for seq, event in run.appended
            ],
        )
    values = dict(run.changes)
    values["history_length"] = run.history_length
    values["updated_at"] = now
    if any(isinstance(value, ClauseElement) for value in values.values()):
        session.execute(
            update(workflow_runs).where(workflow_runs.c.run_id == run.run_id).values(**values)
        )
    elif not _already_stored(run.stored, values):
        write(session, _UPDATE_RUN, {"b_run_id": run.run_id, **values})
    run.stored = {}
    run.appended.clear()
    run.changes.clear()


def _already_stored(stored: dict[str, Any], values: dict[str, Any]) -> bool:
    return bool(stored) and all(key in stored and stored[key] == v for key, v in values.items())


def load_history(session: Session, run_id: str, *, after: int = 0) -> list[RecordedEvent]:
    rows = session.execute(LOAD_HISTORY, {"b_run_id": run_id, "b_after": after}).all()
    return history_from(rows)


def history_from(rows: Iterable[Any]) -> list[RecordedEvent]:
    """The events of rows of :data:`LOAD_HISTORY`: (seq, event_type, attributes, created_at)."""
    return [
        RecordedEvent(
            seq=seq,
            created_at=as_utc(created_at),
            event=load_event(event_type, attributes),
        )
        for seq, event_type, attributes, created_at in rows
    ]


class InstanceCache:
    """Workflow instances kept between tasks, so a step applies only the new events.

    An entry is valid whatever happened since: the history is append-only, so an
    instance that has applied events 1..n only needs n+1.. to catch up. Entries are
    taken out while in use and put back only after a commit.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, WorkflowInstance] = OrderedDict()
        # Runs others changed while a result was decided ahead (see contended).
        self._contended: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._items

    @property
    def enabled(self) -> bool:
        return self._size > 0

    def applied_seq(self, run_id: str) -> int | None:
        """How far the cached instance of ``run_id`` has applied its history; None if none."""
        with self._lock:
            instance = self._items.get(run_id)
            return None if instance is None else instance.applied_seq

    def known_run(self, run_id: str) -> LockedRun | None:
        """The run as this process last committed it, if its cached instance is up to date.

        Only for a run whose next step needs nothing but a new result: open, not
        paused, no recorded task failure, every event processed.
        """
        with self._lock:
            instance = self._items.get(run_id)
            known = None if instance is None else instance.known_run
            if (
                known is None
                or run_id in self._contended
                or not known.is_open
                or known.paused
                or known.has_task_failure
                or not known.processed_seq == known.history_length == instance.applied_seq  # type: ignore[union-attr]
            ):
                return None
            return snapshot(known)

    def contended(self, run_id: str) -> None:
        """Others changed ``run_id`` while this process decided its result ahead.

        That cost the instance and a round trip, and a run changed from outside
        once (signals, say) is likely to be again: its results are recorded the
        careful way, which reads only the events the instance lacks, until one
        finds that nothing came from outside (see settled).
        """
        with self._lock:
            self._contended[run_id] = None
            self._contended.move_to_end(run_id)
            while len(self._contended) > max(self._size, 1):
                self._contended.popitem(last=False)

    def settled(self, run_id: str) -> None:
        """A result of ``run_id`` found nothing new from outside: decide ahead again."""
        if self._contended:
            with self._lock:
                self._contended.pop(run_id, None)

    def take(self, run_id: str) -> WorkflowInstance | None:
        with self._lock:
            return self._items.pop(run_id, None)

    def put(self, instance: WorkflowInstance) -> None:
        if self._size == 0 or instance.closed:
            instance.close()
            return
        with self._lock:
            replaced = self._items.get(instance.run_id)
            self._items[instance.run_id] = instance
            self._items.move_to_end(instance.run_id)
            evicted = [replaced] if replaced is not None and replaced is not instance else []
            while len(self._items) > self._size:
                evicted.append(self._items.popitem(last=False)[1])
        for old in evicted:
            old.close()

    def clear(self) -> None:
        """Close every cached instance (their coroutines must not outlive the engine)."""
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for instance in items:
            instance.close()

    def __len__(self) -> int:
        return len(self._items)
