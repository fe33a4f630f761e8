"""Percentiles, and progress lines on stderr for anything that takes a while."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

PROGRESS_EVERY = 3.0


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(values: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p90, p99, mean, min and max of durations already in milliseconds."""
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "mean": None}
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
    }


def say(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


class Progress:
    """Prints ``label: done/total`` on stderr at most every few seconds."""

    def __init__(self, label: str, total: int, every: float = PROGRESS_EVERY) -> None:
        self.label = label
        self.total = total
        self.every = every
        self.began = time.monotonic()
        self._last = self.began

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            rate = done / (now - self.began) if now > self.began else 0.0
            suffix = f", {extra}" if extra else ""
            say(
                f"{self.label}: {done}/{self.total} after {now - self.began:.0f}s "
                f"({rate:.0f}/s{suffix})"
            )

    def finish(self, done: int) -> None:
        elapsed = time.monotonic() - self.began
        say(f"{self.label}: {done}/{self.total} in {elapsed:.1f}s")
