"""Services and processes: fresh databases, private queues, subprocesses and their memory."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from bench.stats import say

ROOT = Path(__file__).resolve().parents[1]
RUN_TAG = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------------- PostgreSQL
class Postgres:
    """The server the systems share; each gets a database of its own, dropped at the end."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() != "postgresql":
            raise SystemExit(f"error: --database-url must be a PostgreSQL URL, got {url!r}")
        self.base: URL = parsed.set(drivername="postgresql+psycopg")
        self.created: list[str] = []

    def url_of(self, database: str) -> str:
        return self.base.set(database=database).render_as_string(hide_password=False)

    def _admin(self) -> Any:
        return create_engine(self.base.set(database="postgres"), isolation_level="AUTOCOMMIT")

    def create(self, purpose: str) -> str:
        """A new empty database for ``purpose``; returns its URL."""
        name = f"bench_{purpose}_{RUN_TAG}"
        engine = self._admin()
        try:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        self.created.append(name)
        return self.url_of(name)

    def drop_all(self) -> None:
        if not self.created:
            return
        engine = self._admin()
        try:
            with engine.connect() as conn:
                for name in self.created:
                    try:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    except Exception as exc:
                        say(f"could not drop database {name}: {exc}")
        finally:
            engine.dispose()
        self.created.clear()

    def describe(self) -> dict[str, Any]:
        engine = self._admin()
        try:
            with engine.connect() as conn:
                settings = {
                    name: conn.execute(text(f"SHOW {name}")).scalar()
                    for name in (
                        "server_version",
                        "synchronous_commit",
                        "fsync",
                        "shared_buffers",
                        "max_connections",
                    )
                }
        finally:
            engine.dispose()
        return settings

    def commit_rate(self, seconds: float = 2.0) -> float:
        """Single-row insert-and-commit transactions per second on one connection."""
        url = self.create("calibration")
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("CREATE TABLE t (id bigserial PRIMARY KEY, v int)"))
                conn.commit()
                count = 0
                began = time.perf_counter()
                while time.perf_counter() - began < seconds:
                    conn.execute(text("INSERT INTO t (v) VALUES (1)"))
                    conn.commit()
                    count += 1
                return count / (time.perf_counter() - began)
        finally:
            engine.dispose()


