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


class ChainWorker:
    """A running prefork worker of the chain, warmed up, and the client that sends to it."""

    def __init__(self, ctx: Context) -> None:
        options = ctx.options
        self.ctx = ctx
        queue = ctx.rabbit.queue_name("celery-chain")
        env = {"BENCH_CELERY_QUEUE": queue, "BENCH_BROKER_URL": ctx.broker_url}
        # The client below is the same module: its queue and broker are read at import.
        os.environ.update(env)
        from bench import celery_chain

        self.chains = celery_chain
        self.proc = Proc(
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
        self.sampler = MemorySampler([self.proc.pid]).__enter__()
        warm = max(options.warmup, 2 * options.workers)
        say(f"celery: worker starting, warming up with {warm} chains")
        try:
            warming = [celery_chain.start_chain() for _ in range(warm)]
            _wait_all(warming, 120.0, self.proc, "warm-up")
        except BaseException:
            self.stop()
            raise

    def throughput(self, n: int) -> dict[str, Any]:
        """``n`` chains sent at once from one thread, until every result is back."""
        groups = cpu_groups(
            workers={"worker": self.proc.pid}, database=None, broker_url=self.ctx.broker_url
        )
        with CpuMeter(groups) as meter:
            began = time.monotonic()
            results = [self.chains.start_chain() for _ in range(n)]
            submitted = time.monotonic() - began
            _wait_all(results, self.ctx.options.timeout, self.proc, "throughput")
            elapsed = time.monotonic() - began
        return {
            "n": n,
            "completed": n,
            "seconds": elapsed,
            "submit_seconds": submitted,
            "per_second": n / elapsed,
            "client_threads": 1,
            **cost_per_run(meter, n),
        }

    def sequential(self, count: int) -> list[float]:
        """Milliseconds of ``count`` chains, one after the other."""
        latencies: list[float] = []
        progress = Progress("celery sequential", count)
        for index in range(count):
            start = time.perf_counter()
            self.chains.start_chain().get(timeout=30)
            latencies.append((time.perf_counter() - start) * 1000)
            progress.update(index + 1)
        progress.finish(count)
        return latencies

    @property
    def peak_mb(self) -> float:
        """The highest resident memory of the worker's processes so far."""
        return self.sampler.peak / 2**20

    def stop(self) -> None:
        self.sampler.__exit__(None, None, None)
        self.proc.stop()
        self.chains.app.close()

    def __enter__(self) -> ChainWorker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def run(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    with ChainWorker(ctx) as worker:
        throughput = worker.throughput(options.n)
        latencies = worker.sequential(options.sequential)
        peak = worker.peak_mb
    return {
        "system": "celery",
        "label": "celery chain (not durable)",
        "workers": f"1 worker process, prefork concurrency {options.workers}",
        "throughput": throughput,
        "sequential": {
            "count": options.sequential,
            "client_ms": summarize_ms(latencies),
            "server_ms": None,
        },
        "peak_worker_mb": peak,
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
