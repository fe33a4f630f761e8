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
CHILD_CLOSED = "orchestrator.child_closed"
RUN_CONTROL = "orchestrator.run_control"


def workflow_task(run_id: str, workflow_id: str, queue: str) -> OutboxMessage:
    return OutboxMessage(
        kind="task",
        destination=WORKFLOW_TASK,
        queue=queue,
        aggregate_id=workflow_id,
        body={"run_id": run_id},
        headers={"workflow_id": workflow_id},
    )


def child_closed(
    *,
    parent_run_id: str,
    child_id: str,
    child_run_id: str,
    child_workflow_id: str,
    status: str,
    result: Any,
    failure: Any,
    queue: str,
) -> OutboxMessage:
    """A child run closed: its outcome, for the parent's history."""
    return OutboxMessage(
        kind="task",
        destination=CHILD_CLOSED,
        queue=queue,
        aggregate_id=child_workflow_id,
        body={
            "parent_run_id": parent_run_id,
            "child_id": child_id,
            "child_run_id": child_run_id,
            "child_workflow_id": child_workflow_id,
            "status": status,
            "result": result,
            "failure": failure,
        },
    )


def run_control(
    run_id: str, workflow_id: str, action: str, reason: str, queue: str
) -> OutboxMessage:
    """Terminate or cancel another run (a parent's close policy acting on its children)."""
    return OutboxMessage(
        kind="task",
        destination=RUN_CONTROL,
        queue=queue,
        aggregate_id=workflow_id,
        body={"run_id": run_id, "action": action, "reason": reason},
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
