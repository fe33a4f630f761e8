"""The engine's errors. Every one derives from :class:`OrchestratorError`."""

from __future__ import annotations

from typing import Any

from activities.failure import Failure
from outbox.errors import OrchestratorError


class ConfigurationError(OrchestratorError):
    """The settings or the application wiring are wrong."""


class WorkflowDefinitionError(OrchestratorError, TypeError):
    """A class cannot be a workflow (no ``@workflow.run`` method, bad signature...)."""


class UnknownWorkflowTypeError(OrchestratorError, LookupError):
    """No workflow of that type is registered with this orchestrator."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown workflow type {name!r}; registered: {', '.join(sorted(known)) or 'none'}"
        )
        self.name = name


class UnknownActivityTypeError(OrchestratorError, LookupError):
    """No activity of that name is registered with this orchestrator."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown activity type {name!r}")
        self.name = name


class WorkflowAlreadyStartedError(OrchestratorError):
    """A run with this workflow id exists and the id reuse policy refuses another."""

    def __init__(self, workflow_id: str, run_id: str, status: str) -> None:
        super().__init__(f"workflow id {workflow_id!r} is already used by run {run_id} ({status})")
        self.workflow_id = workflow_id
        self.run_id = run_id
        self.status = status


class WorkflowNotFoundError(OrchestratorError, LookupError):
    """No run matches the workflow id (and run id) given."""


class RunClosedError(OrchestratorError):
    """The operation needs an open run, and this one has closed."""


class NondeterminismError(OrchestratorError):
    """Workflow code issued a command that does not match the recorded history.

    The workflow task that found it is rolled back, so the history stays as it was;
    the error is recorded on the run for an operator to see.
    """

    def __init__(self, *, run_id: str, seq: int, recorded: str, issued: str) -> None:
        super().__init__(
            f"nondeterminism in run {run_id} at history event {seq}: "
            f"history has {recorded} but the workflow code now issues {issued}"
        )
        self.run_id = run_id
        self.seq = seq
        self.recorded = recorded
        self.issued = issued


class NotInWorkflowError(OrchestratorError, RuntimeError):
    """A ``workflow.*`` function was called outside workflow code."""


class ActivityError(OrchestratorError):
    """Raised in workflow code when an activity failed for good (retries exhausted)."""

    def __init__(self, *, activity_type: str, activity_id: str, failure: Failure) -> None:
        super().__init__(f"activity {activity_type} failed: {failure.type}: {failure.message}")
        self.activity_type = activity_type
        self.activity_id = activity_id
        self.failure = failure


class AttemptFailedError(OrchestratorError):
    """Raised by the broker task of an activity attempt that failed, once recorded.

    Its only purpose is the task's state: monitors such as Flower show the
    attempt as failed. The outcome is already in the run's history, and the
    message is acknowledged like that of any finished attempt.
    """

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"{failure.type}: {failure.message}")
        self.failure = failure


class WorkflowFailedError(OrchestratorError):
    """``handle.result()`` of a run that did not complete (failed, compensated...)."""

    def __init__(self, *, workflow_id: str, status: str, failure: Failure | None) -> None:
        cause = f": {failure.type}: {failure.message}" if failure else ""
        super().__init__(f"workflow {workflow_id} ended {status}{cause}")
        self.workflow_id = workflow_id
        self.status = status
        self.failure = failure


class ResultTimeoutError(OrchestratorError, TimeoutError):
    """``handle.result(timeout)`` ran out of time; the run goes on."""


def failure_of(data: Any) -> Failure | None:
    """Load a stored failure, or None."""
    return Failure.from_json(data) if data else None


class InvalidWorkflowIdError(OrchestratorError, ValueError):
    """A workflow id must be a non-empty string of at most 255 characters."""


class UnknownSignalError(OrchestratorError, LookupError):
    """The workflow has no signal or query handler of that name."""


class PendingLimitError(OrchestratorError):
    """A run asked for more pending activities and children than it may have."""


class HistoryLimitError(OrchestratorError):
    """A run's history grew past the hard limit; use ``workflow.continue_as_new``."""


class ChildWorkflowError(OrchestratorError):
    """Raised in a parent when a child run did not complete."""

    def __init__(self, *, workflow_id: str, status: str, failure: Failure | None) -> None:
        cause = f": {failure.type}: {failure.message}" if failure else ""
        super().__init__(f"child workflow {workflow_id} ended {status}{cause}")
        self.workflow_id = workflow_id
        self.status = status
        self.failure = failure


class ContinueAsNew(BaseException):
    """Control-flow signal raised by ``workflow.continue_as_new``; never catch it.

    It derives from BaseException so that ``except Exception`` in workflow code
    does not swallow it.
    """

    def __init__(self, input: Any) -> None:
        super().__init__("continue as new")
        self.input = input


class DeadLetterNotFoundError(OrchestratorError, LookupError):
    """No dead letter has that id."""


class StartInDoubtError(OrchestratorError):
    """A start's commit may or may not have happened: the run may or may not exist.

    Raised to each start of a group whose commit ended in doubt (the
    connection lost, or the committing thread interrupted, after the COMMIT
    was handed over; see :mod:`orchestrator.start_group`), with the cause
    chained; look the run up by its workflow id before starting it again.
    """
