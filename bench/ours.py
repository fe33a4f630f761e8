"""The engine under test: real worker processes on a database and queues of their own.

Throughput is N starts submitted as fast as the client threads go, until every
run has closed (one counting query polls the database). Latency is one start at a
time, measured three ways: the client until it sees the run closed (a 1 ms poll
of the run row), the client through ``handle.result()`` (which backs off from
10 ms, so it adds up to a poll interval), and the server (the run row's
``created_at`` to ``closed_at``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from bench.context import BenchError, Context
from bench.infra import CpuMeter, MemorySampler, Proc, cost_per_run, cpu_groups, python_module
from bench.stats import Progress, say, summarize_ms

if TYPE_CHECKING:
    from orchestrator import Orchestrator

APP = "bench.saga_app:orchestrator"
POLL = 0.02
FINE_POLL = 0.001


def private_queues(ctx: Context) -> tuple[str, str]:
    """The engine's two private queues; the same for the whole invocation."""
    names = ctx.shared.get("ours_queues")
    if names is None:
        names = (ctx.rabbit.queue_name("ours-workflows"), ctx.rabbit.queue_name("ours-activities"))
        ctx.shared["ours_queues"] = names
        # The activities' queue is part of their definitions: set before the import.
        os.environ["BENCH_ACTIVITY_QUEUE"] = names[1]
    return names


def psycopg_url(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(False)


@dataclass
class Deployment:
    """One running engine: worker, scheduler, maybe a relay, and a client for it."""

    ctx: Context
    purpose: str
    database_url: str
    orchestrator: Orchestrator
    db: Engine
    procs: dict[str, Proc] = field(default_factory=dict)
    sampler: MemorySampler | None = None
    aux_sampler: MemorySampler | None = None
    runs_started: int = 0

    # ----------------------------------------------------------------- queries
    def count_closed(self, prefix: str) -> tuple[int, int]:
        """(closed, closed but not COMPLETED) among runs whose workflow id starts with prefix."""
        with self.db.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE closed_at IS NOT NULL), "
                    "count(*) FILTER (WHERE closed_at IS NOT NULL AND status <> 'COMPLETED') "
                    "FROM workflow_runs WHERE workflow_id LIKE :p"
                ),
                {"p": prefix + "%"},
            ).one()
        return int(row[0]), int(row[1])

    def run_times(self, prefix: str) -> list[tuple[datetime, datetime]]:
        with self.db.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT created_at, closed_at FROM workflow_runs "
                    "WHERE workflow_id LIKE :p AND closed_at IS NOT NULL"
                ),
                {"p": prefix + "%"},
            ).all()
        return [(row[0], row[1]) for row in rows]

    def failures(self, prefix: str, limit: int = 3) -> list[str]:
        with self.db.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT workflow_id, status, failure::text, task_failure::text "
                    "FROM workflow_runs WHERE workflow_id LIKE :p "
                    "AND (status <> 'COMPLETED' OR task_failure IS NOT NULL) LIMIT :n"
                ),
                {"p": prefix + "%", "n": limit},
            ).all()
        return [" ".join(str(value) for value in row) for row in rows]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if not proc.alive:
                raise BenchError(f"{name} exited:\n{proc.tail()}")

    # ----------------------------------------------------------------- waiting
    def wait_closed(self, prefix: str, total: int, timeout: float, label: str) -> float:
        """Poll until ``total`` runs of ``prefix`` are closed; the monotonic time it happened."""
        progress = Progress(label, total)
        deadline = time.monotonic() + timeout
        while True:
            closed, bad = self.count_closed(prefix)
            now = time.monotonic()
            if closed >= total:
                progress.finish(closed)
                if bad:
                    raise BenchError(
                        f"{bad} run(s) did not complete: {'; '.join(self.failures(prefix))}"
                    )
                return now
            if now > deadline:
                raise BenchError(f"{label}: only {closed}/{total} runs closed after {timeout:g}s")
            self.check_alive()
            progress.update(closed)
            time.sleep(POLL)

    def start_many(self, prefix: str, count: int, threads: int) -> Callable[[], float]:
        """Start ``count`` NoopSaga runs from ``threads`` client threads, in the background.

        Returns a function that waits for the submission to end and returns when it
        ended (or re-raises its error); called while an exception is on its way (a
        timeout, Ctrl-C), it drops the starts not yet made.
        """
        from bench.saga_app import NoopSaga

        client = self.orchestrator.client()
        errors: list[BaseException] = []
        cancelled = threading.Event()

        def one(index: int) -> None:
            if not cancelled.is_set():
                client.start_workflow(NoopSaga, workflow_id=f"{prefix}{index}")

        finished: list[float] = []

        def submit() -> None:
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="bench-start") as pool:
                    for future in [pool.submit(one, index) for index in range(count)]:
                        future.result()
                finished.append(time.monotonic())
            except BaseException as exc:
                cancelled.set()
                errors.append(exc)

        thread = threading.Thread(target=submit, name="bench-submit", daemon=True)
        thread.start()
        self.runs_started += count

        def join() -> float:
            if sys.exc_info()[0] is not None:
                cancelled.set()
            thread.join()
            if errors:
                raise BenchError(f"starting runs failed: {errors[0]!r}") from errors[0]
            return finished[0]

        return join


