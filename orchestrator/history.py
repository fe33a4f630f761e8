"""The events of a run's history: frozen pydantic models under stable type names.

The type name is stored beside the data, so renaming a class never breaks an old
history. Command events are the ones workflow code causes (its decisions); the
others report what happened outside it (a result, a cancellation request).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class HistoryEvent(BaseModel):
    """Base of every history event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    TYPE: ClassVar[str] = ""
    IS_COMMAND: ClassVar[bool] = False

    def describe(self) -> str:
        """A one-line form used in nondeterminism reports and timelines."""
        return self.TYPE


class WorkflowStarted(HistoryEvent):
    TYPE: ClassVar[str] = "WorkflowStarted"
    workflow_type: str
    workflow_id: str
    input: Any = None
    seed: int


class ActivityScheduled(HistoryEvent):
    TYPE: ClassVar[str] = "ActivityScheduled"
    IS_COMMAND: ClassVar[bool] = True
    activity_id: str
    activity_type: str
    task_queue: str
    input: Any = None
    retry_policy: dict[str, Any]
    start_to_close: float
    schedule_to_close: float | None = None
    heartbeat_timeout: float | None = None
    is_compensation: bool = False

    def describe(self) -> str:
        kind = "compensation" if self.is_compensation else "activity"
        return f"{self.TYPE}({kind} {self.activity_type}, id {self.activity_id})"


class ActivityCompleted(HistoryEvent):
    TYPE: ClassVar[str] = "ActivityCompleted"
    activity_id: str
    activity_type: str
    attempt: int
    result: Any = None


class ActivityDeadLettered(HistoryEvent):
    """A compensation exhausted its retries; it waits for an operator, the run is blocked."""

    TYPE: ClassVar[str] = "ActivityDeadLettered"
    activity_id: str
    activity_type: str
    attempt: int
    dead_letter_id: str
    failure: dict[str, Any]


class ActivityFailed(HistoryEvent):
    TYPE: ClassVar[str] = "ActivityFailed"
    activity_id: str
    activity_type: str
    attempt: int
    failure: dict[str, Any]


class CancelRequested(HistoryEvent):
    TYPE: ClassVar[str] = "CancelRequested"
    reason: str = ""


class TimerStarted(HistoryEvent):
    """A durable timer (``workflow.sleep``, ``asyncio.sleep``, a wait's timeout)."""

    TYPE: ClassVar[str] = "TimerStarted"
    IS_COMMAND: ClassVar[bool] = True
    timer_id: str
    seconds: float

    def describe(self) -> str:
        return f"{self.TYPE}(timer {self.timer_id}, {self.seconds:g}s)"


class TimerCancelled(HistoryEvent):
    TYPE: ClassVar[str] = "TimerCancelled"
    IS_COMMAND: ClassVar[bool] = True
    timer_id: str

    def describe(self) -> str:
        return f"{self.TYPE}(timer {self.timer_id})"


class TimerFired(HistoryEvent):
    TYPE: ClassVar[str] = "TimerFired"
    timer_id: str


class SignalReceived(HistoryEvent):
    TYPE: ClassVar[str] = "SignalReceived"
    name: str
    input: Any = None


class MarkerRecorded(HistoryEvent):
    """A patch marker: the run took the new branch of ``workflow.patched(patch_id)``."""

    TYPE: ClassVar[str] = "MarkerRecorded"
    IS_COMMAND: ClassVar[bool] = True
    patch_id: str

    def describe(self) -> str:
        return f"{self.TYPE}(patch {self.patch_id})"


class EventEmitted(HistoryEvent):
    """``workflow.emit``: a domain event, published when this transition commits."""

    TYPE: ClassVar[str] = "EventEmitted"
    IS_COMMAND: ClassVar[bool] = True
    event_type: str
    envelope: dict[str, Any]

    def describe(self) -> str:
        return f"{self.TYPE}({self.event_type})"


