"""The broker messages the engine sends, built as outbox rows.

Bodies carry ids only; the data stays in the database, where the consumer reads
it under a lock. That keeps messages small and makes a stale or duplicate message
harmless: it names a state that no longer holds.
"""

from __future__ import annotations

from typing import Any

from outbox.message import OutboxMessage

WORKFLOW_TASK = "orchestrator.workflow_task"
START_WORKFLOW = "orchestrator.start_workflow"


def workflow_task(run_id: str, workflow_id: str, queue: str) -> OutboxMessage:
    return OutboxMessage(
        kind="task",
        destination=WORKFLOW_TASK,
        queue=queue,
        aggregate_id=workflow_id,
        body={"run_id": run_id},
        headers={"workflow_id": workflow_id},
    )


def activity_task(
    *,
    run_id: str,
    workflow_id: str,
    activity_id: str,
    activity_type: str,
    attempt: int,
    queue: str,
) -> OutboxMessage:
    return OutboxMessage(
        kind="task",
        destination=activity_type,
        queue=queue,
        aggregate_id=workflow_id,
        body={"run_id": run_id, "activity_id": activity_id, "attempt": attempt},
        headers={"workflow_id": workflow_id},
    )


def start_request(workflow_type: str, workflow_id: str, payload: Any) -> dict[str, Any]:
    """Keyword arguments of the START_WORKFLOW task an app may send over the broker."""
    return {"workflow_type": workflow_type, "workflow_id": workflow_id, "input": payload}
