"""Lifecycle events the engine emits for every run, as domain events.

Subscribers (audit, analytics, notifications) can follow runs without touching
workflow code: ``@subscriber("workflow.*", group="audit")``. Each is written to
the outbox in the transaction that makes it true, with an id derived from the
run, so a redelivery is recognisably the same event.
"""

from __future__ import annotations

from events import DomainEvent, EventEnvelope, event_message, event_type
from outbox.message import OutboxMessage

__all__ = [
    "CompensationDeadLettered",
    "WorkflowClosed",
    "WorkflowRunStarted",
    "lifecycle_message",
]


@event_type("workflow.started", version=1)
class WorkflowRunStarted(DomainEvent):
    workflow_id: str
    run_id: str
    workflow_type: str


@event_type("workflow.closed", version=1)
class WorkflowClosed(DomainEvent):
    """A run ended; ``status`` says how (COMPLETED, COMPENSATED, FAILED, ...)."""

    workflow_id: str
    run_id: str
    workflow_type: str
    status: str
    failure_type: str | None = None
    failure_message: str | None = None


@event_type("workflow.compensation_dead_lettered", version=1)
class CompensationDeadLettered(DomainEvent):
    workflow_id: str
    run_id: str
    workflow_type: str
    activity_type: str
    dead_letter_id: str


def lifecycle_message(
    event: WorkflowRunStarted | WorkflowClosed | CompensationDeadLettered, *, suffix: str
) -> OutboxMessage:
    """The outbox message of a lifecycle event; its id is ``<run id>:<suffix>``."""
    envelope = EventEnvelope.wrap(
        event,
        correlation_id=event.workflow_id,
        causation_id=event.run_id,
        producer="orchestrator",
        event_id=f"{event.run_id}:{suffix}",
    )
    return event_message(envelope)
