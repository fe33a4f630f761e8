"""The bench-only application the engine's workers load (``bench.saga_app:orchestrator``).

Queue names come from the environment so that a benchmark never shares a queue
with another process on the same broker: ``ORCHESTRATOR_WORKFLOW_QUEUE`` for
workflow tasks (read by the settings) and ``BENCH_ACTIVITY_QUEUE`` for the
activities (read here, at import, because an activity's queue is part of its
definition).

``BENCH_PROFILE_DIR``, when set (``--profile``), makes every process count the
SQL statements and transactions it runs, and every pool process of a worker run
under cProfile timed by CPU time; both are written there when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import activities as activity
from orchestrator import Orchestrator, workflow

ACTIVITY_QUEUE = os.environ.get("BENCH_ACTIVITY_QUEUE", "bench.activities")


@activity.defn(task_queue=ACTIVITY_QUEUE)
def step_one() -> None:
    """A step that does nothing: the benchmark measures the engine around it."""


@activity.defn(task_queue=ACTIVITY_QUEUE)
def step_two() -> None:
    """A step that does nothing."""


@activity.defn(task_queue=ACTIVITY_QUEUE)
def step_three() -> None:
    """A step that does nothing."""


@activity.defn(task_queue=ACTIVITY_QUEUE)
def undo_step() -> None:
    """The compensation of every step; registered, never run (no step fails)."""


@workflow.defn(name="NoopSaga")
class NoopSaga:
    """Three no-op activities in sequence, each with a compensation registered first."""

    @workflow.run
    async def run(self) -> None:
        async with workflow.Saga() as saga:
            saga.add_compensation(undo_step)
            await workflow.execute_activity(step_one)
            saga.add_compensation(undo_step)
            await workflow.execute_activity(step_two)
            saga.add_compensation(undo_step)
            await workflow.execute_activity(step_three)


@workflow.defn(name="LongLoop")
class LongLoop:
    """One no-op activity after another, ``steps`` times: a history that keeps growing."""

    @workflow.run
    async def run(self, steps: int) -> int:
        for _ in range(steps):
            await workflow.execute_activity(step_one)
        return steps


@workflow.defn(name="AwaitSignal")
class AwaitSignal:
    """Waits, open, for its ``proceed`` signal; then one no-op activity, and it closes."""

    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.go)
        await workflow.execute_activity(step_one)


WORKFLOWS = [NoopSaga, LongLoop, AwaitSignal]

orchestrator = Orchestrator(
    workflows=WORKFLOWS,
    activities=[step_one, step_two, step_three, undo_step],
)
celery = orchestrator.celery


# ---------------------------------------------------------------- statement counts
class _SqlCounter:
    """Counts statements by kind and transactions in this process (profiling only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def statement(
        self, _conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, _many: bool
    ) -> None:
        kind = statement_kind(statement)
        with self.lock:
            self.counts[kind] += 1

    def event(self, name: str) -> Any:
        def count(*_args: Any) -> None:
            with self.lock:
                self.counts[name] += 1

        return count

    def dump(self) -> None:
        if not self.counts:
            return
        role = next(
            (word for word in ("worker", "scheduler", "relay") if word in sys.argv), "other"
        )
        path = self.directory / f"sql-{role}-{os.getpid()}.json"
        path.write_text(json.dumps(dict(self.counts)))


def statement_kind(statement: str) -> str:
    """``INSERT workflow_events``, ``SELECT FOR UPDATE workflow_runs``, ``SAVEPOINT``..."""
    text = " ".join(statement.split())
    words = text.split(" ", 1)
    kind = words[0].upper() if words else "?"
    marker = {"SELECT": " FROM ", "INSERT": "INSERT INTO ", "UPDATE": "UPDATE ", "DELETE": " FROM "}
    if kind not in marker:
        return kind
    index = text.upper().find(marker[kind])
    rest = text[index + len(marker[kind]) :].split() if index >= 0 else []
    table = rest[0].strip('"(') if rest else "?"
    if kind == "SELECT" and " FOR UPDATE" in text.upper():
        kind = "SELECT FOR UPDATE"
    return f"{kind} {table}"


def _install_sql_counter(directory: str) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counter = _SqlCounter(Path(directory))
    event.listen(Engine, "before_cursor_execute", counter.statement)
    event.listen(Engine, "commit", counter.event("COMMIT"))
    event.listen(Engine, "rollback", counter.event("ROLLBACK"))

    def dump_on_exit(**_kwargs: Any) -> None:
        counter.dump()

    # Prefork children leave through os._exit, which skips atexit: Celery's
    # shutdown signal covers them, atexit the main process.
    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(dump_on_exit, weak=False)
    atexit.register(counter.dump)


def _install_cpu_profiler(directory: str) -> None:
    """cProfile in each pool process, on CPU time, so waiting costs nothing."""
    import cProfile
    import time

    from celery.signals import worker_process_init, worker_process_shutdown

    profiler = cProfile.Profile(time.process_time)

    def start(**_kwargs: Any) -> None:
        profiler.enable()

    def dump(**_kwargs: Any) -> None:
        profiler.disable()
        profiler.dump_stats(str(Path(directory) / f"cpu-pool-{os.getpid()}.pstats"))

    worker_process_init.connect(start, weak=False)
    worker_process_shutdown.connect(dump, weak=False)


if os.environ.get("BENCH_PROFILE_DIR"):
    _install_sql_counter(os.environ["BENCH_PROFILE_DIR"])
    if "worker" in sys.argv:
        _install_cpu_profiler(os.environ["BENCH_PROFILE_DIR"])
