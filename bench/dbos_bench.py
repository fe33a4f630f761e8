"""The "dbos" baseline, driven as a subprocess (``bench.dbos_runner``) so its memory shows."""

from __future__ import annotations

import json
import time
from typing import Any

from bench.context import BenchError, Context
from bench.infra import MemorySampler, Proc, python_module
from bench.stats import say


def available() -> str | None:
    """None if DBOS can be imported here, else why not."""
    try:
        import dbos  # noqa: F401
    except ImportError as exc:
        return f"dbos is not installed ({exc}); pip install 'dbos>=3.4'"
    return None


def _runner_args(ctx: Context, database_url: str) -> list[str]:
    options = ctx.options
    return [
        "--database-url",
        database_url,
        "--warmup",
        str(max(options.warmup, 2 * options.workers)),
        "--threads",
        str(options.client_threads),
        "--timeout",
        str(options.timeout),
    ]


def run(ctx: Context) -> dict[str, Any]:
    options = ctx.options
    missing = available()
    if missing:
        raise BenchError(missing)
    database_url = ctx.postgres.create("dbos")
    output = ctx.log_dir / "dbos-result.json"
    proc = Proc(
        "dbos",
        python_module(
            "bench.dbos_runner",
            *_runner_args(ctx, database_url),
            "--n",
            str(options.n),
            "--sequential",
            str(options.sequential),
            "--output",
            str(output),
        ),
        ctx.log_dir,
        {},
    )
    say("dbos: running in its own process")
    deadline = time.monotonic() + options.timeout * 2 + 120
    try:
        with MemorySampler([proc.pid]) as sampler:
            while proc.alive:
                if time.monotonic() > deadline:
                    raise BenchError("dbos: the runner did not finish in time")
                proc.echo_progress()
                time.sleep(0.2)
            proc.echo_progress()
    finally:
        proc.stop()
    if proc.popen.returncode != 0 or not output.exists():
        raise BenchError(f"dbos runner failed ({proc.popen.returncode}):\n{proc.tail()}")
    result: dict[str, Any] = json.loads(output.read_text())
    return {
        "system": "dbos",
        "label": "dbos workflow",
        "workers": "1 process (workflows run in the starting process, thread pool)",
        **result,
        "peak_worker_mb": sampler.peak / 2**20,
    }


class ServingRunner:
    """A DBOS runner that stays up and runs throughput blocks when asked (side by side)."""

    def __init__(self, ctx: Context) -> None:
        missing = available()
        if missing:
            raise BenchError(missing)
        self.ctx = ctx
        self._blocks = 0
        database_url = ctx.postgres.create("dbos-paired")
        self.proc = Proc(
            "dbos-paired",
            python_module("bench.dbos_runner", *_runner_args(ctx, database_url), "--serve"),
            ctx.log_dir,
            {},
            stdin_pipe=True,
        )
        say("dbos: serving throughput blocks in its own process")

    def throughput(self, n: int) -> dict[str, Any]:
        self._blocks += 1
        output = self.ctx.log_dir / f"dbos-block-{self._blocks}.json"
        stdin = self.proc.popen.stdin
        if stdin is None:  # pragma: no cover - made with a pipe
            raise BenchError("dbos runner has no stdin")
        stdin.write(f"{n} {output}\n".encode())
        stdin.flush()
        # Launch and warm-up come before the first block. The runner's progress
        # goes to its log, which is echoed while the result is awaited: polled.
        deadline = time.monotonic() + self.ctx.options.timeout + 120
        while not output.exists():
            if not self.proc.alive:
                raise BenchError(f"dbos runner exited:\n{self.proc.tail()}")
            if time.monotonic() > deadline:
                raise BenchError("dbos: a throughput block did not finish in time")
            self.proc.echo_progress()
            time.sleep(0.05)
        self.proc.echo_progress()
        result: dict[str, Any] = json.loads(output.read_text())
        return result

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> ServingRunner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
