"""Starting runs and looking at them: the Client and its WorkflowHandle."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from activities.errors import InvalidPayloadError, PayloadTooLargeError
from activities.failure import Failure
from activities.payload import from_payload, to_payload, validate_input
from orchestrator.db import as_utc
from orchestrator.errors import (
    InvalidWorkflowIdError,
    ResultTimeoutError,
    WorkflowFailedError,
    WorkflowNotFoundError,
    failure_of,
)
from orchestrator.history import RecordedEvent
from orchestrator.policies import IdConflictPolicy, IdReusePolicy, RunStatus
from orchestrator.runs import load_history
from orchestrator.schema import workflow_runs
from orchestrator.workflow import NO_ARG

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator


@dataclass(frozen=True)
class RunDescription:
    """A run as stored: ids, status, input, result or failure, and progress."""

    workflow_id: str
    run_id: str
    workflow_type: str
    status: RunStatus
    input: Any
    result: Any
    failure: Failure | None
    history_length: int
    cancel_requested: bool
    task_failure: Failure | None
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "workflow_type": self.workflow_type,
            "status": self.status.value,
            "input": self.input,
            "result": self.result,
            "failure": self.failure.to_json() if self.failure else None,
            "history_length": self.history_length,
            "cancel_requested": self.cancel_requested,
            "task_failure": self.task_failure.to_json() if self.task_failure else None,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
        }


class Client:
    """Starts workflows and hands out handles to runs. Get one from ``Orchestrator.client()``."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator

    def start_workflow(
        self,
        workflow: type[Any] | str,
        input: Any = NO_ARG,
        *,
        workflow_id: str | None = None,
        id_reuse_policy: IdReusePolicy = IdReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy: IdConflictPolicy = IdConflictPolicy.FAIL,
        session: Session | None = None,
    ) -> WorkflowHandle:
        """Start a run of ``workflow`` (a class or its type name) with ``input``.

        The input is validated against the run method's type hint before anything
        is written. With ``session``, the run, its first event and its first
        message join that session's transaction: they exist only if the caller
        commits. ``workflow_id`` defaults to a random UUID.
        """
        orchestrator = self._orchestrator
        defn = orchestrator.registry.workflow(workflow)
        limit = orchestrator.settings.max_payload_bytes
        if defn.takes_input:
            if input is NO_ARG:
                raise TypeError(f"workflow {defn.name} takes an input")
            try:
                payload = to_payload(
                    validate_input(input, defn.input_type), defn.input_type, limit=limit
                )
            except InvalidPayloadError as exc:
                raise InvalidPayloadError(
                    f"invalid input for workflow {defn.name}: {exc}"
                ) from None
            except PayloadTooLargeError as exc:
                raise PayloadTooLargeError(exc.size, exc.limit, f"input of {defn.name}") from None
        elif input is not NO_ARG:
            raise TypeError(f"workflow {defn.name} takes no input")
        else:
            payload = None
        workflow_id = _check_workflow_id(str(uuid.uuid4()) if workflow_id is None else workflow_id)
        engine = orchestrator.engine
        if session is not None:
            started = engine.start(
                session,
                defn,
                payload,
                workflow_id=workflow_id,
                id_reuse_policy=id_reuse_policy,
                id_conflict_policy=id_conflict_policy,
            )
        else:
            with engine.sessions() as own:
                started = engine.start(
                    own,
                    defn,
                    payload,
                    workflow_id=workflow_id,
                    id_reuse_policy=id_reuse_policy,
                    id_conflict_policy=id_conflict_policy,
                )
                own.commit()
        return WorkflowHandle(self, workflow_id, started.run_id)

    def get_handle(self, workflow_id: str, run_id: str | None = None) -> WorkflowHandle:
        """A handle to ``run_id``, or to the workflow id's open (else latest) run."""
        with self._orchestrator.engine.sessions() as session:
            query = select(workflow_runs.c.run_id).where(workflow_runs.c.workflow_id == workflow_id)
            if run_id is not None:
                query = query.where(workflow_runs.c.run_id == run_id)
            found = session.execute(
                query.order_by(
                    workflow_runs.c.closed_at.is_(None).desc(), workflow_runs.c.created_at.desc()
                ).limit(1)
            ).scalar()
        if found is None:
            raise WorkflowNotFoundError(f"no run of workflow {workflow_id!r}")
        return WorkflowHandle(self, workflow_id, found)

    # -- used by handles --------------------------------------------------------
    def _describe(self, run_id: str) -> RunDescription:
        with self._orchestrator.engine.sessions() as session:
            row = (
                session.execute(select(workflow_runs).where(workflow_runs.c.run_id == run_id))
                .mappings()
                .first()
            )
        if row is None:
            raise WorkflowNotFoundError(f"no run {run_id}")
        return RunDescription(
            workflow_id=row["workflow_id"],
            run_id=row["run_id"],
            workflow_type=row["workflow_type"],
            status=RunStatus(row["status"]),
            input=row["input"],
            result=row["result"],
            failure=failure_of(row["failure"]),
            history_length=row["history_length"],
            cancel_requested=bool(row["cancel_requested"]),
            task_failure=failure_of(row["task_failure"]),
            created_at=as_utc(row["created_at"]),
            updated_at=as_utc(row["updated_at"]),
            closed_at=as_utc(row["closed_at"]) if row["closed_at"] else None,
        )

    def _history(self, run_id: str) -> list[RecordedEvent]:
        with self._orchestrator.engine.sessions() as session:
            return load_history(session, run_id)


class WorkflowHandle:
    """One run: wait for its result, describe it, read its history, cancel it."""

    def __init__(self, client: Client, workflow_id: str, run_id: str) -> None:
        self._client = client
        self.workflow_id = workflow_id
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"WorkflowHandle(workflow_id={self.workflow_id!r}, run_id={self.run_id!r})"

    def describe(self) -> RunDescription:
        return self._client._describe(self.run_id)

    def history(self) -> list[RecordedEvent]:
        return self._client._history(self.run_id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to close; return its result or raise WorkflowFailedError.

        Raises ResultTimeoutError if it is still open after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        while True:
            description = self.describe()
            if description.status.is_closed:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeoutError(
                    f"workflow {self.workflow_id} is still {description.status.value} "
                    f"after {timeout}s"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)
        if description.status is not RunStatus.COMPLETED:
            raise WorkflowFailedError(
                workflow_id=self.workflow_id,
                status=description.status.value,
                failure=description.failure,
            )
        registry = self._client._orchestrator.registry
        if registry.has_workflow(description.workflow_type):
            return from_payload(
                description.result, registry.workflow(description.workflow_type).output_type
            )
        return description.result

    def cancel(self, reason: str = "") -> bool:
        """Ask the run to cancel (its code gets CancelledError at its next await).

        Returns False if cancellation was already requested; raises RunClosedError
        if the run has closed.
        """
        return self._client._orchestrator.engine.request_cancel(self.run_id, reason)


def _check_workflow_id(workflow_id: str) -> str:
    if not isinstance(workflow_id, str) or not workflow_id.strip() or len(workflow_id) > 255:
        raise InvalidWorkflowIdError(
            f"workflow id must be a non-empty string of at most 255 characters, got {workflow_id!r}"
        )
    return workflow_id
