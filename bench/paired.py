"""The three systems deployed side by side, their throughput blocks alternating.

A round of the harness measures one system for a minute or more before it
starts the next, and this kind of machine drifts by a third within minutes:
the ratio of two such phases says as much about the minutes as about the
systems. Here all run at once (``--paired K``): K sets of blocks of ``--n``
runs, one block of each system in every set, every other set in reverse
order, so that they meet the same minute. The idle ones keep their processes
up (our scheduler polls, the Celery workers wait on the broker, DBOS's
process waits for its next block). DBOS takes part where it is installed.

Each block gives throughput, CPU a run, and how busy it kept the machine (CPU
a run times runs a second, over the cores): with CPU a run equal, a system
that waits more (for the disk, for a wake-up) shows it there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
from collections.abc import Callable
from typing import Any

from bench.context import Context
from bench.stats import say

SYSTEMS = ("ours", "celery", "dbos")
RATIOS = ("throughput_vs_celery", "throughput_vs_dbos", "cpu_vs_celery", "cpu_vs_dbos")


def run(ctx: Context, sets: int) -> dict[str, Any]:
    from bench import celery_bench, dbos_bench, ours

    n = ctx.options.n
    missing = dbos_bench.available()
    if missing:
        say(f"side by side without dbos: {missing}")
    systems = SYSTEMS[:2] if missing else SYSTEMS
    blocks: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        dep = stack.enter_context(ours.deployed(ctx, "ours-paired"))
        measures: dict[str, Callable[[int], dict[str, Any]]] = {
            "celery": stack.enter_context(celery_bench.ChainWorker(ctx)).throughput,
        }
        if not missing:
            measures["dbos"] = stack.enter_context(dbos_bench.ServingRunner(ctx)).throughput
        for index in range(sets):
            order = systems if index % 2 == 0 else tuple(reversed(systems))
            say(f"=== set {index + 1} of {sets}: {', '.join(order)}")
            measures["ours"] = functools.partial(
                ours.measure_throughput, dep, prefix=f"set{index}-"
            )
            measured = {name: measures[name](n) for name in order}
            blocks.append({"order": list(order), **{name: measured[name] for name in systems}})
    return summarize(blocks, os.cpu_count() or 1)


def summarize(blocks: list[dict[str, Any]], cores: int) -> dict[str, Any]:
    """Every set's figures and ratios, and the median of each ratio over the sets."""
    sets: list[dict[str, Any]] = []
    for block in blocks:
        figures = {name: _figures(block[name], cores) for name in SYSTEMS if name in block}
        ours = figures["ours"]
        found: dict[str, Any] = {"order": block["order"], **figures}
        for other in ("celery", "dbos"):
            if other in figures:
                found[f"throughput_vs_{other}"] = _ratio(
                    ours["per_second"], figures[other]["per_second"]
                )
                found[f"cpu_vs_{other}"] = _ratio(
                    ours["cpu_ms_per_run"], figures[other]["cpu_ms_per_run"]
                )
        sets.append(found)
    systems = [name for name in SYSTEMS if name in blocks[0]] if blocks else []
    return {
        "sets": sets,
        "median": {key: _median([found.get(key) for found in sets]) for key in RATIOS}
        | {
            f"{name}_{key}": _median([found[name][key] for found in sets])
            for name in systems
            for key in ("per_second", "cpu_ms_per_run", "busy")
        },
        "blocks": blocks,
    }


def _figures(throughput: dict[str, Any], cores: int) -> dict[str, float | None]:
    per_second = throughput.get("per_second")
    cpu = (throughput.get("cpu_ms_per_run") or {}).get("total")
    return {
        "per_second": per_second,
        "cpu_ms_per_run": cpu,
        "busy": cpu * per_second / 1000 / cores if cpu is not None and per_second else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None
