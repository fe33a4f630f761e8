"""Eager dispatch: a worker runs the activity it decides, on a queue it serves, at once."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sample_workflows import (
    ALL_ACTIVITIES,
    ALL_WORKFLOWS,
    CALLS,
    FanOut,
    Job,
    Pipeline,
    step,
)
from sqlalchemy import select

from activities import ActivityInfo, Failure
from orchestrator import workflow
from orchestrator.schema import activity_tasks
from outbox.schema import outbox_messages

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """An eager observer that keeps what it was told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, int, str | None]] = []
        self.flushes = 0

    def started(self, info: ActivityInfo) -> None:
        with self.lock:
            self.events.append(("started", info.activity_id, info.attempt, None))

    def finished(self, info: ActivityInfo, failure: Failure | None, runtime: float) -> None:
        assert runtime >= 0
        with self.lock:
            self.events.append(
                ("finished", info.activity_id, info.attempt, failure.type if failure else None)
            )

    def flush(self) -> None:
        with self.lock:
            self.flushes += 1


def activity_messages(orchestrator: Any, run_id: str) -> list[tuple[str, int]]:
    """(activity_id, attempt) of every activity task message the run's steps wrote."""
    with orchestrator.engine.sessions() as session:
        bodies = session.execute(
            select(outbox_messages.c.body).where(outbox_messages.c.destination == "step")
        ).scalars()
        return sorted(
            (body["activity_id"], body["attempt"]) for body in bodies if body["run_id"] == run_id
        )


def eager_orchestrator(make_orchestrator: Any, **settings: Any) -> tuple[Any, Recorder]:
    orchestrator = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES, **settings)
    recorder = Recorder()
    orchestrator.serve_queues_locally(["workflows", "activities"], recorder)
    return orchestrator, recorder


def test_each_step_after_the_first_runs_without_a_message(make_orchestrator: Any) -> None:
    orchestrator, recorder = eager_orchestrator(make_orchestrator)
    jobs = [Job(name="a"), Job(name="b"), Job(name="c")]
    handle = orchestrator.client().start_workflow(Pipeline, jobs, workflow_id="e1")
    assert handle.result(timeout=10) == ["a:done", "b:done", "c:done"]
    # The start (in the client, which serves nothing) sends the first; the worker
    # that records each outcome runs the next one itself.
    [(first, _)] = activity_messages(orchestrator, handle.run_id)
    eager = [activity_id for kind, activity_id, _, _ in recorder.events if kind == "started"]
    assert first not in eager
    assert len(eager) == 2
    assert [(k, a, n, f) for k, a, n, f in recorder.events if k == "finished"] == [
        ("finished", activity_id, 1, None) for activity_id in eager
    ]
    # Once, when the chain ended: after the commit that closed the run, so the
    # result can be read a moment before it; the chain is over once the
    # embedded worker that ran it is idle.
    assert orchestrator.wait_idle(5)
    assert recorder.flushes == 1
    with orchestrator.engine.sessions() as session:
        rows = session.execute(
            select(activity_tasks.c.status, activity_tasks.c.started_at).where(
                activity_tasks.c.run_id == handle.run_id
            )
        ).all()
    assert [status for status, _ in rows] == ["COMPLETED"] * 3
    assert all(started is not None for _, started in rows)


def test_a_queue_the_worker_does_not_serve_gets_a_message(make_orchestrator: Any) -> None:
    orchestrator = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES)
    recorder = Recorder()
    orchestrator.serve_queues_locally(["workflows", "elsewhere"], recorder)
    handle = orchestrator.client().start_workflow(
        Pipeline, [Job(name="a"), Job(name="b")], workflow_id="e2"
    )
    assert handle.result(timeout=10) == ["a:done", "b:done"]
    assert len(activity_messages(orchestrator, handle.run_id)) == 2
    assert recorder.events == []


def test_eager_max_steps_bounds_a_chain_the_broker_then_takes_over(
    make_orchestrator: Any,
) -> None:
    orchestrator, recorder = eager_orchestrator(make_orchestrator, eager_max_steps=1)
    jobs = [Job(name=name) for name in "abcde"]
    handle = orchestrator.client().start_workflow(Pipeline, jobs, workflow_id="e3")
    assert handle.result(timeout=10) == [f"{name}:done" for name in "abcde"]
    # Message, eager, message, eager, message.
    assert len(activity_messages(orchestrator, handle.run_id)) == 3
    assert len([e for e in recorder.events if e[0] == "started"]) == 2


def test_zero_eager_steps_sends_every_activity_through_the_broker(
    make_orchestrator: Any,
) -> None:
    orchestrator, recorder = eager_orchestrator(make_orchestrator, eager_max_steps=0)
    handle = orchestrator.client().start_workflow(
        Pipeline, [Job(name="a"), Job(name="b"), Job(name="c")], workflow_id="e4"
    )
    handle.result(timeout=10)
    assert len(activity_messages(orchestrator, handle.run_id)) == 3
    assert recorder.events == []


