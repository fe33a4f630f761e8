"""The "dbos" baseline, run in its own process so that its memory can be measured.

``python -m bench.dbos_runner --database-url URL --n N --sequential S`` launches
DBOS on its own PostgreSQL database, runs a workflow of three no-op steps N times
at once and then S times one after the other, and writes one JSON document to
``--output`` (progress goes to stderr). The workflows run in this process, which is
how DBOS runs them: the starting code and the executing code share it.
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


def run(
    database_url: str, n: int, sequential: int, *, warmup: int, threads: int, timeout: float
) -> dict[str, Any]:
    config: DBOSConfig = {
        "name": "bench-dbos",
        "system_database_url": database_url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        for _ in range(warmup):
            DBOS.start_workflow(three_steps).get_result()

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

        progress = Progress("dbos sequential", sequential)
        client_ms: list[float] = []
        ids: list[str] = []
        for index in range(sequential):
            start = time.perf_counter()
            handle = DBOS.start_workflow(three_steps)
            handle.get_result()
            client_ms.append((time.perf_counter() - start) * 1000)
            ids.append(handle.get_workflow_id())
            progress.update(index + 1)
        progress.finish(sequential)
        return {
            "throughput": {
                "n": n,
                "completed": done,
                "seconds": elapsed,
                "submit_seconds": submitted,
                "per_second": done / elapsed if elapsed > 0 else None,
                "timed_out": done < n,
                "client_threads": threads,
                **cost_per_run(meter, max(1, done)),
            },
            "sequential": {
                "count": sequential,
                "client_ms": summarize_ms(client_ms),
                "server_ms": summarize_ms(_server_latencies(database_url, ids)),
            },
        }
    finally:
        DBOS.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--sequential", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    result = run(
        args.database_url,
        args.n,
        args.sequential,
        warmup=args.warmup,
        threads=args.threads,
        timeout=args.timeout,
    )
    args.output.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
