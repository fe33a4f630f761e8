"""What every scenario gets: the options, the shared services, a place for logs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.infra import Postgres, Rabbit


class BenchError(Exception):
    """A scenario could not be measured (its processes died, a run failed, a timeout)."""


@dataclass
class Options:
    n: int = 500
    sequential: int = 200
    workers: int = 2
    client_threads: int = 8
    warmup: int = 20
    timeout: float = 300.0
    loglevel: str = "WARNING"
    only: tuple[str, ...] = ("ours", "celery", "dbos")
    scale: bool = False
    long_steps: int = 5000
    relay_seconds: float = 30.0
    relay_rate: float | None = None
    open_runs: int = 100_000
    signalled: int = 3_000
    profile_dir: Path | None = None
    rounds: int = 1
    paired: int = 0


@dataclass
class Context:
    options: Options
    postgres: Postgres
    rabbit: Rabbit
    broker_url: str
    log_dir: Path
    started: float = field(default_factory=time.monotonic)
    # Figures one scenario leaves for another (the relay scenario's load follows throughput).
    shared: dict[str, Any] = field(default_factory=dict)
