"""What the command line prints: tables, run descriptions, timelines, errors."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from orchestrator.client import RunDescription
from orchestrator.history import RecordedEvent
from outbox.errors import OrchestratorError


class CliError(OrchestratorError):
    """A mistake on the command line."""


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def print_description(out: TextIO, run: RunDescription) -> None:
    rows = [
        ("workflow id", run.workflow_id),
        ("run id", run.run_id),
        ("type", run.workflow_type),
        (
            "status",
            run.status.value
            + (" (cancel requested)" if run.cancel_requested else "")
            + (" (paused)" if run.paused else ""),
        ),
        ("started", _time(run.created_at)),
        ("closed", _time(run.closed_at)),
        ("events", str(run.history_length)),
    ]
    if run.result is not None:
        rows.append(("result", json.dumps(run.result)))
    if run.failure is not None:
        rows.append(("failure", f"{run.failure.type}: {run.failure.message}"))
    if run.task_failure is not None:
        rows.append(("task failure", f"{run.task_failure.type}: {run.task_failure.message}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.write(f"{name.ljust(width)}  {value}\n")


def event_summary(event: RecordedEvent) -> str:
    attributes = event.event.model_dump(mode="json")
    detail = attributes.get("activity_type") or ""
    if attributes.get("is_compensation"):
        detail += " (compensation)"
    if "attempt" in attributes and event.event.TYPE != "ActivityScheduled":
        detail += f" attempt {attributes['attempt']}"
    failure = attributes.get("failure")
    if isinstance(failure, dict):
        detail += f"  {failure.get('type')}: {failure.get('message')}"
    return detail.strip()


def print_history(out: TextIO, history: Sequence[RecordedEvent]) -> None:
    if not history:
        out.write("(no events)\n")
        return
    start = history[0].created_at
    for event in history:
        offset = (event.created_at - start).total_seconds() * 1000
        out.write(
            f"{event.seq:>4}  +{offset:>8.0f} ms  {event.event.TYPE:<20} {event_summary(event)}\n"
        )


def emit(out: TextIO, args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    out.write(json.dumps(data) + "\n" if args.json else text)


def parse_since(text: str | None) -> datetime | None:
    """An ISO time, or an age such as ``30m``, ``2h``, ``7d`` (before now)."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"--since {text!r} is neither an ISO time nor an age like 2h") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def table(out: TextIO, rows: list[dict[str, Any]], columns: list[str], empty: str) -> None:
    if not rows:
        out.write(empty + "\n")
        return
    cells = [["-" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    header = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
    out.write(header.rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
