"""The "celery chain" baseline: a prefork Celery worker running chains of three no-op tasks.

Chains are sent from one client thread (a send is one publish, far cheaper than
the work it causes) and their results come back over ``rpc://``. Nothing is
stored, so there is no server-side latency to report.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError

from bench.context import BenchError, Context
from bench.infra import CpuMeter, MemorySampler, Proc, cost_per_run, cpu_groups, python_module
from bench.stats import Progress, say, summarize_ms


def run(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    queue = ctx.rabbit.queue_name("celery-chain")
    env = {"BENCH_CELERY_QUEUE": queue, "BENCH_BROKER_URL": ctx.broker_url}
    # The client below is the same module: its queue and broker are read at import.
    os.environ.update(env)
    from bench import celery_chain

    worker = Proc(
        "celery-worker",
        python_module(
            "celery",
            "-A",
            "bench.celery_chain:app",
            "worker",
            "-Q",
            queue,
            "--concurrency",
            str(options.workers),
            "--pool",
            "prefork",
            "--hostname",
            f"bench-celery-{os.getpid()}@%h",
            "--loglevel",
            options.loglevel,
        ),
        ctx.log_dir,
        env,
    )
    try:
        with MemorySampler([worker.pid]) as sampler:
            warm = max(options.warmup, 2 * options.workers)
            say(f"celery: worker starting, warming up with {warm} chains")
            _wait_all([celery_chain.start_chain() for _ in range(warm)], 120.0, worker, "warm-up")

            groups = cpu_groups(
                workers={"worker": worker.pid}, database=None, broker_url=ctx.broker_url
            )
            with CpuMeter(groups) as meter:
                began = time.monotonic()
                results = [celery_chain.start_chain() for _ in range(options.n)]
                submitted = time.monotonic() - began
                _wait_all(results, options.timeout, worker, "throughput")
                elapsed = time.monotonic() - began

            latencies: list[float] = []
            progress = Progress("celery sequential", options.sequential)
            for index in range(options.sequential):
                start = time.perf_counter()
                celery_chain.start_chain().get(timeout=30)
                latencies.append((time.perf_counter() - start) * 1000)
                progress.update(index + 1)
            progress.finish(options.sequential)
    finally:
        worker.stop()
        celery_chain.app.close()
    return {
        "system": "celery",
        "label": "celery chain (not durable)",
        "workers": f"1 worker process, prefork concurrency {options.workers}",
        "throughput": {
            "n": options.n,
            "completed": options.n,
            "seconds": elapsed,
            "submit_seconds": submitted,
            "per_second": options.n / elapsed,
            "client_threads": 1,
            **cost_per_run(meter, options.n),
        },
        "sequential": {
            "count": options.sequential,
            "client_ms": summarize_ms(latencies),
            "server_ms": None,
        },
        "peak_worker_mb": sampler.peak / 2**20,
    }


def _wait_all(results: list[Any], timeout: float, worker: Proc, label: str) -> None:
    progress = Progress(f"celery {label}", len(results))
    deadline = time.monotonic() + timeout
    for done, result in enumerate(results, 1):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"celery {label}: {done - 1}/{len(results)} after {timeout:g}s")
            if not worker.alive:
                raise BenchError(f"celery worker exited:\n{worker.tail()}")
            try:
                result.get(timeout=min(remaining, 5.0))
                break
            except CeleryTimeoutError:
                continue
        progress.update(done)
    progress.finish(len(results))
