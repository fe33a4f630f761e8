"""``--profile DIR``: where a worker spends a step.

Three views, all written to DIR:

- CPU: each pool process of the worker runs under cProfile timed by CPU time
  (``bench.saga_app``), so time spent waiting costs nothing and what is left is
  what the machine pays for; summed by layer (PostgreSQL driver, SQLAlchemy,
  broker client, pydantic, replay...) and by engine function.
- wall clock: py-spy samples the pool processes, idle included, during the
  throughput phase, so it shows where a step waits (PostgreSQL, the broker);
  py-spy cannot tell the PostgreSQL driver's waits from work, which is why the
  CPU view comes from cProfile. It also samples the main process (CPU only).
- SQL: statements and transactions per run, counted in every process.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.stats import say

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# The first rule matching a frame, searched from the innermost frame outwards.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("postgres driver (psycopg: wire + wait)", ("/psycopg/", "/psycopg_binary/", "psycopg_c")),
    ("sqlalchemy (compile, execute, results)", ("/sqlalchemy/",)),
    ("broker client (kombu/amqp publish)", ("/kombu/", "/amqp/")),
    ("pydantic (validation, dump)", ("/pydantic/", "/pydantic_core/")),
    ("logging", ("/logging/",)),
    (
        "replay (instance, deterministic loop, workflow code)",
        (
            "/orchestrator/instance.py",
            "/orchestrator/loop.py",
            "/orchestrator/workflow.py",
            "/bench/saga_app.py",
            "/asyncio/",
        ),
    ),
    ("engine code (other)", ("/orchestrator/", "/outbox/", "/activities/")),
    ("celery/billiard machinery", ("/celery/", "/billiard/", "/vine/")),
]
ENGINE_FILES = ("/orchestrator/", "/outbox/", "/activities/", "/bench/saga_app.py")
# The command every sample of a worker passes through, busy or idle.
NOT_WORK = ("/orchestrator/cli.py", "/asyncio/")
# Task wrappers: on the stack of every task, so they say nothing about the transition.
ENTRY = ("/orchestrator/celery_app.py",)
OPERATION_DEPTH = 3


def _is_engine(file: str, *, skip_entry: bool = False) -> bool:
    if skip_entry and any(needle in file for needle in ENTRY):
        return False
    return any(needle in file for needle in ENGINE_FILES) and not any(
        needle in file for needle in NOT_WORK
    )


class WaitSampler:
    """Samples what the engine's PostgreSQL connections are doing (pg_stat_activity).

    ``ClientRead`` means the server waits for the engine (the engine is busy or
    between statements), ``Lock``/``LWLock`` a lock, ``IO`` a disk write or flush
    (commit), and no wait event an active statement on the CPU.
    """

    def __init__(self, database_url: str, database: str, interval: float = 0.02) -> None:
        import threading

        from sqlalchemy import create_engine

        self.engine = create_engine(database_url, pool_size=1)
        self.database = database
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-waits", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from sqlalchemy import text

        query = text(
            "SELECT state, wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity "
            "WHERE datname = :d AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        try:
            with self.engine.connect() as conn:
                while not self._stop.wait(self.interval):
                    rows = conn.execute(query, {"d": self.database}).all()
                    conn.rollback()
                    self.samples += 1
                    for state, kind, event, sql in rows:
                        if state == "idle":
                            key = "idle (connection in the pool)"
                        elif state == "idle in transaction":
                            key = "idle in transaction (the engine is working between statements)"
                        elif kind is None:
                            key = f"active on CPU: {' '.join(str(sql).split()[:3])}"
                        else:
                            key = f"{kind}:{event}"
                        self.counts[key] += 1
        except Exception as exc:
            say(f"profile: PostgreSQL wait sampling stopped: {exc}")

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        self.engine.dispose()
        busy = {key: value for key, value in self.counts.items() if not key.startswith("idle (")}
        total = sum(busy.values()) or 1
        return {
            "samples": self.samples,
            "busy_connections_on_average": round(sum(busy.values()) / max(1, self.samples), 2),
            "states": [
                {"name": key, "share": round(value / total, 4)}
                for key, value in sorted(busy.items(), key=lambda item: -item[1])[:15]
            ],
        }


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else None


class PySpy:
    """py-spy recorders on a worker's pool processes (idle included) and main process."""

    def __init__(self, procs: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
        self.procs = procs

    @classmethod
    def attach(cls, worker_pid: int, prefix: Path) -> PySpy | None:
        binary = py_spy()
        if binary is None:
            say("profile: py-spy not found, skipping the sampling profile")
            return None
        try:
            from bench.infra import optional_psutil

            psutil = optional_psutil()
            if psutil is None:
                raise RuntimeError("psutil is not installed")
            children = [child.pid for child in psutil.Process(worker_pid).children()]
        except Exception as exc:
            say(f"profile: cannot list the worker's pool processes ({exc})")
            return None
        procs = []
        # Pool processes on the wall clock (idle included: where a step waits); the
        # main process for CPU only.
        targets = [(f"child-{pid}-wall", pid, True) for pid in children]
        targets.append(("main", worker_pid, False))
        for label, pid, idle in targets:
            out = prefix.parent / f"{prefix.name}-{label}.txt"
            argv = [binary, "record", "--pid", str(pid), "--format", "raw", "--full-filenames"]
            argv += ["--rate", "100", "--nonblocking", "-o", str(out)]
            if idle:
                argv.append("--idle")
            popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append((label, popen, out))
        say(f"profile: sampling {len(children)} pool process(es) and the main process")
        return cls(procs)

    def stop(self) -> None:
        for _, popen, _ in self.procs:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGINT)
        for label, popen, _ in self.procs:
            try:
                _, err = popen.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
                err = b""
            if popen.returncode not in (0, None, -2):
                say(f"profile: py-spy on {label} ended {popen.returncode}: {err.decode()[-300:]}")

    @property
    def outputs(self) -> list[tuple[str, Path]]:
        return [(label, out) for label, _, out in self.procs]


