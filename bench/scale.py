"""``--scale``: the longer scenarios, on the engine only.

- long history: one run loops ``execute_activity`` over a no-op activity
  ``--long-steps`` times (5,000); the cost of each step is read from the history's
  own timestamps, and the last 100 steps are compared with the first 100.
  The same history is then replayed from scratch in this process (a worker whose
  cache lost the run), timing the database read and the replay apart.
- outbox lag: starts at a steady rate for ``--relay-seconds``, once with the
  normal post-commit publishing (the relay running as the safety net) and once
  with the relay publishing everything; the lag of a message is its row's
  ``published_at`` minus ``created_at``.
- open runs waiting on a signal: ``--open-runs`` runs (100,000) are started and
  left waiting on a signal; then ``--signalled`` of them (3,000, three times the
  workers' instance cache), picked at random, are signalled and run to their
  end. The workers' resident memory is sampled before the runs exist, with all
  of them open, and as the signalled ones finish: it must stay flat, because a
  worker holds at most its cache of instances, whatever the number of open runs.
"""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from bench.context import BenchError, Context
from bench.infra import stop_everything
from bench.ours import Deployment, deployed, private_queues
from bench.stats import Progress, say, summarize_ms

WINDOW = 100
LONG_STEP_TARGET = 1.2


# ------------------------------------------------------------------- long history
def long_history(ctx: Context) -> dict[str, Any]:
    """One run of ``--long-steps`` steps, ``--rounds`` times; the run of the median ratio.

    Its two windows of a hundred steps last about a tenth of a second each, so
    one run measures the machine's moment as much as the engine: with several
    rounds the target is judged by the median of their ratios.
    """
    with deployed(ctx, "ours_long") as dep:
        runs = [_long_run(ctx, dep, index) for index in range(ctx.options.rounds)]
        ranked = sorted(runs, key=lambda run: run["last_over_first"] or 0.0)
        chosen = ranked[len(ranked) // 2]
        chosen["cold_replay"] = _cold_replay(dep, chosen.pop("run_id"))
        for run in runs:
            run.pop("run_id", None)
    if len(runs) > 1:
        chosen["rounds_last_over_first"] = [run["last_over_first"] for run in runs]
        chosen["rounds_trend_ms_per_1000_steps"] = [run["trend_ms_per_1000_steps"] for run in runs]
    return {**chosen, **ctx.shared.pop("ours_long_teardown", {})}


def _long_run(ctx: Context, dep: Deployment, index: int) -> dict[str, Any]:
    from bench.saga_app import LongLoop

    steps = ctx.options.long_steps
    timeout = max(ctx.options.timeout, steps * 0.2)
    client = dep.orchestrator.client()
    began = time.monotonic()
    handle = client.start_workflow(LongLoop, steps, workflow_id=f"long-history-{index}")
    dep.runs_started += 1
    progress = Progress(f"long history ({steps} steps)", steps)
    while True:
        with dep.db.connect() as conn:
            length, closed, status = conn.execute(
                text(
                    "SELECT history_length, closed_at IS NOT NULL, status "
                    "FROM workflow_runs WHERE run_id = :r"
                ),
                {"r": handle.run_id},
            ).one()
        done = max(0, (length - 1) // 2)
        if closed:
            progress.finish(done)
            if status != "COMPLETED":
                raise BenchError(f"the long run ended {status}")
            break
        if time.monotonic() - began > timeout:
            raise BenchError(f"long history: {done}/{steps} steps after {timeout:g}s")
        dep.check_alive()
        progress.update(done)
        time.sleep(0.5)
    elapsed = time.monotonic() - began
    with dep.db.connect() as conn:
        scheduled = [
            row[0]
            for row in conn.execute(
                text(
                    "SELECT created_at FROM workflow_events WHERE run_id = :r "
                    "AND event_type = 'ActivityScheduled' ORDER BY seq"
                ),
                {"r": handle.run_id},
            )
        ]
        closed_at = conn.execute(
            text("SELECT closed_at FROM workflow_runs WHERE run_id = :r"),
            {"r": handle.run_id},
        ).scalar_one()
    bounds = [*scheduled, closed_at]
    per_step = [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(bounds)]
    window = min(WINDOW, len(per_step) // 2) or 1
    first = sum(per_step[:window]) / window
    last = sum(per_step[-window:]) / window
    first_median = statistics.median(per_step[:window])
    last_median = statistics.median(per_step[-window:])
    buckets = max(1, len(per_step) // 10)
    by_tenth = [
        round(sum(per_step[i : i + buckets]) / len(per_step[i : i + buckets]), 3)
        for i in range(0, len(per_step), buckets)
    ]
    ratio = last / first if first else None
    return {
        "run_id": handle.run_id,
        "steps": len(per_step),
        "events": 2 * len(per_step) + 2,
        "seconds": elapsed,
        "steps_per_second": len(per_step) / elapsed if elapsed else None,
        "first_window_ms_per_step": first,
        "last_window_ms_per_step": last,
        "window": window,
        "first_window_median_ms": first_median,
        "last_window_median_ms": last_median,
        "last_over_first_median": last_median / first_median if first_median else None,
        "last_over_first": ratio,
        "target": LONG_STEP_TARGET,
        "meets_target": ratio is not None and ratio <= LONG_STEP_TARGET,
        "ms_per_step_by_tenth": by_tenth,
        "trend_ms_per_1000_steps": _slope(per_step),
        "step_ms": summarize_ms(per_step),
    }


def _slope(values: list[float]) -> float | None:
    """Least-squares trend of the step cost, in ms per 1,000 steps (0: flat)."""
    count = len(values)
    if count < 2:
        return None
    mean_x = (count - 1) / 2
    mean_y = sum(values) / count
    spread = sum((x - mean_x) ** 2 for x in range(count))
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / spread
    return slope * 1000


def _cold_replay(dep: Deployment, run_id: str) -> dict[str, Any]:
    """Rebuild the run's workflow state from nothing, as a worker without it cached would."""
    try:
        from orchestrator.instance import ActivityDefaults, WorkflowInstance
        from orchestrator.runs import load_history

        orchestrator = dep.orchestrator
        defn = orchestrator.registry.workflow("LongLoop")
        with orchestrator.engine.sessions() as session:
            began = time.perf_counter()
            history = load_history(session, run_id)
            loaded = time.perf_counter()
        instance = WorkflowInstance(
            defn,
            run_id=run_id,
            workflow_id="long-history",
            defaults=ActivityDefaults(
                start_to_close=orchestrator.settings.default_start_to_close_seconds,
                max_payload_bytes=orchestrator.settings.max_payload_bytes,
            ),
        )
        started = time.perf_counter()
        new = instance.advance(history, len(history))
        replayed = time.perf_counter()
        instance.close()
    except Exception as exc:
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {
        "available": True,
        "events": len(history),
        "load_ms": (loaded - began) * 1000,
        "replay_ms": (replayed - started) * 1000,
        "replay_us_per_event": (replayed - started) * 1e6 / max(1, len(history)),
        "new_commands_after_replay": len(new),
    }


# ---------------------------------------------------------------------- outbox lag
RELAY_MODES: list[tuple[str, str, dict[str, str]]] = [
    ("post_commit", "publish after commit (relay as safety net)", {}),
    (
        "relay_only",
        "relay publishes everything",
        {"ORCHESTRATOR_PUBLISH_AFTER_COMMIT": "false", "ORCHESTRATOR_RELAY_GRACE_SECONDS": "0"},
    ),
]


def outbox_lag(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    measured = ctx.shared.get("ours_per_second")
    rate = options.relay_rate or (round(measured * 0.5, 1) if measured else 40.0)
    total = max(1, int(rate * options.relay_seconds))
    modes: dict[str, Any] = {}
    for key, label, env in RELAY_MODES:
        purpose = f"ours_{key}"
        say(f"outbox lag ({label}): {total} starts at {rate:g}/s")
        try:
            with deployed(ctx, purpose, env=env, relay=True) as dep:
                modes[key] = {"label": label, **_sustained(dep, rate, total)}
            modes[key].update(ctx.shared.pop(f"{purpose}_teardown", {}))
        except BenchError as exc:
            modes[key] = {"label": label, "error": str(exc)}
    return {"rate_per_second": rate, "seconds": options.relay_seconds, "modes": modes}


def _sustained(dep: Deployment, rate: float, total: int) -> dict[str, Any]:
    from bench.saga_app import NoopSaga

    options = dep.ctx.options
    client = dep.orchestrator.client()
    began_wall = datetime.now(UTC)
    began = time.monotonic()
    late: list[float] = []
    backlog: list[int] = []
    stop = threading.Event()

    def watch_backlog() -> None:
        while not stop.wait(0.5):
            try:
                with dep.db.connect() as conn:
                    backlog.append(
                        int(
                            conn.execute(
                                text(
                                    "SELECT count(*) FROM outbox_messages "
                                    "WHERE published_at IS NULL"
                                )
                            ).scalar_one()
                        )
                    )
            except Exception:
                return

    watcher = threading.Thread(target=watch_backlog, name="bench-backlog", daemon=True)
    watcher.start()
    progress = Progress("sustained starts", total)
    try:
        with ThreadPoolExecutor(options.client_threads, thread_name_prefix="bench-start") as pool:
            futures = []
            for index in range(total):
                due = began + index / rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                else:
                    late.append(-wait)
                futures.append(
                    pool.submit(client.start_workflow, NoopSaga, workflow_id=f"load-{index}")
                )
                progress.update(index + 1)
            for future in futures:
                future.result()
        submitted = time.monotonic() - began
        progress.finish(total)
        dep.runs_started += total
        dep.wait_closed("load-", total, options.timeout, "sustained runs")
    finally:
        stop.set()
        watcher.join(5)
    elapsed = time.monotonic() - began
    # Messages the relay publishes wait out its grace period: let them all go out.
    unpublished = _wait_published(dep, began_wall, timeout=30.0)
    with dep.db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT kind, destination, EXTRACT(EPOCH FROM published_at - created_at) * 1000 "
                "FROM outbox_messages WHERE created_at >= :t AND published_at IS NOT NULL"
            ),
            {"t": began_wall},
        ).all()
    lags = [float(row[2]) for row in rows]
    by_kind: dict[str, list[float]] = {}
    by_destination: dict[str, list[float]] = {}
    for kind, destination, lag in rows:
        by_kind.setdefault(kind, []).append(float(lag))
        by_destination.setdefault(destination, []).append(float(lag))
    runs_ms = [
        (closed - created).total_seconds() * 1000 for created, closed in dep.run_times("load-")
    ]
    return {
        "starts": total,
        "submit_seconds": submitted,
        "achieved_start_rate": total / submitted if submitted else None,
        "starts_behind_schedule": len(late),
        "seconds_until_all_closed": elapsed,
        "messages": len(lags),
        "lag_ms": summarize_ms(lags),
        "lag_ms_by_kind": {kind: summarize_ms(values) for kind, values in by_kind.items()},
        "lag_ms_by_destination": {
            name: summarize_ms(values) for name, values in sorted(by_destination.items())
        },
        "unpublished_after": unpublished,
        "max_backlog": max(backlog) if backlog else None,
        "run_ms": summarize_ms(runs_ms),
    }


def _wait_published(dep: Deployment, since: datetime, timeout: float) -> int:
    """Wait until every outbox row written since ``since`` is published; how many are not."""
    deadline = time.monotonic() + timeout
    while True:
        with dep.db.connect() as conn:
            left = int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM outbox_messages "
                        "WHERE published_at IS NULL AND created_at >= :t"
                    ),
                    {"t": since},
                ).scalar_one()
            )
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# ------------------------------------------------------ open runs waiting on a signal
FLAT_MEMORY_TARGET = 1.1
_START_BATCH = 500