# ------------------------------------------------------------------------ RabbitMQ
class Rabbit:
    """The broker the systems share; each uses queues of its own, deleted at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queues: list[str] = []

    def queue_name(self, purpose: str) -> str:
        name = f"bench.{purpose}.{RUN_TAG}"
        self.queues.append(name)
        return name

    def version(self) -> str | None:
        from kombu.connection import Connection

        conn: Any = Connection(self.url, connect_timeout=5)  # type: ignore[no-untyped-call]
        with conn:
            conn.connect()
            value = conn.connection.server_properties.get("version")
            return value.decode() if isinstance(value, bytes) else str(value)

    def delete_queues(self) -> None:
        if not self.queues:
            return
        from kombu.connection import Connection

        try:
            conn: Any = Connection(self.url, connect_timeout=5)  # type: ignore[no-untyped-call]
            with conn:
                for name in self.queues:
                    channel = conn.channel()
                    try:
                        channel.queue_delete(name)
                        channel.exchange_delete(name)
                    except Exception as exc:
                        say(f"could not delete queue {name}: {exc}")
                    finally:
                        with contextlib.suppress(Exception):
                            channel.close()
        except Exception as exc:
            say(f"could not delete the benchmark's queues: {exc}")
        self.queues.clear()


# ------------------------------------------------------------------------ processes
_RUNNING: list[Proc] = []


class Proc:
    """A subprocess in a process group of its own, logging to a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str],
        *,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env)
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        _RUNNING.append(self)

        self._echoed = 0

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def echo_progress(self) -> None:
        """Copy the process's new ``[bench]`` progress lines to our stderr."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._echoed)
                chunk = log.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self._echoed += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            if line.startswith("[bench]"):
                sys.stderr.write(line + "\n")

    def tail(self, lines: int = 30) -> str:
        try:
            text_ = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text_.splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (a Celery worker then finishes its tasks), SIGKILL the group after ``grace``."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()
        if self in _RUNNING:
            _RUNNING.remove(self)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stop_everything() -> None:
    """Stop every subprocess still running (on exit, error or Ctrl-C)."""
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in list(_RUNNING):
        proc.stop(grace=5.0)


# --------------------------------------------------------------------------- memory
def optional_psutil() -> Any:
    """The psutil module if installed (it has no type stubs here), else None."""
    try:
        return importlib.import_module("psutil")
    except ImportError:
        return None


def _children_proc(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in task.read_text().split())
    return found


def _rss_proc(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_rss(roots: Iterable[int]) -> int:
    """Bytes of resident memory of the processes ``roots`` and all their descendants."""
    psutil = optional_psutil()
    total = 0
    for root in roots:
        if psutil is not None:
            try:
                parent = psutil.Process(root)
                members = [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for member in members:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += member.memory_info().rss
        else:
            pending = [root]
            while pending:
                pid = pending.pop()
                total += _rss_proc(pid)
                pending.extend(_children_proc(pid))
    return total


class MemorySampler:
    """Samples the resident memory of process trees in a thread and keeps the peak."""

    def __init__(self, roots: Iterable[int], interval: float = 0.25) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        self.last = tree_rss(self.roots)
        self.peak = max(self.peak, self.last)
        return self.last

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


# ------------------------------------------------------------------------- machine
def machine_info(postgres: Postgres, rabbit: Rabbit) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gb": _memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "packages": _versions(
            "celery", "kombu", "sqlalchemy", "psycopg", "pydantic", "dbos", "psutil"
        ),
        "engine_commit": _git("rev-parse", "--short", "HEAD"),
        "engine_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        info["postgresql"] = postgres.describe()
    except Exception as exc:
        info["postgresql"] = {"error": str(exc)}
    try:
        info["rabbitmq"] = rabbit.version()
    except Exception as exc:
        info["rabbitmq"] = f"unknown ({exc})"
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_gb() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def _versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def busy_processes(threshold: float = 20.0) -> list[str]:
    """Other processes using a lot of CPU right now (a noisy machine skews the figures)."""
    psutil = optional_psutil()
    if psutil is None:
        return []
    mine = {os.getpid()}
    procs = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
    time.sleep(1.0)
    busy = []
    for proc in procs:
        if proc.pid in mine:
            continue
        with contextlib.suppress(psutil.Error):
            usage = proc.cpu_percent(None)
            if usage >= threshold:
                command = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
                busy.append(f"{usage:.0f}% {command[:80]}")
    return busy


# ------------------------------------------------------------------------------ CPU
def tree_pids(root: int) -> list[int]:
    psutil = optional_psutil()
    if psutil is None:
        pending, found = [root], []
        while pending:
            pid = pending.pop()
            found.append(pid)
            pending.extend(_children_proc(pid))
        return found
    try:
        parent = psutil.Process(root)
        return [parent.pid, *(child.pid for child in parent.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _descendants(root: int) -> list[int]:
    return tree_pids(root)[1:]


def postgres_backends(database: str) -> list[int]:
    """Server processes serving connections to ``database``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if cmdline.startswith("postgres:") and f" {database} " in cmdline:
                found.append(int(entry.name))
    return found


def broker_pids(port: int) -> list[int]:
    """The process listening on the broker's port (RabbitMQ's beam.smp)."""
    psutil = optional_psutil()
    if psutil is None:
        return []
    with contextlib.suppress(Exception):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == "LISTEN" and conn.laddr and conn.laddr.port == port and conn.pid:
                return [int(conn.pid)]
    return []


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    parts = fields[fields.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of stat (12 and 13 after the command).
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def broker_port(url: str) -> int:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).port or 5672
    except ValueError:
        return 5672


def cpu_groups(
    *,
    workers: dict[str, int],
    database: str | None,
    broker_url: str | None,
    client: bool = True,
) -> dict[str, Callable[[], Iterable[int]]]:
    """What a throughput phase's CPU is spent in: the system's processes and the services."""
    groups: dict[str, Callable[[], Iterable[int]]] = {}
    for name, pid in workers.items():
        if name == "worker":
            # A prefork worker: its consumer process and its pool processes apart.
            groups["worker main"] = functools.partial(list, [pid])
            groups["worker pool"] = functools.partial(_descendants, pid)
        else:
            groups[name] = functools.partial(tree_pids, pid)
    if client:
        groups["client (bench process)"] = lambda: [os.getpid()]
    if database is not None:
        groups["postgresql"] = lambda: postgres_backends(database)
    if broker_url is not None:
        port = broker_port(broker_url)
        groups["rabbitmq"] = lambda: broker_pids(port)
    return groups