def _parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for raw in path.read_text(errors="replace").splitlines():
        body, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        frames = []
        for part in body.split(";"):
            match = _FRAME.match(part)
            if match:
                frames.append((match["func"], match["file"]))
        stacks.append((frames, int(count)))
    return stacks


def _layer(frames: list[tuple[str, str]]) -> str:
    for _, file in reversed(frames):
        for name, needles in LAYERS:
            if any(needle in file for needle in needles):
                return name
    return "other"


def _engine_function(frames: list[tuple[str, str]]) -> str | None:
    for func, file in reversed(frames):
        if _is_engine(file):
            return f"{Path(file).parent.name}/{Path(file).name}:{func}"
    return None


def _operation(frames: list[tuple[str, str]]) -> str | None:
    """The outermost engine functions of a sample: which transition it belongs to."""
    names = [func for func, file in frames if _is_engine(file, skip_entry=True)]
    return " > ".join(names[:OPERATION_DEPTH]) if names else None


def _breakdown(stacks: list[tuple[list[tuple[str, str]], int]]) -> dict[str, Any]:
    total = sum(count for _, count in stacks)
    in_engine = [(frames, count) for frames, count in stacks if _engine_function(frames)]
    engine_total = sum(count for _, count in in_engine)
    layers: Counter[str] = Counter()
    operations: Counter[str] = Counter()
    hot: Counter[str] = Counter()
    for frames, count in in_engine:
        layer = _layer(frames)
        layers[layer] += count
        operations[_operation(frames) or "?"] += count
        hot[f"{_engine_function(frames)}  [{layer}]"] += count

    def shares(counter: Counter[str], top: int) -> list[dict[str, Any]]:
        whole = engine_total or 1
        return [
            {"name": name, "share": round(count / whole, 4), "samples": count}
            for name, count in counter.most_common(top)
        ]

    return {
        "samples": total,
        "in_engine_share": round(engine_total / total, 4) if total else None,
        "layers": shares(layers, 20),
        "operations": shares(operations, 12),
        "hot_spots": shares(hot, 25),
    }


def summarize(outputs: list[tuple[str, Path]]) -> dict[str, Any]:
    groups: dict[str, list[tuple[list[tuple[str, str]], int]]] = {
        "pool_wall": [],
        "main_cpu": [],
    }
    for label, path in outputs:
        if not path.exists():
            continue
        key = "main_cpu" if label == "main" else f"pool_{label.rsplit('-', 1)[1]}"
        groups[key].extend(_parse(path))
    main = groups["main_cpu"]
    main_total = sum(count for _, count in main)
    main_layers: Counter[str] = Counter()
    for frames, count in main:
        main_layers[_layer(frames)] += count
    return {
        "pool_wall": _breakdown(groups["pool_wall"]),
        "main_cpu_samples": main_total,
        "main_layers": [
            {"name": name, "share": round(count / (main_total or 1), 4), "samples": count}
            for name, count in main_layers.most_common(10)
        ],
    }


def _file_layer(file: str, name: str) -> str:
    if file == "~":  # a built-in: named after its module or type
        for needle, layer in (
            ("psycopg", LAYERS[0][0]),
            ("pydantic", "pydantic (validation, dump)"),
            ("socket", "sockets and polling (system calls)"),
            ("select", "sockets and polling (system calls)"),
            ("poll", "sockets and polling (system calls)"),
        ):
            if needle in name:
                return layer
        return "built-ins (other)"
    for layer, needles in LAYERS:
        if any(needle in file for needle in needles):
            return layer
    if "/json/" in file:
        return "json (stdlib)"
    return "other"


def _largest(values: dict[str, float], top: int) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda item: -item[1])[:top]