def waiting_runs(ctx: Context) -> dict[str, Any]:
    from bench.saga_app import AwaitSignal

    total = ctx.options.open_runs
    chosen_count = min(ctx.options.signalled, total)
    # No lifecycle events: 100,000 of them would keep the relay busy during the
    # measurement, and they are not what this scenario is about.
    env = {"ORCHESTRATOR_LIFECYCLE_EVENTS": "false"}
    with deployed(ctx, "ours_waiting", env=env) as dep:
        assert dep.sampler is not None
        rss_idle = dep.sampler.sample()
        client = dep.orchestrator.client()
        sessions = dep.orchestrator.engine.sessions
        progress = Progress(f"starting {total:,} runs that wait on a signal", total)
        began = time.monotonic()
        for first in range(0, total, _START_BATCH):
            last = min(first + _START_BATCH, total)
            with sessions() as session:
                for index in range(first, last):
                    client.start_workflow(AwaitSignal, workflow_id=f"wait-{index}", session=session)
                session.commit()
            dep.runs_started += last - first
            dep.check_alive()
            progress.update(last)
        progress.finish(total)
        start_seconds = time.monotonic() - began
        open_count = _count(dep, "closed_at IS NULL")
        if open_count < total:
            raise BenchError(f"only {open_count} of {total} runs are open")
        time.sleep(2.0)
        rss_open = dep.sampler.sample()

        chosen = random.Random(7).sample(range(total), chosen_count)
        progress = Progress(f"signalling {chosen_count:,} of them", chosen_count)
        rss_during: list[int] = []
        began = time.monotonic()
        for sent, index in enumerate(chosen, 1):
            client.get_handle(f"wait-{index}").signal("proceed")
            if sent % max(1, chosen_count // 10) == 0:
                rss_during.append(dep.sampler.sample())
                dep.check_alive()
                progress.update(sent)
        deadline = time.monotonic() + ctx.options.timeout
        while (closed := _count(dep, "closed_at IS NOT NULL")) < chosen_count:
            if time.monotonic() > deadline:
                raise BenchError(f"{closed}/{chosen_count} signalled runs closed in time")
            dep.check_alive()
            time.sleep(0.2)
        progress.finish(chosen_count)
        signal_seconds = time.monotonic() - began
        rss_after = dep.sampler.sample()
        with dep.db.connect() as conn:
            latencies = [
                float(row[0]) * 1000
                for row in conn.execute(
                    text(
                        "SELECT extract(epoch FROM r.closed_at - e.created_at) "
                        "FROM workflow_runs r JOIN workflow_events e ON e.run_id = r.run_id "
                        "WHERE r.closed_at IS NOT NULL AND r.workflow_id LIKE 'wait-%' "
                        "AND e.event_type = 'SignalReceived'"
                    )
                )
            ]
            database_mb = (
                conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
                / 2**20
            )
    growth = rss_after / rss_idle if rss_idle else None
    return {
        "available": True,
        "open_runs": total,
        "signalled": chosen_count,
        "start_seconds": start_seconds,
        "starts_per_second": total / start_seconds if start_seconds else None,
        "signal_seconds": signal_seconds,
        "worker_rss_mb": {
            "idle": rss_idle / 2**20,
            "all_open": rss_open / 2**20,
            "while_signalled": [value / 2**20 for value in rss_during],
            "after": rss_after / 2**20,
        },
        "after_over_idle": growth,
        "target": FLAT_MEMORY_TARGET,
        "meets_target": growth is not None and growth <= FLAT_MEMORY_TARGET,
        "signal_to_close_ms": summarize_ms(latencies),
        "database_mb": database_mb,
        **ctx.shared.pop("ours_waiting_teardown", {}),
    }


def _count(dep: Deployment, condition: str) -> int:
    with dep.db.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM workflow_runs "
                    f"WHERE workflow_id LIKE 'wait-%' AND {condition}"
                )
            ).scalar_one()
        )


def run(ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # Before bench.saga_app is first imported: its activities' queue comes from it.
    private_queues(ctx)
    scenarios = (
        ("long_history", long_history),
        ("outbox_lag", outbox_lag),
        ("waiting_on_signal", waiting_runs),
    )
    for name, scenario in scenarios:
        try:
            results[name] = scenario(ctx)
        except BenchError as exc:
            say(f"{name} failed: {exc}")
            results[name] = {"error": str(exc)}
        except Exception as exc:
            say(f"{name} failed:\n{traceback.format_exc()}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            stop_everything()
    return results