class ChildWorkflowScheduled(HistoryEvent):
    TYPE: ClassVar[str] = "ChildWorkflowScheduled"
    IS_COMMAND: ClassVar[bool] = True
    child_id: str
    workflow_type: str
    workflow_id: str
    input: Any = None
    parent_close_policy: str

    def describe(self) -> str:
        return f"{self.TYPE}(child {self.workflow_type}, id {self.child_id})"


class ChildWorkflowClosed(HistoryEvent):
    TYPE: ClassVar[str] = "ChildWorkflowClosed"
    child_id: str
    workflow_id: str
    run_id: str | None = None
    status: str
    result: Any = None
    failure: dict[str, Any] | None = None


class WorkflowCompleted(HistoryEvent):
    TYPE: ClassVar[str] = "WorkflowCompleted"
    IS_COMMAND: ClassVar[bool] = True
    result: Any = None


class WorkflowFailed(HistoryEvent):
    TYPE: ClassVar[str] = "WorkflowFailed"
    IS_COMMAND: ClassVar[bool] = True
    failure: dict[str, Any]


class WorkflowCompensated(HistoryEvent):
    """The workflow failed and its saga ran every compensation; keeps the cause."""

    TYPE: ClassVar[str] = "WorkflowCompensated"
    IS_COMMAND: ClassVar[bool] = True
    failure: dict[str, Any]
    compensations: int


class WorkflowCancelled(HistoryEvent):
    TYPE: ClassVar[str] = "WorkflowCancelled"
    IS_COMMAND: ClassVar[bool] = True
    compensations: int = 0


class WorkflowContinuedAsNew(HistoryEvent):
    """The run closed and handed over to a fresh run of the same workflow id."""

    TYPE: ClassVar[str] = "WorkflowContinuedAsNew"
    IS_COMMAND: ClassVar[bool] = True
    input: Any = None
    new_run_id: str | None = None
    # Signals that arrived after the code decided to continue: they go to the
    # new run, in order, instead of being lost with this one.
    carried_signals: list[dict[str, Any]] = []


class WorkflowTerminated(HistoryEvent):
    """Stopped from outside, without running any more workflow code."""

    TYPE: ClassVar[str] = "WorkflowTerminated"
    reason: str = ""


EVENT_TYPES: dict[str, type[HistoryEvent]] = {
    cls.TYPE: cls
    for cls in (
        WorkflowStarted,
        ActivityScheduled,
        ActivityCompleted,
        ActivityFailed,
        ActivityDeadLettered,
        CancelRequested,
        WorkflowCompleted,
        WorkflowFailed,
        WorkflowCompensated,
        WorkflowCancelled,
        TimerStarted,
        TimerCancelled,
        TimerFired,
        SignalReceived,
        MarkerRecorded,
        EventEmitted,
        ChildWorkflowScheduled,
        ChildWorkflowClosed,
        WorkflowContinuedAsNew,
        WorkflowTerminated,
    )
}

CLOSING_EVENTS: dict[str, str] = {
    WorkflowCompleted.TYPE: "COMPLETED",
    WorkflowFailed.TYPE: "FAILED",
    WorkflowCompensated.TYPE: "COMPENSATED",
    WorkflowCancelled.TYPE: "CANCELLED",
    WorkflowContinuedAsNew.TYPE: "CONTINUED_AS_NEW",
    WorkflowTerminated.TYPE: "TERMINATED",
}


class RecordedEvent(BaseModel):
    """One history row: its position, time and event."""

    model_config = ConfigDict(frozen=True)

    seq: int
    created_at: datetime
    event: HistoryEvent

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "type": self.event.TYPE,
            "created_at": self.created_at.isoformat(),
            "attributes": self.event.model_dump(mode="json"),
        }


def load_event(event_type: str, attributes: dict[str, Any]) -> HistoryEvent:
    """Rebuild an event from its stored type name and attributes."""
    try:
        cls = EVENT_TYPES[event_type]
    except KeyError:
        raise ValueError(f"unknown history event type {event_type!r}") from None
    return cls.model_validate(attributes)
