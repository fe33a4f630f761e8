"""Prometheus metrics of orchestrator processes.

The numbers come from two places.

**Counts and backlogs are read from the database and the broker when Prometheus
scrapes** (:class:`SystemCollector`): runs started and closed, activity
attempts, failures and retries, compensations and their failures, open runs,
dead letters, timers, the outbox backlog and the queues' depths. The tables are
the durable record of every transition, so a count read from them is exact
although every message is delivered at least once (a redelivered message or a
rolled-back transaction changes no row, so it counts nothing), it survives
restarts, and it needs no state shared between Celery's prefork children. Every
process that serves these metrics reports the same system-wide values:
aggregate them across instances with ``max``, never ``sum``.

**Durations are observed where the work happens** and kept in memory:
:func:`record_activity` (one activity attempt, in the worker that ran it) and
:func:`run_closed` (a run, from its start to its close, observed once the
closing transaction has committed: see :func:`flush`). In a prefork worker the
children write them to files that the worker's main process merges on each
scrape: prometheus-client's multiprocess mode, which
:func:`start_metrics_server` sets up before the pool forks.

Nothing here may break the engine: recording never raises, and a scrape that
cannot reach the database or the broker reports
``orchestrator_metrics_source_up{source=...} 0`` instead of failing.
"""

from __future__ import annotations

import atexit
import contextlib
import hmac
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import Connection, case, func, select
from sqlalchemy.orm import Session

from orchestrator import schema
from orchestrator.db import as_utc
from orchestrator.policies import RunStatus
from orchestrator.schema import activity_tasks, outbox_messages, timers, workflow_runs
from orchestrator.sessions import after_commit

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator

__all__ = [
    "ACTIVITY_COMPLETED",
    "ACTIVITY_FAILED",
    "MetricsServer",
    "SystemCollector",
    "build_registry",
    "record_activity",
    "record_run_closed",
    "run_closed",
    "start_metrics_server",
]

log = logging.getLogger("orchestrator.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

ACTIVITY_COMPLETED = "completed"
ACTIVITY_FAILED = "failed"

# An attempt takes milliseconds (a database write) to minutes (a slow partner API).
ACTIVITY_DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# A run takes a second (an order) to days (a human in the loop, long timers).
RUN_DURATION_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
    7 * 86400.0,
    30 * 86400.0,
)

# Activity statuses whose current attempt has not failed (the attempts before it have).
_ATTEMPT_NOT_FAILED = ("SCHEDULED", "STARTED", "COMPLETED")
# Activity statuses that are final.
_ACTIVITY_CLOSED = ("COMPLETED", "FAILED")
# Activity statuses reported as open, even at zero, for every registered activity.
_ACTIVITY_OPEN = ("SCHEDULED", "STARTED", "BACKOFF", "DEAD_LETTERED")
_DEAD_LETTER_OPEN = "OPEN"
# The longest a scrape may keep a database statement running (PostgreSQL).
_STATEMENT_TIMEOUT_MS = 5000
_BROKER_TIMEOUT = 5.0


