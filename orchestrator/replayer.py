"""Replay recorded histories against the current workflow code before a deploy.

Export histories with ``orchestrator history ID --json``; ``orchestrator replay
FILE...`` (or :class:`Replayer`) runs each through today's code and reports any
nondeterminism, so a change that would break runs in flight is caught before it
ships.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.errors import NondeterminismError
from orchestrator.history import RecordedEvent, WorkflowStarted, load_event
from orchestrator.instance import ActivityDefaults, WorkflowInstance
from orchestrator.registry import Registry
from orchestrator.settings import Settings
from outbox.errors import OrchestratorError

__all__ = ["ReplayResult", "Replayer"]


class HistoryFormatError(OrchestratorError, ValueError):
    """A file is not an exported history."""


@dataclass(frozen=True)
class ReplayResult:
    """The outcome of replaying one history."""

    workflow_id: str
    run_id: str
    workflow_type: str
    events: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "workflow_type": self.workflow_type,
            "events": self.events,
            "ok": self.ok,
            "error": self.error,
        }


class Replayer:
    """Replays histories against the given workflow classes, in memory."""

    def __init__(self, *, workflows: Iterable[type[Any]], settings: Settings | None = None) -> None:
        settings = settings or Settings()
        self.registry = Registry(workflows, [])
        self._defaults = ActivityDefaults(
            start_to_close=settings.default_start_to_close_seconds,
            max_payload_bytes=settings.max_payload_bytes,
            max_pending=settings.max_pending,
            history_warn_events=settings.history_warn_events,
        )

    def replay(self, document: dict[str, Any]) -> ReplayResult:
        """Replay one exported history (the JSON of ``orchestrator history ID --json``)."""
        events = parse_history(document)
        first = events[0].event
        if not isinstance(first, WorkflowStarted):
            raise HistoryFormatError("a history starts with WorkflowStarted")
        run_id = str(document.get("run_id", ""))
        instance = WorkflowInstance(
            self.registry.workflow(first.workflow_type),
            run_id=run_id,
            workflow_id=first.workflow_id,
            defaults=self._defaults,
        )
        error: str | None = None
        try:
            # Every recorded event counts as seen, so the code replays all of them;
            # commands left over at the end would be new, which is fine.
            instance.advance(events, processed_seq=events[-1].seq)
        except NondeterminismError as exc:
            error = str(exc)
        finally:
            instance.close()
        return ReplayResult(
            workflow_id=first.workflow_id,
            run_id=run_id,
            workflow_type=first.workflow_type,
            events=len(events),
            error=error,
        )

    def replay_file(self, path: Path) -> list[ReplayResult]:
        """Replay a file holding one exported history or a JSON list of them."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise HistoryFormatError(f"{path}: {exc}") from exc
        documents = data if isinstance(data, list) else [data]
        return [self.replay(document) for document in documents]


def parse_history(document: dict[str, Any]) -> list[RecordedEvent]:
    try:
        raw = document["events"]
        events = [
            RecordedEvent(
                seq=int(item["seq"]),
                created_at=datetime.fromisoformat(item["created_at"]),
                event=load_event(item["type"], item["attributes"]),
            )
            for item in raw
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise HistoryFormatError(f"not an exported history: {exc}") from exc
    if not events:
        raise HistoryFormatError("the history has no events")
    return events