def deploy(
    ctx: Context,
    purpose: str,
    *,
    env: dict[str, str] | None = None,
    relay: bool = False,
    scheduler: bool = True,
) -> Deployment:
    """Migrate a fresh database and start the engine's processes on it; wait until they serve."""
    from orchestrator import Orchestrator, Settings
    from orchestrator.migrate import upgrade

    options = ctx.options
    workflow_queue, activity_queue = private_queues(ctx)
    from bench import saga_app

    database_url = ctx.postgres.create(purpose)
    upgrade(database_url)
    proc_env = {
        "ORCHESTRATOR_DATABASE_URL": database_url,
        "ORCHESTRATOR_BROKER_URL": ctx.broker_url,
        "ORCHESTRATOR_WORKFLOW_QUEUE": workflow_queue,
        "ORCHESTRATOR_LOG_LEVEL": options.loglevel,
        "BENCH_ACTIVITY_QUEUE": activity_queue,
        **(env or {}),
    }
    if options.profile_dir is not None and purpose == "ours":
        proc_env["BENCH_PROFILE_DIR"] = str(options.profile_dir)
    settings = Settings.model_validate(
        {
            key.removeprefix("ORCHESTRATOR_").lower(): value
            for key, value in proc_env.items()
            if key.startswith("ORCHESTRATOR_")
        }
    )
    orchestrator = Orchestrator(
        workflows=saga_app.WORKFLOWS,
        activities=[saga_app.step_one, saga_app.step_two, saga_app.step_three, saga_app.undo_step],
        settings=settings,
    )
    db = create_engine(database_url, pool_size=2)
    dep = Deployment(ctx, purpose, database_url, orchestrator, db)
    cli = ["orchestrator.cli", "--app", APP]
    dep.procs["worker"] = Proc(
        f"{purpose}-worker",
        python_module(
            *cli,
            "worker",
            "--queues",
            f"{workflow_queue},{activity_queue}",
            "--concurrency",
            str(options.workers),
            "--pool",
            "prefork",
            "--hostname",
            f"bench-{purpose}-{os.getpid()}@%h",
            "--loglevel",
            options.loglevel,
        ),
        ctx.log_dir,
        proc_env,
    )
    if scheduler:
        dep.procs["scheduler"] = Proc(
            f"{purpose}-scheduler", python_module(*cli, "scheduler"), ctx.log_dir, proc_env
        )
    if relay:
        dep.procs["relay"] = Proc(
            f"{purpose}-relay", python_module(*cli, "relay"), ctx.log_dir, proc_env
        )
    dep.sampler = MemorySampler([dep.procs["worker"].pid]).__enter__()
    aux = [proc.pid for name, proc in dep.procs.items() if name != "worker"]
    dep.aux_sampler = MemorySampler(aux).__enter__() if aux else None
    # Warm every pool process up (imports, connections) before anything is timed.
    warm = max(options.warmup, 2 * options.workers)
    say(f"{purpose}: workers starting, warming up with {warm} runs")
    dep.start_many("warmup-", warm, min(options.client_threads, warm))()
    dep.wait_closed("warmup-", warm, 120.0, f"{purpose} warm-up")
    return dep


def undeploy(dep: Deployment) -> dict[str, Any]:
    """Stop the processes and release connections; returns memory and database figures."""
    figures: dict[str, Any] = {}
    if dep.sampler is not None:
        dep.sampler.__exit__(None, None, None)
        figures["peak_worker_mb"] = dep.sampler.peak / 2**20
    if dep.aux_sampler is not None:
        dep.aux_sampler.__exit__(None, None, None)
        figures["peak_scheduler_relay_mb"] = dep.aux_sampler.peak / 2**20
    for proc in dep.procs.values():
        proc.stop()
    dep.orchestrator.close()
    figures["runs_served"] = dep.runs_started
    dep.db.dispose()
    return figures


@contextlib.contextmanager
def deployed(ctx: Context, purpose: str, **kwargs: Any) -> Iterator[Deployment]:
    dep = deploy(ctx, purpose, **kwargs)
    try:
        yield dep
    finally:
        dep.ctx.shared[f"{purpose}_teardown"] = undeploy(dep)


