"""Each package's public surface is what its __all__ says, and nothing slips in unnoticed."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "orchestrator": [
        "ActivityError",
        "Client",
        "ConfigurationError",
        "IdConflictPolicy",
        "IdReusePolicy",
        "InvalidWorkflowIdError",
        "NondeterminismError",
        "NotInWorkflowError",
        "OrchestratorError",
        "Orchestrator",
        "RecordedEvent",
        "ResultTimeoutError",
        "RunClosedError",
        "RunDescription",
        "RunStatus",
        "Settings",
        "StartInDoubtError",
        "UnknownActivityTypeError",
        "UnknownWorkflowTypeError",
        "WorkflowAlreadyStartedError",
        "WorkflowDefinitionError",
        "WorkflowFailedError",
        "WorkflowHandle",
        "WorkflowNotFoundError",
        "workflow",
    ],
    "orchestrator.workflow": [
        "ChildHandle",
        "ParentClosePolicy",
        "Saga",
        "WorkflowInfo",
        "continue_as_new",
        "defn",
        "deprecate_patch",
        "emit",
        "execute_activity",
        "execute_child",
        "in_workflow",
        "info",
        "logger",
        "now",
        "patched",
        "query",
        "random",
        "run",
        "signal",
        "sleep",
        "start_child",
        "uuid4",
        "wait_condition",
    ],
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_public_names_are_pinned(module: str) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == sorted(EXPECTED[module])
    for name in imported.__all__:
        assert hasattr(imported, name), name


def test_every_error_derives_from_the_one_root() -> None:
    import activities
    import orchestrator
    import outbox

    root = orchestrator.OrchestratorError
    assert root is outbox.OrchestratorError
    for package in (orchestrator, activities, outbox):
        for name in package.__all__:
            value = getattr(package, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                assert issubclass(value, root), f"{package.__name__}.{name}"


def test_errors_survive_pickling() -> None:
    import pickle

    from activities import Failure
    from orchestrator import (
        NondeterminismError,
        UnknownWorkflowTypeError,
        WorkflowAlreadyStartedError,
        WorkflowFailedError,
    )

    errors = [
        UnknownWorkflowTypeError("X", ["A"]),
        WorkflowAlreadyStartedError("w", "r", "RUNNING"),
        NondeterminismError(run_id="r", seq=2, recorded="a", issued="b"),
        WorkflowFailedError(
            workflow_id="w", status="FAILED", failure=Failure(type="T", message="m")
        ),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.__dict__ == error.__dict__
