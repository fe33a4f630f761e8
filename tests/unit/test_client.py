"""Starting runs: validation, id policies, joining the caller's transaction, duplicates."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
from sample_workflows import ALL_ACTIVITIES, ALL_WORKFLOWS, CALLS, Deterministic, Job, Pipeline
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from activities import InvalidPayloadError, PayloadTooLargeError
from orchestrator import (
    IdConflictPolicy,
    IdReusePolicy,
    InvalidWorkflowIdError,
    RunClosedError,
    RunStatus,
    UnknownWorkflowTypeError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)
from orchestrator.schema import activity_tasks, workflow_events, workflow_runs
from outbox.schema import outbox_messages

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def orchestrator(make_orchestrator: Any) -> Any:
    return make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES)


def counts(orchestrator: Any) -> tuple[int, ...]:
    with orchestrator.engine.sessions() as session:
        return tuple(
            session.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (workflow_runs, workflow_events, outbox_messages)
        )


@pytest.mark.parametrize(
    ("workflow", "value", "error"),
    [
        ("NoSuchWorkflow", [], UnknownWorkflowTypeError),
        (Pipeline, [{"name": 3}], InvalidPayloadError),
        (Pipeline, "not a list", InvalidPayloadError),
        (Pipeline, [{"name": "x" * (3 * 1024 * 1024)}], PayloadTooLargeError),
    ],
)
def test_bad_starts_raise_clear_errors_and_write_nothing(
    orchestrator: Any, workflow: Any, value: Any, error: type[Exception]
) -> None:
    client = orchestrator.client()
    before = counts(orchestrator)
    with pytest.raises(error) as caught:
        client.start_workflow(workflow, value, workflow_id="bad")
    assert str(caught.value)
    assert counts(orchestrator) == before == (0, 0, 0)


def test_unknown_type_error_lists_the_registered_ones(orchestrator: Any) -> None:
    with pytest.raises(UnknownWorkflowTypeError, match=r"registered: .*Pipeline"):
        orchestrator.client().start_workflow("Nope", [])


@pytest.mark.parametrize("workflow_id", ["", "   ", "x" * 256])
def test_bad_workflow_ids_are_refused(orchestrator: Any, workflow_id: str) -> None:
    with pytest.raises(InvalidWorkflowIdError):
        orchestrator.client().start_workflow(Pipeline, [], workflow_id=workflow_id)
    assert counts(orchestrator) == (0, 0, 0)


def test_duplicate_open_workflow_id_fails_or_returns_the_open_run(orchestrator: Any) -> None:
    client = orchestrator.client()
    first = client.start_workflow(
        Pipeline, [Job(name="slow", sleep_first_attempt=1.0)], workflow_id="dup"
    )
    before = counts(orchestrator)
    with pytest.raises(WorkflowAlreadyStartedError) as caught:
        client.start_workflow(Pipeline, [], workflow_id="dup")
    assert caught.value.run_id == first.run_id
    assert counts(orchestrator)[0] == before[0]
    same = client.start_workflow(
        Pipeline, [], workflow_id="dup", id_conflict_policy=IdConflictPolicy.USE_EXISTING
    )
    assert same.run_id == first.run_id
    first.result(timeout=10)


def test_id_reuse_policies_after_the_run_closed(orchestrator: Any) -> None:
    client = orchestrator.client()
    done = client.start_workflow(Pipeline, [Job(name="a")], workflow_id="reuse")
    done.result(timeout=10)
    with pytest.raises(WorkflowAlreadyStartedError):
        client.start_workflow(
            Pipeline, [], workflow_id="reuse", id_reuse_policy=IdReusePolicy.REJECT_DUPLICATE
        )
    with pytest.raises(WorkflowAlreadyStartedError):
        client.start_workflow(
            Pipeline,
            [],
            workflow_id="reuse",
            id_reuse_policy=IdReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        )
    again = client.start_workflow(Pipeline, [], workflow_id="reuse")
    assert again.run_id != done.run_id
    assert again.result(timeout=10) == []
    assert client.get_handle("reuse").run_id == again.run_id


def test_start_joins_the_callers_transaction(orchestrator: Any) -> None:
    client = orchestrator.client()
    with Session(orchestrator.db) as session:
        handle = client.start_workflow(
            Pipeline, [Job(name="tx")], workflow_id="tx", session=session
        )
        session.rollback()
    assert counts(orchestrator) == (0, 0, 0)
    with pytest.raises(WorkflowNotFoundError):
        handle.describe()
    assert orchestrator.wait_idle(5)
    assert "step" not in CALLS.names()
    with Session(orchestrator.db) as session:
        handle = client.start_workflow(
            Pipeline, [Job(name="tx")], workflow_id="tx", session=session
        )
        session.commit()
    assert handle.result(timeout=10) == ["tx:done"]


def test_duplicate_messages_change_nothing(orchestrator: Any) -> None:
    handle = orchestrator.client().start_workflow(Deterministic, workflow_id="twice")
    result = handle.result(timeout=10)
    history = [e.to_json() for e in handle.history()]
    engine = orchestrator.engine
    # A redelivered workflow task and a redelivered activity task of a finished attempt.
    engine.workflow_task(handle.run_id)
    engine.activity_task(handle.run_id, "1", 1)
    engine.activity_task(handle.run_id, "1", 2)
    assert [e.to_json() for e in handle.history()] == history
    assert handle.result(timeout=1) == result
    assert [c["name"] for c in CALLS.seen].count("step") >= 1
    with orchestrator.engine.sessions() as session:
        row = session.execute(select(activity_tasks)).mappings().one()
        assert (row["attempt"], row["status"]) == (1, "COMPLETED")


def test_cancel_of_a_closed_run_is_refused(orchestrator: Any) -> None:
    handle = orchestrator.client().start_workflow(Pipeline, [], workflow_id="closed")
    handle.result(timeout=10)
    assert handle.describe().status is RunStatus.COMPLETED
    with pytest.raises(RunClosedError):
        handle.cancel()


def test_result_polls_soon_then_less_and_less_often(
    orchestrator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import client as client_module

    handle = orchestrator.client().start_workflow(
        Pipeline, [Job(name="slow", sleep_first_attempt=1.0)], workflow_id="polled"
    )
    pauses: list[float] = []
    sleep = client_module.time.sleep

    polling = threading.get_ident()

    def recorded(seconds: float) -> None:
        if threading.get_ident() == polling:  # not the activity's own sleep
            pauses.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(client_module.time, "sleep", recorded)
    handle.result(timeout=10)
    # A quick run is seen within milliseconds; a slow one is polled ever less,
    # at most four times a second.
    assert pauses[:3] == pytest.approx([0.002, 0.003, 0.0045])
    assert all(later >= earlier for earlier, later in itertools.pairwise(pauses))
    assert max(pauses) == 0.25