# ------------------------------------------------------------------------ measuring
def measure_throughput(dep: Deployment, n: int, prefix: str = "tp-") -> dict[str, Any]:
    """``n`` runs started at once (named ``prefix`` and a number) until every one has closed."""
    ctx = dep.ctx
    options = ctx.options
    workers = {"worker": dep.procs["worker"].pid}
    if "scheduler" in dep.procs:
        workers["scheduler"] = dep.procs["scheduler"].pid
    database = make_url(dep.database_url).database
    groups = cpu_groups(workers=workers, database=database, broker_url=ctx.broker_url)
    with CpuMeter(groups) as meter:
        began_wall = datetime.now(UTC)
        began = time.monotonic()
        join = dep.start_many(prefix, n, options.client_threads)
        try:
            ended = dep.wait_closed(prefix, n, options.timeout, "ours throughput")
        finally:
            submitted = join() - began
    times = dep.run_times(prefix)
    last_closed = max(closed for _, closed in times)
    server_seconds = (last_closed - began_wall).total_seconds()
    elapsed = ended - began
    return {
        "n": n,
        "completed": len(times),
        "seconds": elapsed,
        "submit_seconds": submitted,
        "per_second": n / elapsed,
        "server_per_second": n / server_seconds if server_seconds > 0 else None,
        "client_threads": options.client_threads,
        **cost_per_run(meter, n),
    }


def measure_sequential(dep: Deployment, count: int) -> dict[str, Any]:
    from bench.saga_app import NoopSaga

    client = dep.orchestrator.client()
    fine_ms: list[float] = []
    progress = Progress("ours sequential (1 ms poll)", count)
    with psycopg.connect(psycopg_url(dep.database_url), autocommit=True) as conn:
        for index in range(count):
            start = time.perf_counter()
            handle = client.start_workflow(NoopSaga, workflow_id=f"seq-{index}")
            deadline = time.monotonic() + 30
            while True:
                row = conn.execute(
                    "SELECT status FROM workflow_runs WHERE run_id = %s AND closed_at IS NOT NULL",
                    (handle.run_id,),
                    prepare=True,
                ).fetchone()
                if row is not None:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"sequential run {index} still open after 30s")
                time.sleep(FINE_POLL)
            fine_ms.append((time.perf_counter() - start) * 1000)
            if row[0] != "COMPLETED":
                raise BenchError(f"sequential run {index} ended {row[0]}")
            progress.update(index + 1)
    dep.runs_started += count
    progress.finish(count)

    result_ms: list[float] = []
    progress = Progress("ours sequential (handle.result)", count)
    for index in range(count):
        start = time.perf_counter()
        client.start_workflow(NoopSaga, workflow_id=f"res-{index}").result(timeout=30)
        result_ms.append((time.perf_counter() - start) * 1000)
        progress.update(index + 1)
    dep.runs_started += count
    progress.finish(count)
    server_ms = [
        (closed - created).total_seconds() * 1000 for created, closed in dep.run_times("seq-")
    ]
    return {
        "count": count,
        "client_ms": summarize_ms(fine_ms),
        "client_result_ms": summarize_ms(result_ms),
        "server_ms": summarize_ms(server_ms),
    }


def count_client_statements(dep: Deployment, starts: int = 20) -> dict[str, float]:
    """Statements one ``start_workflow`` runs (a listener on the client's engine)."""
    from sqlalchemy import event

    from bench.saga_app import NoopSaga, statement_kind

    counts: Counter[str] = Counter()

    def statement(*args: Any) -> None:
        counts[statement_kind(args[2])] += 1

    def commit(*_args: Any) -> None:
        counts["COMMIT"] += 1

    engine = dep.orchestrator.db
    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        client = dep.orchestrator.client()
        for index in range(starts):
            client.start_workflow(NoopSaga, workflow_id=f"count-{index}")
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)
    dep.runs_started += starts
    dep.wait_closed("count-", starts, 60.0, "ours statement count")
    return {name: round(value / starts, 2) for name, value in counts.most_common()}


def run(ctx: Context) -> dict[str, Any]:
    """Throughput, sequential latency and peak memory of the engine."""
    options = ctx.options
    profile: dict[str, Any] = {}
    with deployed(ctx, "ours") as dep:
        profiler = waits = None
        if options.profile_dir is not None:
            from bench.profiling import PySpy, WaitSampler

            profiler = PySpy.attach(dep.procs["worker"].pid, options.profile_dir / "ours-worker")
            waits = WaitSampler(dep.database_url, str(make_url(dep.database_url).database))
        try:
            throughput = measure_throughput(dep, options.n)
        finally:
            if profiler is not None:
                profiler.stop()
            if waits is not None:
                profile["postgres_waits"] = waits.stop()
        sequential = measure_sequential(dep, options.sequential)
        if options.profile_dir is not None:
            profile["client_statements"] = count_client_statements(dep)
    teardown = ctx.shared.pop("ours_teardown", {})
    if options.profile_dir is not None:
        from bench.profiling import cpu_profile, sql_counts, summarize

        served = teardown.get("runs_served", 0)
        if profiler is not None:
            profile["sampling"] = summarize(profiler.outputs)
        profile["cpu"] = cpu_profile(options.profile_dir, served)
        profile["worker_statements"] = sql_counts(options.profile_dir, served)
    ctx.shared["ours_per_second"] = throughput["per_second"]
    result: dict[str, Any] = {
        "system": "ours",
        "label": "ours (durable saga)",
        "workers": f"1 worker process, prefork concurrency {options.workers} + scheduler",
        "throughput": throughput,
        "sequential": sequential,
        **teardown,
    }
    if profile:
        result["profile"] = profile
    return result