def cpu_profile(directory: Path, runs: int) -> dict[str, Any]:
    """Pool processes' CPU per run, by layer and by engine function (cProfile files)."""
    import pstats

    files = sorted(str(path) for path in directory.glob("cpu-pool-*.pstats"))
    if not files or runs <= 0:
        return {}
    stats = pstats.Stats(*files)
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values())
    layers: defaultdict[str, float] = defaultdict(float)
    own: defaultdict[str, float] = defaultdict(float)
    for (file, line, name), (_cc, _nc, tottime, _ct, _callers) in table.items():
        layers[_file_layer(file, name)] += tottime
        label = name if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line} {name}"
        own[label] += tottime
    engine: list[tuple[str, float]] = []
    for (file, line, name), (_cc, _nc, _tt, cumtime, _callers) in table.items():
        if _is_engine(file, skip_entry=True) and "/bench/" not in file:
            engine.append((f"{Path(file).parent.name}/{Path(file).name}:{line} {name}", cumtime))
    engine.sort(key=lambda item: -item[1])

    def per_run(seconds: float) -> float:
        return round(seconds * 1000 / runs, 3)

    return {
        "runs": runs,
        "cpu_ms_per_run": per_run(total),
        "layers_ms_per_run": [
            {"name": name, "ms": per_run(value)} for name, value in _largest(layers, 20)
        ],
        "engine_cumulative_ms_per_run": [
            {"name": name, "ms": per_run(value)} for name, value in engine[:30]
        ],
        "own_time_ms_per_run": [
            {"name": name, "ms": per_run(value)} for name, value in _largest(own, 25)
        ],
    }


def sql_counts(directory: Path, runs: int, role: str = "worker") -> dict[str, Any]:
    """Statements per run, summed over the processes of ``role`` that wrote counts."""
    totals: Counter[str] = Counter()
    for path in directory.glob(f"sql-{role}-*.json"):
        with contextlib.suppress(OSError, ValueError):
            totals.update(json.loads(path.read_text()))
    if not totals or runs <= 0:
        return {}
    return {
        "runs": runs,
        "per_run": {
            name: round(count / runs, 2)
            for name, count in sorted(totals.items(), key=lambda item: -item[1])
        },
    }


def _format_breakdown(title: str, data: dict[str, Any]) -> list[str]:
    share = data.get("in_engine_share")
    lines = [
        f"{title}: {data['samples']} samples, "
        + (f"{share * 100:.0f}% inside engine code" if share is not None else "none")
    ]
    lines.append("  by layer (share of in-engine samples):")
    lines += [f"    {item['share'] * 100:5.1f}%  {item['name']}" for item in data["layers"]]
    lines.append("  by transition:")
    lines += [f"    {item['share'] * 100:5.1f}%  {item['name']}" for item in data["operations"]]
    lines.append("  hot spots (innermost engine function [layer]):")
    lines += [f"    {item['share'] * 100:5.1f}%  {item['name']}" for item in data["hot_spots"][:15]]
    return lines


def format_profile(profile: dict[str, Any]) -> str:
    lines: list[str] = []
    sampled = profile.get("sampling") or {}
    if sampled:
        lines += _format_breakdown(
            "pool processes, wall clock (waits included)", sampled["pool_wall"]
        )
        lines.append(f"main process, CPU ({sampled['main_cpu_samples']} samples):")
        lines += [
            f"    {item['share'] * 100:5.1f}%  {item['name']}" for item in sampled["main_layers"]
        ]
    cpu = profile.get("cpu") or {}
    if cpu:
        lines.append(
            f"pool processes, CPU (cProfile on CPU time, inflated by its overhead): "
            f"{cpu['cpu_ms_per_run']:.1f} ms per run"
        )
        lines.append("  by layer (ms per run):")
        lines += [f"    {item['ms']:7.2f}  {item['name']}" for item in cpu["layers_ms_per_run"]]
        lines.append("  engine functions, cumulative (ms per run):")
        lines += [
            f"    {item['ms']:7.2f}  {item['name']}"
            for item in cpu["engine_cumulative_ms_per_run"][:20]
        ]
        lines.append("  own time, top functions (ms per run):")
        lines += [
            f"    {item['ms']:7.2f}  {item['name']}" for item in cpu["own_time_ms_per_run"][:15]
        ]
    waits = profile.get("postgres_waits") or {}
    if waits:
        lines.append(
            f"PostgreSQL connections of the run's database, non-idle "
            f"(on average {waits['busy_connections_on_average']} at a time):"
        )
        lines += [f"    {item['share'] * 100:5.1f}%  {item['name']}" for item in waits["states"]]
    statements = profile.get("worker_statements") or {}
    if statements:
        lines.append(f"worker SQL per run (over {statements['runs']} runs):")
        lines += [f"    {value:6.2f}  {name}" for name, value in statements["per_run"].items()]
    client = profile.get("client_statements") or {}
    if client:
        lines.append("client SQL per start:")
        lines += [f"    {value:6.2f}  {name}" for name, value in client.items()]
    return "\n".join(lines)
