"""Deterministic replay: same history, same decisions; changed code is caught."""

from __future__ import annotations

from typing import Any

import pytest
from sample_workflows import (
    ALL_ACTIVITIES,
    ALL_WORKFLOWS,
    Deterministic,
    Job,
    Pipeline,
    slow,
    step,
    wait_for,
)
from sqlalchemy import select

from orchestrator import NondeterminismError, RunStatus, workflow
from orchestrator.definition import definition_of
from orchestrator.instance import ActivityDefaults, WorkflowInstance
from orchestrator.registry import Registry
from orchestrator.runs import load_history
from orchestrator.schema import workflow_events, workflow_runs

pytestmark = pytest.mark.timeout(30)
DEFAULTS = ActivityDefaults(start_to_close=60, max_payload_bytes=2**21)


def replay(cls: type[Any], handle: Any) -> list[Any]:
    """Replay a whole recorded history against ``cls``; return the commands left over."""
    history = handle.history()
    instance = WorkflowInstance(
        definition_of(cls), run_id=handle.run_id, workflow_id=handle.workflow_id, defaults=DEFAULTS
    )
    return instance.advance(history, processed_seq=history[-1].seq)


def test_replaying_a_finished_history_issues_nothing_new(make_orchestrator: Any) -> None:
    client = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES).client()
    handle = client.start_workflow(Deterministic, workflow_id="d1")
    first = handle.result(timeout=10)
    assert replay(Deterministic, handle) == []
    # uuid4, random and now are drawn from the history, so a second run of the
    # code over the same events computes the same values.
    assert first["workflow_id"] == "d1"
    assert first["now"] == handle.history()[2].created_at.isoformat()


def test_cached_and_fresh_instances_agree(make_orchestrator: Any) -> None:
    cached = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES).client()
    handle = cached.start_workflow(Pipeline, [Job(name="a"), Job(name="b")], workflow_id="c1")
    handle.result(timeout=10)
    uncached = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES, instance_cache_size=0).client()
    other = uncached.start_workflow(Pipeline, [Job(name="a"), Job(name="b")], workflow_id="c2")
    other.result(timeout=10)
    assert [e.event.TYPE for e in handle.history()] == [e.event.TYPE for e in other.history()]


@workflow.defn(name="Pipeline")
class ReorderedPipeline:
    """Pipeline after a careless edit: a new step runs before the recorded ones."""

    @workflow.run
    async def run(self, jobs: list[Job]) -> list[str]:
        await workflow.execute_activity(slow, 0.0)
        return [await workflow.execute_activity(step, job) for job in jobs]


@workflow.defn(name="Pipeline")
class CompensationFreePipeline:
    """Pipeline without its saga: same activities, but it stops registering undos."""

    @workflow.run
    async def run(self, jobs: list[Job]) -> list[str]:
        return [await workflow.execute_activity(step, job) for job in jobs]


def test_changed_code_under_a_recorded_history_is_nondeterministic(
    make_orchestrator: Any,
) -> None:
    client = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES).client()
    handle = client.start_workflow(Pipeline, [Job(name="a"), Job(name="b")], workflow_id="n1")
    handle.result(timeout=10)
    # Dropping the saga does not change the commands: still deterministic.
    assert replay(CompensationFreePipeline, handle) == []
    with pytest.raises(NondeterminismError) as caught:
        replay(ReorderedPipeline, handle)
    message = str(caught.value)
    assert caught.value.seq == 2
    assert "history has ActivityScheduled(activity step, id 1)" in message
    assert "now issues ActivityScheduled(activity slow, id 1)" in message
    assert caught.value.recorded != caught.value.issued


def test_nondeterminism_fails_the_task_not_the_run(make_orchestrator: Any) -> None:
    original = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES)
    handle = original.client().start_workflow(
        Pipeline, [Job(name="a"), Job(name="slowpoke", sleep_first_attempt=2.0)], workflow_id="n2"
    )
    # While the second step runs, a worker with changed code replays the history.
    wait_for(lambda: len(handle.history()) >= 4)
    before = [e.to_json() for e in handle.history()]
    changed = make_orchestrator([ReorderedPipeline], ALL_ACTIVITIES)
    with changed.engine.sessions() as session:
        # Mark the history unprocessed so the changed worker has to replay it.
        session.execute(
            workflow_runs.update()
            .where(workflow_runs.c.run_id == handle.run_id)
            .values(processed_seq=0)
        )
        session.commit()
    changed.engine.workflow_task(handle.run_id)
    description = handle.describe()
    assert description.status is RunStatus.RUNNING
    assert description.task_failure is not None
    assert description.task_failure.type == "NondeterminismError"
    assert "history event 2" in description.task_failure.message
    assert [e.to_json() for e in handle.history()] == before
    # The run is intact: the original code carries it to the end.
    assert handle.result(timeout=10) == ["a:done", "slowpoke:done"]
    assert handle.describe().task_failure is None


def test_history_is_append_only_with_contiguous_seqs(make_orchestrator: Any) -> None:
    orchestrator = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES)
    handle = orchestrator.client().start_workflow(
        Pipeline, [Job(name="a"), Job(name="b", fail_times=1)], workflow_id="h1"
    )
    handle.result(timeout=10)
    with orchestrator.engine.sessions() as session:
        seqs = (
            session.execute(
                select(workflow_events.c.seq)
                .where(workflow_events.c.run_id == handle.run_id)
                .order_by(workflow_events.c.seq)
            )
            .scalars()
            .all()
        )
        assert seqs == list(range(1, len(seqs) + 1))
        assert [e.seq for e in load_history(session, handle.run_id)] == seqs


def test_registry_rejects_duplicate_names() -> None:
    from orchestrator import ConfigurationError

    with pytest.raises(ConfigurationError):
        Registry([Pipeline, ReorderedPipeline], [])