# --------------------------------------------------------------- in-process durations
class _Instruments:
    """The histograms a process observes itself, on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.activity_duration = Histogram(
            "orchestrator_activity_duration_seconds",
            "How long one activity attempt ran, by activity type and outcome "
            "(completed or failed).",
            ["activity_type", "outcome"],
            buckets=ACTIVITY_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.run_duration = Histogram(
            "orchestrator_workflow_run_duration_seconds",
            "Time from a run's start to its close, by workflow type and final status.",
            ["workflow_type", "status"],
            buckets=RUN_DURATION_BUCKETS,
            registry=self.registry,
        )


_instruments: _Instruments | None = None
_instruments_lock = threading.Lock()


def _get_instruments() -> _Instruments:
    global _instruments
    found = _instruments
    if found is None:
        with _instruments_lock:
            if _instruments is None:
                _instruments = _Instruments()
            found = _instruments
    return found


def record_activity(activity_type: str, outcome: str, duration_seconds: float) -> None:
    """One activity attempt ran for ``duration_seconds`` and ended with ``outcome``.

    ``outcome`` is :data:`ACTIVITY_COMPLETED` or :data:`ACTIVITY_FAILED`. Called by
    the worker that ran the attempt, whether or not its outcome is still current.
    """
    try:
        _get_instruments().activity_duration.labels(activity_type, outcome).observe(
            max(duration_seconds, 0.0)
        )
    except Exception:  # pragma: no cover - metrics must never break the engine
        log.debug("could not record an activity duration", exc_info=True)


def record_run_closed(workflow_type: str, status: str, duration_seconds: float) -> None:
    """A run of ``workflow_type`` closed with ``status`` after ``duration_seconds``."""
    try:
        _get_instruments().run_duration.labels(workflow_type, status).observe(
            max(duration_seconds, 0.0)
        )
    except Exception:  # pragma: no cover - metrics must never break the engine
        log.debug("could not record a run duration", exc_info=True)


def run_closed(
    session: Session,
    workflow_type: str,
    status: str,
    created_at: datetime | None,
    closed_at: datetime,
) -> None:
    """A run closes in ``session``'s transaction: observe its duration once that commits.

    The observation waits for the commit (:func:`orchestrator.sessions.after_commit`),
    so a close that is rolled back and made again counts once.
    """
    if created_at is None:
        return
    duration = (as_utc(closed_at) - as_utc(created_at)).total_seconds()
    after_commit(session, lambda: record_run_closed(workflow_type, status, duration))


class _InstrumentsCollector:
    """Serves this process's histograms (the instruments may be rebuilt, see below)."""

    def collect(self) -> Iterable[Metric]:
        return _get_instruments().registry.collect()


# -------------------------------------------------------------- multiprocess mode
_multiprocess_dir: str | None = None


def _use_multiprocess() -> str:
    """Make histograms of this process and its future children live in shared files.

    Uses ``$PROMETHEUS_MULTIPROC_DIR`` if set (emptied now: it must belong to
    this process tree alone), else a new temporary directory, removed at exit.
    Must run before the worker pool forks.
    """
    global _multiprocess_dir, _instruments
    if _multiprocess_dir is not None:
        return _multiprocess_dir
    path = os.environ.get(MULTIPROCESS_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="orchestrator-metrics-")
        os.environ[MULTIPROCESS_ENV] = path
        atexit.register(_remove_directory, path, os.getpid())
    from prometheus_client import values

    # prometheus-client picks its value class when first imported, which may
    # have been before the variable was set.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    with _instruments_lock:
        # Histograms built before now keep their values in memory: rebuild them.
        _instruments = None
    _multiprocess_dir = path
    return path


def _remove_directory(path: str, owner: int) -> None:
    # Forked children inherit exit handlers; only the process that made it removes it.
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- system metrics
@dataclass
class _Families:
    """Metric families being filled, in the order they are declared."""

    items: list[Metric] = field(default_factory=list)

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> CounterMetricFamily:
        family = CounterMetricFamily(name, documentation, labels=list(labels))
        self.items.append(family)
        return family

    def gauge(self, name: str, documentation: str, labels: Sequence[str]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=list(labels))
        self.items.append(family)
        return family