def test_a_fan_out_runs_one_activity_here_and_queues_the_rest(make_orchestrator: Any) -> None:
    orchestrator, recorder = eager_orchestrator(make_orchestrator, fast_path=False)
    jobs = [Job(name=str(i)) for i in range(4)]
    handle = orchestrator.client().start_workflow(FanOut, jobs, workflow_id="e5")
    assert sorted(handle.result(timeout=10)) == sorted(f"{i}:done" for i in range(4))
    # Without the fast path the start sends a workflow task; the worker that runs
    # it schedules all four and keeps one for itself.
    assert len(activity_messages(orchestrator, handle.run_id)) == 3
    assert len([e for e in recorder.events if e[0] == "started"]) == 1


def test_an_eager_attempt_that_fails_is_retried_by_its_policy(make_orchestrator: Any) -> None:
    orchestrator, recorder = eager_orchestrator(make_orchestrator)
    jobs = [Job(name="a"), Job(name="b", fail_times=2)]
    handle = orchestrator.client().start_workflow(Pipeline, jobs, workflow_id="e6")
    assert handle.result(timeout=10) == ["a:done", "b:done"]
    second = [e for e in recorder.events if e[0] == "finished"]
    # The first attempt of "b" ran eagerly and failed; its retries came as messages.
    assert [(attempt, failure) for _, _, attempt, failure in second] == [(1, "Flaky")]
    assert [c["attempt"] for c in CALLS.seen if c["value"] == "b"][-3:] == [1, 2, 3]
    [(_, _), *retries] = activity_messages(orchestrator, handle.run_id)
    assert [attempt for _, attempt in retries] == [2, 3]


def test_an_eager_attempt_whose_worker_died_times_out_and_is_retried(
    make_orchestrator: Any,
) -> None:
    """Claimed in the deciding transaction, never run: its deadline brings the retry."""
    orchestrator, _ = eager_orchestrator(make_orchestrator, default_start_to_close_seconds=0.5)
    runner = orchestrator.engine.activities
    run = runner._run
    lost: list[Any] = []

    def die_before_the_first_eager_attempt(claimed: Any, **flags: Any) -> Any:
        if flags["eager"] and not lost:
            lost.append(claimed)  # as if the process died between commit and run
            return None
        return run(claimed, **flags)

    runner._run = die_before_the_first_eager_attempt
    handle = orchestrator.client().start_workflow(
        Pipeline, [Job(name="a"), Job(name="b")], workflow_id="e7"
    )
    assert handle.result(timeout=10) == ["a:done", "b:done"]
    [claimed] = lost
    with orchestrator.engine.sessions() as session:
        row = (
            session.execute(
                select(activity_tasks).where(
                    activity_tasks.c.run_id == handle.run_id,
                    activity_tasks.c.activity_id == claimed.info.activity_id,
                )
            )
            .mappings()
            .one()
        )
    assert (row["status"], row["attempt"]) == ("COMPLETED", 2)
    [failure] = row["attempt_failures"]
    assert failure["attempt"] == 1
    assert failure["failure"]["type"] == "ActivityTimeout"
    assert "start-to-close" in failure["failure"]["message"]
    assert [c["attempt"] for c in CALLS.seen if c["value"] == "b"][-1:] == [2]


@workflow.defn
class LeavesOneBehind:
    """Starts an activity and returns without waiting for it, in the same step."""

    def __init__(self) -> None:
        self.started = False

    async def orphan(self) -> None:
        self.started = True
        await workflow.execute_activity(step, Job(name="orphan"))

    @workflow.run
    async def run(self) -> str:
        await workflow.execute_activity(step, Job(name="first"))
        left = asyncio.ensure_future(self.orphan())
        await workflow.wait_condition(lambda: self.started)
        left.cancel()
        return "done"


def test_an_activity_scheduled_by_the_closing_step_never_runs(make_orchestrator: Any) -> None:
    orchestrator = make_orchestrator([LeavesOneBehind], ALL_ACTIVITIES)
    recorder = Recorder()
    orchestrator.serve_queues_locally(["workflows", "activities"], recorder)
    handle = orchestrator.client().start_workflow(LeavesOneBehind, workflow_id="e8")
    assert handle.result(timeout=10) == "done"
    types = [e.event.TYPE for e in handle.history()]
    assert types.count("ActivityScheduled") == 2, types
    assert types[-1] == "WorkflowCompleted"
    assert orchestrator.wait_idle(5)
    assert "orphan" not in [c["value"] for c in CALLS.seen]
    assert recorder.events == []
    with orchestrator.engine.sessions() as session:
        statuses = sorted(
            session.execute(
                select(activity_tasks.c.status).where(activity_tasks.c.run_id == handle.run_id)
            ).scalars()
        )
    assert statuses == ["CANCELLED", "COMPLETED"]