def cost_per_run(meter: CpuMeter, runs: int) -> dict[str, Any]:
    """A throughput phase's cost per run: CPU by process group, and the machine's instructions."""
    return {
        "cpu_ms_per_run": cpu_per_run(meter, runs),
        "minstr_per_run": instructions_per_run(meter, runs),
    }


def instructions_per_run(meter: CpuMeter, runs: int) -> float | None:
    """Millions of instructions the whole machine retired per run; None where none were counted."""
    counted = meter.instructions.count
    return None if counted is None or runs <= 0 else round(counted / runs / 1e6, 2)


@functools.cache
def perf_counts_instructions() -> bool:
    """Whether ``perf stat -a`` counts instructions here (it needs root and a VM's counters)."""
    if shutil.which("perf") is None:
        return False
    try:
        done = subprocess.run(
            ["perf", "stat", "-a", "-x,", "-e", "instructions", "true"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and parse_perf_instructions(done.stderr) is not None


def parse_perf_instructions(output: str) -> int | None:
    """The instruction count in ``perf stat -x,`` output; None if it counted none.

    A machine with two kinds of cores counts each kind on a line of its own
    (``cpu_core/instructions/``, ``cpu_atom/instructions/``): they add up.
    """
    counts = [
        int(fields[0])
        for fields in (line.split(",") for line in output.splitlines())
        if len(fields) > 2 and "instructions" in fields[2] and fields[0].isdigit()
    ]
    return sum(counts) if counts else None


class InstructionCounter:
    """Instructions retired by every process on the machine while it runs (``perf stat -a``).

    CPU time measures how long the machine took, and a virtual machine's speed
    drifts by a third from one minute to the next; the instructions a run costs
    do not, so they tell whether a change made the work smaller. ``count`` stays
    None where perf cannot count (not installed, no permission, no counters).
    """

    # perf needs a moment before it counts. The wait is counted too: an idle
    # machine retires about 30 million instructions a second, a thousandth of
    # a throughput phase's count.
    SETTLE_SECONDS = 0.2

    def __init__(self) -> None:
        self.count: int | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if not perf_counts_instructions():
            return
        self._proc = subprocess.Popen(
            ["perf", "stat", "-a", "-x,", "-e", "instructions"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(self.SETTLE_SECONDS)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return
        self.count = parse_perf_instructions(err)


def cpu_per_run(meter: CpuMeter, runs: int) -> dict[str, float]:
    """Milliseconds of CPU per run, by group, and their total."""
    used = meter.seconds()
    figures = {name: round(seconds * 1000 / runs, 2) for name, seconds in used.items()}
    figures["total"] = round(sum(used.values()) * 1000 / runs, 2)
    return figures


class CpuMeter:
    """CPU seconds used by groups of processes while it runs (sampled, so short-lived
    processes count from their first sample)."""

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]], interval: float = 0.5):
        self.groups = groups
        self.interval = interval
        self._first: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, int], float] = {}
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self.instructions = InstructionCounter()

    def sample(self) -> None:
        for name, pids in self.groups.items():
            try:
                members = list(pids())
            except Exception:
                continue
            for pid in members:
                used = _cpu_seconds(pid)
                if used is None:
                    continue
                key = (name, pid)
                # A process first seen after the start was born during the measurement.
                self._first.setdefault(key, used if not self._started else 0.0)
                self._last[key] = used

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> CpuMeter:
        self.instructions.start()
        try:
            self.sample()
            self._started = True
            self._thread.start()
        except BaseException:
            self.instructions.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            self._stop.set()
            self._thread.join(5)
            self.sample()
        finally:
            self.instructions.stop()

    def seconds(self) -> dict[str, float]:
        totals = dict.fromkeys(self.groups, 0.0)
        for (name, pid), last in self._last.items():
            totals[name] += last - self._first.get((name, pid), 0.0)
        return totals
