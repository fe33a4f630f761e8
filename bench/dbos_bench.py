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
            "--database-url",
            database_url,
            "--n",
            str(options.n),
            "--sequential",
            str(options.sequential),
            "--warmup",
            str(max(options.warmup, 2 * options.workers)),
            "--threads",
            str(options.client_threads),
            "--timeout",
            str(options.timeout),
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
