"""``python -m bench``: the engine against a Celery chain and a DBOS workflow, one invocation.

Every system runs on the same PostgreSQL and RabbitMQ, each on a database and
queues of its own that are created for the run and removed after it. The
figures are printed as a table (stdout) and, with ``--json PATH``, written as a
JSON document; progress goes to stderr. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench.context import BenchError, Context, Options
from bench.infra import Postgres, Rabbit, busy_processes, machine_info, stop_everything
from bench.report import (
    comparison_table,
    cpu_table,
    median_ratios,
    paired_lines,
    ratio_lines,
    ratios,
    round_lines,
    scale_table,
)
from bench.stats import say

SYSTEMS = ("ours", "celery", "dbos")
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--n", type=int, default=500, help="concurrent starts (default 500)")
    parser.add_argument(
        "--sequential", type=int, default=200, help="one-at-a-time runs for latency (default 200)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker concurrency of every system (default 2)"
    )
    parser.add_argument(
        "--client-threads",
        type=int,
        default=8,
        help="threads starting runs for ours and dbos (default 8; celery sends from one)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    parser.add_argument(
        "--only",
        default=",".join(SYSTEMS),
        help="comma-separated systems to compare: ours,celery,dbos (or 'none')",
    )
    parser.add_argument(
        "--scale", action="store_true", help="also run the long scenarios (several minutes)"
    )
    parser.add_argument(
        "--long-steps", type=int, default=5000, help="steps of the long-history run (5000)"
    )
    parser.add_argument(
        "--relay-seconds", type=float, default=30.0, help="sustained load for outbox lag (30)"
    )
    parser.add_argument(
        "--relay-rate",
        type=float,
        help="starts per second of the sustained load (default: half our measured throughput)",
    )
    parser.add_argument(
        "--open-runs",
        type=int,
        default=100_000,
        help="runs left open waiting on a signal (100000)",
    )
    parser.add_argument(
        "--signalled",
        type=int,
        default=3_000,
        help="of those, how many are signalled and run to their end (3000)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL server (its database name is ignored; each system gets a new one)",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER_URL),
        help="RabbitMQ (each system gets queues of its own)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="longest wait of any phase (seconds)"
    )
    parser.add_argument(
        "--loglevel", default="WARNING", help="log level of every worker (default WARNING)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile our worker during the throughput phase (py-spy, SQL counts) into DIR",
    )
    parser.add_argument("--log-dir", type=Path, help="worker logs (default: a temporary dir)")
    parser.add_argument(
        "--keep-databases",
        action="store_true",
        help="leave the benchmark's databases in place for inspection (names on stderr)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="measure the systems this many times, every other round in reverse order, and "
        "judge the targets by the median of each ratio (default 1)",
    )
    parser.add_argument(
        "--paired",
        type=_not_negative,
        default=0,
        metavar="K",
        help="also deploy the systems side by side and alternate K sets of throughput "
        "blocks between them, one block of each a set (default 0: not)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for a quiet machine (load average under 1)",
    )
    return parser


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _not_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def parse_only(value: str) -> tuple[str, ...]:
    if value.strip().lower() == "none":
        return ()
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown:
        raise SystemExit(f"error: --only: unknown system(s) {', '.join(unknown)}")
    return names


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(
        n=args.n,
        sequential=args.sequential,
        workers=args.workers,
        client_threads=args.client_threads,
        warmup=args.warmup,
        timeout=args.timeout,
        loglevel=args.loglevel,
        only=parse_only(args.only),
        scale=args.scale,
        long_steps=args.long_steps,
        relay_seconds=args.relay_seconds,
        relay_rate=args.relay_rate,
        open_runs=args.open_runs,
        signalled=args.signalled,
        profile_dir=args.profile.resolve() if args.profile else None,
        rounds=args.rounds,
        paired=args.paired,
    )
    if options.profile_dir is not None:
        options.profile_dir.mkdir(parents=True, exist_ok=True)
        for pattern in ("sql-*.json", "cpu-*.pstats", "*.txt"):
            for stale in options.profile_dir.glob(pattern):
                stale.unlink()
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        options=options,
        postgres=Postgres(args.database_url),
        rabbit=Rabbit(args.broker_url),
        broker_url=args.broker_url,
        log_dir=log_dir,
    )
    signal.signal(signal.SIGTERM, _on_signal)
    say(f"worker logs in {log_dir}")
    document: dict[str, Any] = {
        "benchmark": "three no-op steps: ours vs celery chain vs dbos",
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(options).items()
        },
    }
    failed = False
    try:
        document["machine"] = machine_info(ctx.postgres, ctx.rabbit)
        busy = _wait_quiet(args.wait_quiet)
        document["machine"]["busy_processes_at_start"] = busy
        document["machine"]["load_average_when_measuring_began"] = list(os.getloadavg())
        if busy:
            say("warning: other processes are busy, figures will be noisy: " + "; ".join(busy))
        say("calibrating: PostgreSQL commits per second on one connection")
        document["calibration"] = {
            "postgres_commits_per_second": round(ctx.postgres.commit_rate(), 1)
        }
        failed = _measure_all(ctx, document)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        stop_everything()
        ctx.rabbit.delete_queues()
        if args.keep_databases:
            say("kept databases: " + ", ".join(ctx.postgres.created))
        else:
            ctx.postgres.drop_all()
    document["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    if "machine" in document:
        document["machine"]["load_average_at_end"] = list(os.getloadavg())
    document["seconds"] = round(time.monotonic() - ctx.started, 1)
    _print(document)
    if args.json:
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        say(f"results written to {args.json}")
    return 1 if failed else 0


QUIET_LOAD = 1.0


def _compare(ctx: Context, count: int) -> list[dict[str, Any]]:
    """Measure the systems ``count`` times; each round's order, results and ratios.

    The machine's speed drifts within minutes (a VM's neighbours), so every
    other round runs the systems in reverse order, and the targets are judged
    by the median of each ratio.
    """
    only = ctx.options.only
    rounds: list[dict[str, Any]] = []
    for index in range(count):
        order = only if index % 2 == 0 else tuple(reversed(only))
        if count > 1:
            say(f"=== round {index + 1} of {count}: {', '.join(order)}")
        measured = {name: _measure(name, ctx) for name in order}
        results = {name: measured[name] for name in only}
        rounds.append({"order": list(order), "results": results, "ratios": ratios(results)})
    return rounds


def _measure_all(ctx: Context, document: dict[str, Any]) -> bool:
    """Every measurement the options ask for, into ``document``; whether any failed."""
    options = ctx.options
    rounds = _compare(ctx, options.rounds)
    failed = any("error" in r for entry in rounds for r in entry["results"].values())
    document["results"] = rounds[-1]["results"]
    document["ratios"] = median_ratios([entry["ratios"] for entry in rounds])
    if len(rounds) > 1:
        document["rounds"] = rounds
    if options.paired:
        document["paired"] = _side_by_side(ctx, options.paired)
        failed |= "error" in document["paired"]
    if options.scale:
        from bench import scale

        document["scale"] = scale.run(ctx)
        failed |= any(
            isinstance(value, dict) and "error" in value for value in document["scale"].values()
        )
    return failed


def _side_by_side(ctx: Context, sets: int) -> dict[str, Any]:
    from bench import paired

    say(f"--- the systems side by side, {sets} sets of blocks")
    return _guarded("side by side", lambda: paired.run(ctx, sets))


def _wait_quiet(seconds: float) -> list[str]:
    """Other busy processes now, after waiting up to ``seconds`` for a quiet machine.

    Quiet: no other process busy right now, and a one-minute load average under
    1, which takes a minute or so of calm to reach.
    """
    deadline = time.monotonic() + seconds
    busy = busy_processes()
    while (busy or os.getloadavg()[0] >= QUIET_LOAD) and time.monotonic() < deadline:
        load = os.getloadavg()[0]
        say(f"waiting for a quiet machine (load {load:.2f}): " + "; ".join(busy)[:150])
        time.sleep(10)
        busy = busy_processes()
    return busy


def _measure(name: str, ctx: Context) -> dict[str, Any]:
    runner: Callable[[Context], dict[str, Any]]
    if name == "ours":
        from bench.ours import run as runner
    elif name == "celery":
        from bench.celery_bench import run as runner
    else:
        from bench.dbos_bench import run as runner
    say(f"--- {name}")
    began = time.monotonic()
    result = _guarded(name, lambda: runner(ctx))
    if "error" in result:
        return {"system": name, "label": name, **result}
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    return result


def _guarded(what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """What ``measure`` returns, or ``{"error": why}``; every subprocess is stopped after it."""
    try:
        return measure()
    except BenchError as exc:
        say(f"{what} not measured: {exc}")
        return {"error": str(exc)}
    except Exception as exc:
        say(f"{what} not measured:\n{traceback.format_exc()}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        stop_everything()


def _print(document: dict[str, Any]) -> None:
    out = sys.stdout
    machine = document.get("machine", {})
    pg = machine.get("postgresql", {})
    out.write(
        f"\nmachine: {machine.get('cores')} cores ({machine.get('cpu')}), "
        f"{machine.get('memory_gb')} GB, Python {machine.get('python')}, "
        f"PostgreSQL {pg.get('server_version')}, RabbitMQ {machine.get('rabbitmq')}\n"
    )
    calibration = document.get("calibration", {})
    if calibration:
        out.write(
            f"PostgreSQL commits/s on one connection: "
            f"{calibration['postgres_commits_per_second']:,.0f}\n"
        )
    options = document["options"]
    results = document.get("results") or {}
    if results:
        out.write(
            f"\nN={options['n']} concurrent starts, {options['sequential']} sequential runs, "
            f"{options['workers']} workers each; latency in ms (client-observed; srv = the "
            f"run's own timestamps)\n\n"
        )
        rounds = document.get("rounds") or []
        if rounds:
            out.write(round_lines(rounds) + "\n\nthe last round:\n")
        out.write(comparison_table(results) + "\n\n")
        if rounds:
            out.write(f"ratios: the median of {len(rounds)} rounds\n")
        out.write(ratio_lines(document["ratios"]) + "\n")
        cpu = cpu_table(results)
        if cpu:
            out.write("\nCPU used during the throughput phase, per run (ms)\n" + cpu + "\n")
    profile = (results.get("ours") or {}).get("profile")
    if profile:
        from bench.profiling import format_profile

        out.write("\nprofile of our worker during the throughput phase\n")
        out.write(format_profile(profile) + "\n")
    side_by_side = document.get("paired")
    if side_by_side:
        out.write("\nside by side: the systems deployed together, their blocks alternating\n")
        if "error" in side_by_side:
            out.write(f"not measured: {side_by_side['error']}\n")
        else:
            out.write(paired_lines(side_by_side) + "\n")
    if "scale" in document:
        out.write("\nscale (ours only)\n")
        out.write(scale_table(document["scale"]) + "\n")
    out.flush()
