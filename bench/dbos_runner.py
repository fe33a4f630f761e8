"""The "dbos" baseline, run in its own process so that its memory can be measured.

``python -m bench.dbos_runner --database-url URL --n N --sequential S`` launches
DBOS on its own PostgreSQL database, runs a workflow of three no-op steps N times
at once and then S times one after the other, and writes one JSON document to
``--output`` (progress goes to stderr). With ``--serve`` it runs throughput
blocks as they are asked for on stdin instead (see :func:`serve`). The
workflows run in this process, which is how DBOS runs them: the starting code
and the executing code share it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dbos import DBOS, DBOSConfig
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.infra import CpuMeter, cost_per_run, cpu_groups
from bench.stats import Progress, summarize_ms


@DBOS.step()
def step_one() -> None:
    """Does nothing."""


@DBOS.step()
def step_two() -> None:
    """Does nothing."""


@DBOS.step()
def step_three() -> None:
    """Does nothing."""


@DBOS.workflow()
def three_steps() -> None:
    step_one()
    step_two()
    step_three()


def _server_latencies(database_url: str, workflow_ids: list[str]) -> list[float]:
    """created_at to updated_at of each run's status row, in ms (the runs' own timestamps)."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT workflow_uuid, COALESCE(completed_at, updated_at) - created_at "
                    "FROM dbos.workflow_status "
                    "WHERE workflow_uuid = ANY(:ids) AND status = 'SUCCESS'"
                ),
                {"ids": workflow_ids},
            ).all()
    finally:
        engine.dispose()
    return [float(delta) for _, delta in rows]


def launch(database_url: str, warmup: int) -> None:
    config: DBOSConfig = {
        "name": "bench-dbos",
        "system_database_url": database_url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    for _ in range(warmup):
        DBOS.start_workflow(three_steps).get_result()


def throughput(database_url: str, n: int, *, threads: int, timeout: float) -> dict[str, Any]:
    """``n`` workflows started at once from ``threads`` threads, until every one has ended."""
    groups = cpu_groups(
        workers={"dbos process (workflows and client)": os.getpid()},
        database=make_url(database_url).database,
        broker_url=None,
        client=False,
    )
    progress = Progress("dbos throughput", n)
    with CpuMeter(groups) as meter:
        began = time.perf_counter()
        with ThreadPoolExecutor(threads, thread_name_prefix="bench-start") as pool:
            handles = list(pool.map(lambda _: DBOS.start_workflow(three_steps), range(n)))
        submitted = time.perf_counter() - began
        deadline = time.monotonic() + timeout
        done = 0
        for handle in handles:
            if time.monotonic() > deadline:
                break
            handle.get_result()
            done += 1
            progress.update(done)
        elapsed = time.perf_counter() - began
    progress.finish(done)
    return {
        "n": n,
        "completed": done,
        "seconds": elapsed,
        "submit_seconds": submitted,
        "per_second": done / elapsed if elapsed > 0 else None,
        "timed_out": done < n,
        "client_threads": threads,
        **cost_per_run(meter, max(1, done)),
    }


def sequential_latencies(database_url: str, count: int) -> dict[str, Any]:
    progress = Progress("dbos sequential", count)
    client_ms: list[float] = []
    ids: list[str] = []
    for index in range(count):
        start = time.perf_counter()
        handle = DBOS.start_workflow(three_steps)
        handle.get_result()
        client_ms.append((time.perf_counter() - start) * 1000)
        ids.append(handle.get_workflow_id())
        progress.update(index + 1)
    progress.finish(count)
    return {
        "count": count,
        "client_ms": summarize_ms(client_ms),
        "server_ms": summarize_ms(_server_latencies(database_url, ids)),
    }


def serve(database_url: str, *, threads: int, timeout: float) -> None:
    """Throughput blocks on request: a line ``N PATH`` on stdin, the result to PATH.

    For the side-by-side measurement, which alternates blocks between the
    systems; the result appears at PATH whole (written aside, then renamed).
    """
    for line in sys.stdin:
        if not line.strip():
            continue
        count, path = line.split(maxsplit=1)
        target = Path(path.strip())
        result = throughput(database_url, int(count), threads=threads, timeout=timeout)
        aside = target.with_suffix(".tmp")
        aside.write_text(json.dumps(result))
        aside.rename(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--serve", action="store_true", help="run throughput blocks asked for on stdin"
    )
    args = parser.parse_args()
    if not args.serve and args.output is None:
        parser.error("--output is required unless --serve")
    try:
        launch(args.database_url, args.warmup)
        if args.serve:
            serve(args.database_url, threads=args.threads, timeout=args.timeout)
            return 0
        result = {
            "throughput": throughput(
                args.database_url, args.n, threads=args.threads, timeout=args.timeout
            ),
            "sequential": sequential_latencies(args.database_url, args.sequential),
        }
    finally:
        DBOS.destroy()
    args.output.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
