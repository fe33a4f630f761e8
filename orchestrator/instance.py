"""A live workflow object driven by its history.

The instance applies recorded events one at a time, runs the workflow code until
it blocks after each, and collects the commands the code issues. Commands that the
history already records are matched against it (a mismatch is a
:class:`NondeterminismError`); the rest are new and become the next events. The
same instance can be kept between workflow tasks and fed only the new events.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from activities.errors import ApplicationError
from activities.failure import Failure
from activities.payload import from_payload, to_payload
from orchestrator.definition import WorkflowDefinition
from orchestrator.errors import ActivityError, NondeterminismError
from orchestrator.history import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    CancelRequested,
    HistoryEvent,
    RecordedEvent,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
)
from orchestrator.loop import DeterministicLoop


@dataclass(frozen=True)
class WorkflowInfo:
    """What a workflow knows about its own run."""

    workflow_id: str
    run_id: str
    workflow_type: str
    history_length: int
    is_replaying: bool


@dataclass(frozen=True)
class ActivityDefaults:
    """Engine-wide defaults the instance applies to activity commands."""

    start_to_close: float
    max_payload_bytes: int


class WorkflowInstance:
    """One run's workflow object, its deterministic loop and its pending commands."""

    def __init__(
        self,
        defn: WorkflowDefinition,
        *,
        run_id: str,
        workflow_id: str,
        defaults: ActivityDefaults,
    ) -> None:
        self.defn = defn
        self.run_id = run_id
        self.workflow_id = workflow_id
        self.defaults = defaults
        self.loop = DeterministicLoop(self)  # type: ignore[abstract]
        self.applied_seq = 0
        self.is_replaying = False
        self.closed = False
        self.random = random.Random(0)
        self.now = datetime.fromtimestamp(0, UTC)
        self.compensations_run = 0
        self.compensation_failures: list[str] = []
        self.saga_compensated = False
        self._pending: deque[HistoryEvent] = deque()
        self._activities: dict[str, asyncio.Future[Any]] = {}
        self._next_activity = 0
        self._main: asyncio.Task[None] | None = None
        self._obj: Any = None

    # -- used by the workflow API ------------------------------------------------
    def info(self) -> WorkflowInfo:
        return WorkflowInfo(
            workflow_id=self.workflow_id,
            run_id=self.run_id,
            workflow_type=self.defn.name,
            history_length=self.applied_seq,
            is_replaying=self.is_replaying,
        )

    def schedule_activity(self, command: ActivityScheduled) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self._activities[command.activity_id] = future
        self._pending.append(command)
        return future

    def next_activity_id(self) -> str:
        self._next_activity += 1
        return str(self._next_activity)

    # -- driven by the engine -------------------------------------------------------
    def advance(self, events: Sequence[RecordedEvent], processed_seq: int) -> list[HistoryEvent]:
        """Apply ``events`` (the next ones after ``applied_seq``); return new commands.

        Events up to ``processed_seq`` were seen by an earlier workflow task, so the
        code is replaying them (the logger stays quiet).
        """
        for recorded in events:
            if recorded.seq != self.applied_seq + 1:
                raise RuntimeError(
                    f"history gap in run {self.run_id}: expected event "
                    f"{self.applied_seq + 1}, got {recorded.seq}"
                )
            self.is_replaying = recorded.seq <= processed_seq
            self.now = recorded.created_at
            event = recorded.event
            if event.IS_COMMAND:
                self._match(recorded.seq, event)
            else:
                self._apply(event)
                self.loop.run_until_idle(self.now.timestamp())
            self.applied_seq = recorded.seq
        self.is_replaying = False
        return list(self._pending)

    def recorded(self, commands: int) -> None:
        """The engine appended the last ``commands`` new commands to the history."""
        for _ in range(commands):
            event = self._pending.popleft()
            if event.TYPE in _CLOSING:
                self.closed = True
        self.applied_seq += commands

    def close(self) -> None:
        """Drop the instance: cancel what is left so nothing lingers in memory."""
        if self._main is not None and not self._main.done():
            self._main.cancel()
            # The code may raise while being torn down; it is gone anyway.
            with contextlib.suppress(Exception):
                self.loop.run_until_idle(self.now.timestamp())
        self.loop.close()

    # -- internals ------------------------------------------------------------------
    def _match(self, seq: int, recorded: HistoryEvent) -> None:
        if not self._pending:
            raise NondeterminismError(
                run_id=self.run_id, seq=seq, recorded=recorded.describe(), issued="no command"
            )
        issued = self._pending.popleft()
        if not _same_command(recorded, issued):
            raise NondeterminismError(
                run_id=self.run_id, seq=seq, recorded=recorded.describe(), issued=issued.describe()
            )
        if issued.TYPE in _CLOSING:
            self.closed = True

    def _apply(self, event: HistoryEvent) -> None:
        if isinstance(event, WorkflowStarted):
            self.random = random.Random(event.seed)
            self._obj = self.defn.cls()
            self._main = self.loop.create_task(self._run_main(event.input), name="workflow")
        elif isinstance(event, ActivityCompleted):
            future = self._activities.pop(event.activity_id, None)
            if future is not None and not future.done():
                future.set_result(event.result)
        elif isinstance(event, ActivityFailed):
            future = self._activities.pop(event.activity_id, None)
            if future is not None and not future.done():
                failure = Failure.from_json(event.failure)
                error = ActivityError(
                    activity_type=event.activity_type,
                    activity_id=event.activity_id,
                    failure=failure,
                )
                error.__cause__ = ApplicationError(
                    failure.message,
                    type=failure.type,
                    non_retryable=failure.non_retryable,
                    details=failure.details,
                )
                future.set_exception(error)
        elif (
            isinstance(event, CancelRequested) and self._main is not None and not self._main.done()
        ):
            self._main.cancel(event.reason or "cancel requested")

    async def _run_main(self, payload: Any) -> None:
        method = getattr(self._obj, self.defn.run_method)
        limit = self.defaults.max_payload_bytes
        try:
            if self.defn.takes_input:
                result = await method(from_payload(payload, self.defn.input_type))
            else:
                result = await method()
            command: HistoryEvent = WorkflowCompleted(
                result=to_payload(result, self.defn.output_type, limit=limit)
            )
        except asyncio.CancelledError:
            command = WorkflowCancelled(compensations=self.compensations_run)
        except Exception as exc:
            failure = Failure.from_exception(exc)
            if self.saga_compensated and not self.compensation_failures:
                command = WorkflowCompensated(
                    failure=failure.to_json(), compensations=self.compensations_run
                )
            else:
                if self.compensation_failures:
                    failure = failure.model_copy(
                        update={
                            "message": failure.message
                            + "; compensations failed: "
                            + "; ".join(self.compensation_failures)
                        }
                    )
                command = WorkflowFailed(failure=failure.to_json())
        self._pending.append(command)


_CLOSING = {
    WorkflowCompleted.TYPE,
    WorkflowFailed.TYPE,
    WorkflowCompensated.TYPE,
    WorkflowCancelled.TYPE,
}


def _same_command(recorded: HistoryEvent, issued: HistoryEvent) -> bool:
    if recorded.TYPE != issued.TYPE:
        return False
    if isinstance(recorded, ActivityScheduled) and isinstance(issued, ActivityScheduled):
        return (
            recorded.activity_id == issued.activity_id
            and recorded.activity_type == issued.activity_type
            and recorded.is_compensation == issued.is_compensation
        )
    return True


def current_instance() -> WorkflowInstance | None:
    """The instance whose code is running on this thread, if any."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    if isinstance(loop, DeterministicLoop) and isinstance(loop.owner, WorkflowInstance):
        return loop.owner
    return None