def _statement_timeout(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {_STATEMENT_TIMEOUT_MS}")


def _age(now: datetime, then: datetime | None) -> float:
    return 0.0 if then is None else max(0.0, (now - as_utc(then)).total_seconds())


class SystemCollector:
    """Counts and backlogs of the whole system, read from the database and the broker.

    Args:
        orchestrator: Whose database, broker, workflows and activities to report.
        database: Read the database (runs, activities, dead letters, timers, outbox).
        broker: Read the depth of the orchestrator's queues on the broker (skipped
            when embedded).
        events: Read the subscriber groups of domain events this process has
            loaded, and ``event_groups``.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        database: bool = True,
        broker: bool = True,
        events: bool = False,
        event_groups: Iterable[str] = (),
    ) -> None:
        self._orchestrator = orchestrator
        self._sources: list[tuple[str, Callable[[], list[Metric]]]] = []
        if database:
            self._sources.append(("database", self._database))
        if broker and not orchestrator.settings.embedded:
            self._sources.append(("broker", self._broker))
        if events and not orchestrator.settings.embedded:
            groups = list(event_groups)
            self._sources.append(("events", lambda: _event_group_metrics(orchestrator, groups)))

    def describe(self) -> Iterable[Metric]:
        # Nothing to check at registration: reading would need the services.
        return []

    def collect(self) -> Iterable[Metric]:
        return _collect_sources(self._sources)

    # -- database ----------------------------------------------------------------
    def _database(self) -> list[Metric]:
        orchestrator = self._orchestrator
        now = as_utc(orchestrator.clock())
        families = _Families()
        with orchestrator.db.connect() as conn:
            _statement_timeout(conn)
            self._runs(conn, now, families)
            self._activities(conn, now, families)
            _timers(conn, now, families)
            _outbox(conn, now, families)
        self._dead_letters(families)
        return families.items

    def _runs(self, conn: Connection, now: datetime, families: _Families) -> None:
        runs = workflow_runs.c
        is_open = runs.closed_at.is_(None)
        counts = conn.execute(
            select(
                runs.workflow_type,
                runs.status,
                func.count(),
                func.sum(case((is_open, 1), else_=0)),
            ).group_by(runs.workflow_type, runs.status)
        ).all()
        started = families.counter(
            "orchestrator_workflow_runs_started",
            "Runs started, by workflow type (continue-as-new starts a new run).",
            ["workflow_type"],
        )
        closed = families.counter(
            "orchestrator_workflow_runs_closed",
            "Runs closed, by workflow type and final status (COMPLETED, FAILED, "
            "COMPENSATED, CANCELLED, TERMINATED, CONTINUED_AS_NEW).",
            ["workflow_type", "status"],
        )
        open_runs = families.gauge(
            "orchestrator_workflow_runs_open",
            "Runs not closed yet, by workflow type and status (RUNNING, COMPENSATION_BLOCKED).",
            ["workflow_type", "status"],
        )
        types = set(self._orchestrator.registry.workflows)
        closed_statuses = {s.value for s in RunStatus if s.is_closed}
        open_statuses = {s.value for s in RunStatus if not s.is_closed}
        started_by_type: dict[str, float] = defaultdict(float)
        closed_by: dict[tuple[str, str], float] = defaultdict(float)
        open_by: dict[tuple[str, str], float] = defaultdict(float)
        for workflow_type, status, total, still_open in counts:
            types.add(workflow_type)
            started_by_type[workflow_type] += total
            if still_open:
                open_statuses.add(status)
                open_by[workflow_type, status] += still_open
            if total - (still_open or 0):
                closed_statuses.add(status)
                closed_by[workflow_type, status] += total - (still_open or 0)
        for workflow_type in sorted(types):
            started.add_metric([workflow_type], started_by_type[workflow_type])
            for status in sorted(closed_statuses):
                closed.add_metric([workflow_type, status], closed_by[workflow_type, status])
            for status in sorted(open_statuses):
                open_runs.add_metric([workflow_type, status], open_by[workflow_type, status])

        behind_cond = runs.processed_seq < runs.history_length
        if "paused" in runs:
            behind_cond = behind_cond & runs.paused.is_(False)
        columns = [
            runs.workflow_type,
            func.sum(case((runs.task_failure.is_not(None), 1), else_=0)),
            func.sum(case((behind_cond, 1), else_=0)),
            func.min(case((behind_cond, runs.updated_at), else_=None)),
        ]
        if "paused" in runs:
            columns.append(func.sum(case((runs.paused.is_(True), 1), else_=0)))
        rows = conn.execute(select(*columns).where(is_open).group_by(runs.workflow_type)).all()
        failing = families.gauge(
            "orchestrator_workflow_runs_task_failing",
            "Open runs whose last workflow task failed (nondeterminism, a bug in "
            "workflow code): they make no progress until fixed code processes them.",
            ["workflow_type"],
        )
        behind = families.gauge(
            "orchestrator_workflow_runs_behind",
            "Open runs with history events their workflow code has not processed yet "
            "(paused runs excluded).",
            ["workflow_type"],
        )
        behind_age = families.gauge(
            "orchestrator_workflow_runs_behind_oldest_seconds",
            "How long the longest-waiting of those runs has waited for a workflow task.",
            ["workflow_type"],
        )
        paused = (
            families.gauge(
                "orchestrator_workflow_runs_paused",
                "Open runs an operator paused.",
                ["workflow_type"],
            )
            if "paused" in runs
            else None
        )
        by_type = {row[0]: row for row in rows}
        for workflow_type in sorted(types):
            row = by_type.get(workflow_type)
            failing.add_metric([workflow_type], float(row[1] or 0) if row else 0.0)
            behind.add_metric([workflow_type], float(row[2] or 0) if row else 0.0)
            behind_age.add_metric([workflow_type], _age(now, row[3]) if row else 0.0)
            if paused is not None:
                paused.add_metric([workflow_type], float(row[4] or 0) if row else 0.0)

    def _activities(self, conn: Connection, now: datetime, families: _Families) -> None:
        tasks = activity_tasks.c
        rows = conn.execute(
            select(
                tasks.activity_type,
                tasks.is_compensation,
                tasks.status,
                func.count(),
                func.sum(tasks.attempt),
            ).group_by(tasks.activity_type, tasks.is_compensation, tasks.status)
        ).all()
        waiting = conn.execute(
            select(tasks.activity_type, func.min(tasks.attempt_scheduled_at))
            .where(tasks.status == "SCHEDULED")
            .group_by(tasks.activity_type)
        ).all()
        scheduled = families.counter(
            "orchestrator_activities_scheduled",
            "Activities scheduled (compensations included), by activity type.",
            ["activity_type"],
        )
        closed = families.counter(
            "orchestrator_activities_closed",
            "Activities finished for good, by activity type and status (COMPLETED, FAILED).",
            ["activity_type", "status"],
        )
        executions = families.counter(
            "orchestrator_activity_executions",
            "Activity attempts started (each retry is one more), by activity type.",
            ["activity_type"],
        )
        failures = families.counter(
            "orchestrator_activity_failures",
            "Activity attempts that failed (an error or a timeout), by activity type.",
            ["activity_type"],
        )
        retries = families.counter(
            "orchestrator_activity_retries",
            "Activity attempts scheduled again after a failed one, by activity type.",
            ["activity_type"],
        )
        open_activities = families.gauge(
            "orchestrator_activities_open",
            "Activities not finished, by activity type and status (SCHEDULED: waiting "
            "for a worker; STARTED: running; BACKOFF: waiting to retry; "
            "DEAD_LETTERED: waiting for an operator).",
            ["activity_type", "status"],
        )
        oldest = families.gauge(
            "orchestrator_activity_oldest_scheduled_seconds",
            "How long the oldest attempt still waiting for a worker (SCHEDULED) has waited.",
            ["activity_type"],
        )
        compensations = families.counter(
            "orchestrator_compensations",
            "Compensations scheduled by sagas, by activity type.",
            ["activity_type"],
        )
        types = set(self._orchestrator.registry.activities)
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
        closed_by: dict[tuple[str, str], float] = defaultdict(float)
        open_by: dict[tuple[str, str], float] = defaultdict(float)
        open_statuses = set(_ACTIVITY_OPEN)
        compensations_by: dict[str, float] = defaultdict(float)
        for activity_type, is_compensation, status, row_count, row_attempts in rows:
            types.add(activity_type)
            count, attempts = float(row_count), float(row_attempts or 0)
            total = totals[activity_type]
            total[0] += count
            # SCHEDULED: the current attempt has not started yet.
            total[1] += attempts - (count if status == "SCHEDULED" else 0.0)
            total[2] += attempts - (count if status in _ATTEMPT_NOT_FAILED else 0.0)
            total[3] += attempts - count
            if is_compensation:
                compensations_by[activity_type] += count
            if status in _ACTIVITY_CLOSED:
                closed_by[activity_type, status] += count
            else:
                open_statuses.add(status)
                open_by[activity_type, status] += count
        waiting_since = dict(waiting)
        for activity_type in sorted(types):
            total = totals[activity_type]
            scheduled.add_metric([activity_type], total[0])
            executions.add_metric([activity_type], total[1])
            failures.add_metric([activity_type], total[2])
            retries.add_metric([activity_type], total[3])
            compensations.add_metric([activity_type], compensations_by[activity_type])
            for status in _ACTIVITY_CLOSED:
                closed.add_metric([activity_type, status], closed_by[activity_type, status])
            for status in sorted(open_statuses):
                open_activities.add_metric([activity_type, status], open_by[activity_type, status])
            oldest.add_metric([activity_type], _age(now, waiting_since.get(activity_type)))

    def _dead_letters(self, families: _Families) -> None:
        """Compensation failures and open dead letters, from the dead-letter table if any.

        Without a ``dead_letters`` table (an older schema), a compensation that
        ran out of retries is an activity row that FAILED or is DEAD_LETTERED.
        """
        by_table = self._dead_letter_table()
        failures = families.counter(
            "orchestrator_compensation_failures",
            "Compensations that exhausted their retries (each is dead-lettered for an "
            "operator), by activity type.",
            ["activity_type"],
        )
        open_letters = families.gauge(
            "orchestrator_dead_letters_open",
            "Dead letters waiting for an operator (replay or discard), by kind and activity type.",
            ["kind", "activity_type"],
        )
        if by_table is None:
            by_table = self._dead_letters_from_activities()
        failed, still_open = by_table
        for activity_type in sorted(failed):
            failures.add_metric([activity_type], failed[activity_type])
        for (kind, activity_type), count in sorted(still_open.items()):
            open_letters.add_metric([kind, activity_type], count)

    def _dead_letter_table(
        self,
    ) -> tuple[dict[str, float], dict[tuple[str, str], float]] | None:
        table = getattr(schema, "dead_letters", None)
        if table is None:
            return None
        letters = table.c
        try:
            # Its own transaction: a missing table must not spoil the other reads.
            with self._orchestrator.db.connect() as conn:
                _statement_timeout(conn)
                rows = conn.execute(
                    select(
                        letters.kind,
                        letters.activity_type,
                        func.count(),
                        func.sum(case((letters.status == _DEAD_LETTER_OPEN, 1), else_=0)),
                    ).group_by(letters.kind, letters.activity_type)
                ).all()
        except Exception as exc:
            log.debug("no dead-letter table to read (%s); using activity rows", exc)
            return None
        failed: dict[str, float] = defaultdict(float)
        still_open: dict[tuple[str, str], float] = {}
        for name in self._orchestrator.registry.activities:
            failed[name] += 0.0
        for kind, activity_type, count, open_count in rows:
            if kind == "compensation":
                failed[activity_type] += float(count)
            if open_count:
                still_open[kind, activity_type] = float(open_count)
        return failed, still_open

    def _dead_letters_from_activities(
        self,
    ) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
        tasks = activity_tasks.c
        with self._orchestrator.db.connect() as conn:
            rows = conn.execute(
                select(tasks.activity_type, tasks.status, func.count())
                .where(
                    tasks.is_compensation.is_(True),
                    tasks.status.in_(("FAILED", "DEAD_LETTERED")),
                )
                .group_by(tasks.activity_type, tasks.status)
            ).all()
        failed: dict[str, float] = defaultdict(float)
        still_open: dict[tuple[str, str], float] = {}
        for name in self._orchestrator.registry.activities:
            failed[name] += 0.0
        for activity_type, status, count in rows:
            failed[activity_type] += float(count)
            if status == "DEAD_LETTERED":
                still_open["compensation", activity_type] = float(count)
        return failed, still_open

    # -- broker ------------------------------------------------------------------
    def _broker(self) -> list[Metric]:
        import amqp.exceptions
        import kombu

        # kombu's annotations are partial: its calls are checked against a real broker.
        broker: Any = kombu

        families = _Families()
        ready = families.gauge(
            "orchestrator_queue_messages",
            "Messages ready in the orchestrator's queues (not yet delivered to a worker).",
            ["queue"],
        )
        consumers = families.gauge(
            "orchestrator_queue_consumers", "Consumers of the orchestrator's queues.", ["queue"]
        )
        with broker.Connection(
            self._orchestrator.settings.broker_url, connect_timeout=_BROKER_TIMEOUT
        ) as connection:
            connection.ensure_connection(max_retries=1, timeout=_BROKER_TIMEOUT)
            for name in self._queue_names():
                # A passive declare of a missing queue closes its channel: one each.
                channel = connection.channel()
                try:
                    _, messages, consumer_count = channel.queue_declare(queue=name, passive=True)
                except amqp.exceptions.NotFound:
                    continue
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()
                ready.add_metric([name], float(messages))
                consumers.add_metric([name], float(consumer_count))
        return families.items

    def _queue_names(self) -> list[str]:
        from orchestrator.celery_app import DEAD_LETTER_QUEUE, queue_names

        names = [*queue_names(self._orchestrator), DEAD_LETTER_QUEUE]
        try:
            from orchestrator.dead_letters import COMPENSATION_DEAD_LETTER_QUEUE
        except ImportError:  # pragma: no cover - an engine without dead letters
            pass
        else:
            names.append(COMPENSATION_DEAD_LETTER_QUEUE)
        return names


def _timers(conn: Connection, now: datetime, families: _Families) -> None:
    count, first_due = conn.execute(select(func.count(), func.min(timers.c.fire_at))).one()
    families.gauge(
        "orchestrator_timers_pending",
        "Durable timers (sleeps, retry back-offs) waiting to fire.",
        [],
    ).add_metric([], float(count))
    families.gauge(
        "orchestrator_timers_overdue_seconds",
        "How far past its time the most overdue timer is (0 when none is due): "
        "grows when no scheduler runs.",
        [],
    ).add_metric([], _age(now, first_due))


def _outbox(conn: Connection, now: datetime, families: _Families) -> None:
    table = outbox_messages.c
    rows = conn.execute(
        select(
            table.kind,
            func.count(),
            func.min(table.created_at),
            func.sum(case((table.publish_attempts > 0, 1), else_=0)),
        )
        .where(table.published_at.is_(None))
        .group_by(table.kind)
    ).all()
    backlog = families.gauge(
        "orchestrator_outbox_backlog_messages",
        "Outbox messages committed but not published yet, by kind (task, event).",
        ["kind"],
    )
    age = families.gauge(
        "orchestrator_outbox_oldest_message_age_seconds",
        "Age of the oldest unpublished outbox message, by kind: the relay's lag.",
        ["kind"],
    )
    failing = families.gauge(
        "orchestrator_outbox_failing_messages",
        "Unpublished outbox messages whose publishing has failed at least once, by kind.",
        ["kind"],
    )
    found = {row[0]: row for row in rows}
    for kind in sorted({"task", *found}):
        row = found.get(kind)
        backlog.add_metric([kind], float(row[1]) if row else 0.0)
        age.add_metric([kind], _age(now, row[2]) if row else 0.0)
        failing.add_metric([kind], float(row[3] or 0) if row else 0.0)


def _collect_sources(sources: Sequence[tuple[str, Callable[[], list[Metric]]]]) -> list[Metric]:
    up = GaugeMetricFamily(
        "orchestrator_metrics_source_up",
        "1 if the last scrape could read this source (database, broker, events), else 0.",
        labels=["source"],
    )
    took = GaugeMetricFamily(
        "orchestrator_metrics_source_duration_seconds",
        "How long the last scrape took to read this source.",
        labels=["source"],
    )
    collected: list[Metric] = []
    for name, read in sources:
        started = time.perf_counter()
        try:
            collected.extend(read())
            ok = 1.0
        except Exception as exc:
            log.warning("metrics: cannot read the %s: %s", name, exc)
            ok = 0.0
        up.add_metric([name], ok)
        took.add_metric([name], time.perf_counter() - started)
    if sources:
        collected += [up, took]
    return collected


def _event_group_metrics(orchestrator: Orchestrator, extra_groups: Sequence[str]) -> list[Metric]:
    """Subscriber groups of domain events: queue depth, dead letters, events handled, lag.

    For the groups this process has loaded and ``extra_groups``, read from the
    broker and the subscribers' inbox table.
    """
    from events.config import EventSettings
    from events.monitor import status
    from events.subscribers import subscriptions

    found = status(
        orchestrator.db,
        orchestrator.settings.broker_url,
        exchange=EventSettings().events_exchange,
        groups=sorted({*subscriptions.groups(), *extra_groups}),
    )
    families = _Families()
    ready = families.gauge(
        "orchestrator_event_group_messages",
        "Events waiting in a subscriber group's queue.",
        ["group"],
    )
    consumers = families.gauge(
        "orchestrator_event_group_consumers",
        "Consumers of a subscriber group's queue (standing-by ones included).",
        ["group"],
    )
    dead = families.gauge(
        "orchestrator_event_group_dead_letters",
        "Events in a subscriber group's dead-letter queue.",
        ["group"],
    )
    handled = families.counter(
        "orchestrator_events_handled",
        "Events a subscriber group has handled (rows of its inbox).",
        ["group"],
    )
    lag = families.gauge(
        "orchestrator_event_group_lag_seconds",
        "How long after it occurred a group's latest event was handled.",
        ["group"],
    )
    for group in found.groups:
        if group.ready is not None:
            ready.add_metric([group.group], float(group.ready))
        if group.consumers is not None:
            consumers.add_metric([group.group], float(group.consumers))
        if group.dead_letters is not None:
            dead.add_metric([group.group], float(group.dead_letters))
        handled.add_metric([group.group], float(group.handled))
        if group.lag_seconds is not None:
            lag.add_metric([group.group], group.lag_seconds)
    unroutable = families.gauge(
        "orchestrator_events_unroutable_messages",
        "Events no subscriber group's pattern matched, kept for inspection.",
        [],
    )
    if found.unroutable is not None:
        unroutable.add_metric([], float(found.unroutable))
    return families.items


# ------------------------------------------------------------------- exposition
def build_registry(
    orchestrator: Orchestrator,
    *,
    multiprocess_dir: str | None = None,
    system: bool = True,
    events: bool = False,
) -> CollectorRegistry:
    """The registry a process serves: its durations, and the system's counts if ``system``.

    With ``multiprocess_dir`` the durations are merged from the files every
    process of the tree writes there; otherwise they are this process's own,
    along with its CPU and memory (``process_*``).
    """
    registry = CollectorRegistry()
    if multiprocess_dir is not None:
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    else:
        from prometheus_client import ProcessCollector

        registry.register(_InstrumentsCollector())
        ProcessCollector(registry=registry)
    if system or events:
        registry.register(
            SystemCollector(orchestrator, database=system, broker=system, events=events)
        )
    return registry


@dataclass
class MetricsServer:
    """A running metrics endpoint; ``port`` is the one it listens on."""

    port: int
    registry: CollectorRegistry
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        """Stop serving (the endpoint also ends with its process)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_metrics_server(
    orchestrator: Orchestrator,
    port: int,
    *,
    addr: str = "0.0.0.0",
    multiprocess: bool = False,
    system: bool = True,
    events: bool = False,
    token: str | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` from a background thread of this process.

    Args:
        orchestrator: Whose system metrics to report.
        port: Port to listen on; 0 picks a free one (see ``MetricsServer.port``).
        addr: Address to listen on.
        multiprocess: For a prefork worker: call before the pool forks; the
            children's durations are then merged into what this process serves.
        system: Also report the counts and backlogs read from the database and
            the broker (the same in every process).
        events: Also report the subscriber groups of domain events.
        token: When set, every request must carry ``Authorization: Bearer
            <token>``; others get 401 and nothing is read.
    """
    from prometheus_client import start_http_server

    directory = _use_multiprocess() if multiprocess else None
    registry = build_registry(
        orchestrator, multiprocess_dir=directory, system=system, events=events
    )
    if token:
        server, thread = _serve_guarded(port, addr, registry, token)
    else:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    actual = int(server.server_port)
    log.info("metrics endpoint on http://%s:%d/metrics", addr, actual)
    return MetricsServer(port=actual, registry=registry, _server=server, _thread=thread)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _serve_guarded(
    port: int, addr: str, registry: CollectorRegistry, token: str
) -> tuple[WSGIServer, threading.Thread]:
    """The endpoint behind a bearer token (Prometheus: ``authorization: credentials``)."""
    from prometheus_client import make_wsgi_app

    app = make_wsgi_app(registry)
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        given = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
        # In constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(given, expected):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"unauthorized\n"]
        result: Iterable[bytes] = app(environ, start_response)
        return result

    server = make_server(addr, port, guarded, _ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True)
    thread.start()
    return server, thread
