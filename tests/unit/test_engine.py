"""The engine end to end in embedded mode: sagas, retries, timeouts, cancellation."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sample_workflows import (
    ALL_ACTIVITIES,
    ALL_WORKFLOWS,
    CALLS,
    Broken,
    FanOut,
    Job,
    Pipeline,
    Sleeper,
    UsesAsyncioSleep,
    wait_for,
)
from sqlalchemy import event, func, select

from orchestrator import RunClosedError, RunStatus, WorkflowFailedError, workflow
from orchestrator.db import utcnow
from orchestrator.schema import activity_tasks, timers

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def client(make_orchestrator: Any) -> Any:
    return make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES).client()


def types_of(handle: Any) -> list[str]:
    return [event.event.TYPE for event in handle.history()]


def test_saga_completes_and_returns_typed_result(client: Any) -> None:
    handle = client.start_workflow(Pipeline, [Job(name="a"), {"name": "b"}], workflow_id="p1")
    assert handle.result(timeout=10) == ["a:done", "b:done"]
    assert handle.describe().status is RunStatus.COMPLETED
    assert types_of(handle) == [
        "WorkflowStarted",
        "ActivityScheduled",
        "ActivityCompleted",
        "ActivityScheduled",
        "ActivityCompleted",
        "WorkflowCompleted",
    ]
    assert "undo" not in CALLS.names()


def test_failure_compensates_in_reverse_order_and_keeps_the_cause(client: Any) -> None:
    jobs = [Job(name="a"), Job(name="b"), Job(name="c", fail_times=9, non_retryable=True)]
    handle = client.start_workflow(Pipeline, jobs, workflow_id="p2")
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=10)
    assert caught.value.status == "COMPENSATED"
    assert caught.value.failure is not None
    assert "c failed on attempt 1" in caught.value.failure.message
    undone = [c["value"] for c in CALLS.seen if c["name"] == "undo"]
    assert undone == ["c", "b", "a"]
    scheduled = [
        (e.event.activity_type, e.event.is_compensation)  # type: ignore[attr-defined]
        for e in handle.history()
        if e.event.TYPE == "ActivityScheduled"
    ]
    assert scheduled[-3:] == [("undo", True)] * 3
    assert types_of(handle)[-1] == "WorkflowCompensated"
    description = handle.describe()
    assert description.status is RunStatus.COMPENSATED
    assert description.failure is not None and "Flaky" in description.failure.message


def test_retries_wait_in_durable_timers_and_keep_the_idempotency_key(
    make_orchestrator: Any,
) -> None:
    orchestrator = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES)
    handle = orchestrator.client().start_workflow(
        Pipeline, [Job(name="flaky", fail_times=2)], workflow_id="p3"
    )
    assert handle.result(timeout=10) == ["flaky:done"]
    attempts = [c for c in CALLS.seen if c["name"] == "step"]
    assert [c["attempt"] for c in attempts] == [1, 2, 3]
    assert len({c["key"] for c in attempts}) == 1
    with orchestrator.engine.sessions() as session:
        row = session.execute(select(activity_tasks)).mappings().one()
        assert row["status"] == "COMPLETED"
        assert [f["attempt"] for f in row["attempt_failures"]] == [1, 2]
        assert session.execute(select(func.count()).select_from(timers)).scalar() == 0


def test_exhausted_retries_fail_the_activity(client: Any) -> None:
    handle = client.start_workflow(Pipeline, [Job(name="never", fail_times=99)], workflow_id="p4")
    with pytest.raises(WorkflowFailedError):
        handle.result(timeout=10)
    assert [c["attempt"] for c in CALLS.seen if c["name"] == "step"] == [1, 2, 3, 4, 5]
    failed = [e for e in handle.history() if e.event.TYPE == "ActivityFailed"]
    assert len(failed) == 1 and failed[0].event.attempt == 5  # type: ignore[attr-defined]


def test_start_to_close_timeout_retries_and_drops_the_late_outcome(
    make_orchestrator: Any,
) -> None:
    orchestrator = make_orchestrator(
        ALL_WORKFLOWS, ALL_ACTIVITIES, default_start_to_close_seconds=0.3
    )
    handle = orchestrator.client().start_workflow(
        FanOut, [Job(name="hung", sleep_first_attempt=1.0)], workflow_id="t1"
    )
    assert handle.result(timeout=10) == ["hung:done"]
    assert [c["attempt"] for c in CALLS.seen if c["name"] == "step"] == [1, 2]
    # The first attempt finishes after its deadline; its outcome must not count twice.
    assert orchestrator.wait_idle(5)
    completed = [e for e in handle.history() if e.event.TYPE == "ActivityCompleted"]
    assert [e.event.attempt for e in completed] == [2]  # type: ignore[attr-defined]


def test_gather_runs_activities_concurrently(client: Any) -> None:
    jobs = [Job(name=str(i)) for i in range(5)]
    handle = client.start_workflow(FanOut, jobs, workflow_id="f1")
    assert handle.result(timeout=10) == [f"{i}:done" for i in range(5)]
    assert types_of(handle)[1:6] == ["ActivityScheduled"] * 5


def test_cancel_raises_in_the_workflow_which_compensates(client: Any) -> None:
    handle = client.start_workflow(Sleeper, 2.0, workflow_id="c1")
    wait_for(lambda: "slow" in CALLS.names())
    assert handle.cancel("customer changed their mind") is True
    # A second request is either refused as a repeat or, if the run has already
    # finished compensating, as too late; it never counts twice.
    try:
        assert handle.cancel() is False
    except RunClosedError as exc:
        assert "CANCELLED" in str(exc)
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=10)
    assert caught.value.status == "CANCELLED"
    assert "undo" in CALLS.names()
    assert types_of(handle)[-1] == "WorkflowCancelled"


def test_errors_in_workflow_code_fail_the_run(client: Any) -> None:
    handle = client.start_workflow(Broken, workflow_id="b1")
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=10)
    assert caught.value.status == "FAILED"
    assert caught.value.failure is not None
    assert caught.value.failure.type == "ValueError"


def test_asyncio_sleep_is_a_durable_timer(client: Any) -> None:
    handle = client.start_workflow(UsesAsyncioSleep, workflow_id="s1")
    assert handle.result(timeout=10) is None
    types = [e.event.TYPE for e in handle.history()]
    assert types == ["WorkflowStarted", "TimerStarted", "TimerFired", "WorkflowCompleted"]


def _lose_everything_unpublished(orchestrator: Any) -> None:
    # As if each message had reached a consumer that failed and acked it.
    from outbox.schema import outbox_messages

    with orchestrator.engine.sessions() as session:
        session.execute(outbox_messages.update().values(published_at=utcnow()))
        session.commit()


@pytest.mark.parametrize("fast_path", [True, False])
def test_watchdog_resends_lost_messages(make_orchestrator: Any, fast_path: bool) -> None:
    from orchestrator.watchdog import redispatch_stalled

    orchestrator = make_orchestrator(
        ALL_WORKFLOWS,
        ALL_ACTIVITIES,
        publish_after_commit=False,
        relay_grace_seconds=0,
        fast_path=fast_path,
    )
    orchestrator.start_embedded()
    engine, relay = orchestrator.engine, orchestrator.relay()
    handle = orchestrator.client().start_workflow(Pipeline, [Job(name="lost")], workflow_id="w1")
    # The fast path schedules the activity in the start's own transaction;
    # without it, the first message is a workflow task.
    expected = ["ActivityScheduled"] if fast_path else []
    assert [e.event.TYPE for e in handle.history()][1:] == expected
    _lose_everything_unpublished(orchestrator)
    assert redispatch_stalled(engine, stale_after=60) == 0  # not stale yet
    wait_for(lambda: redispatch_stalled(engine, stale_after=0.01) == 1)
    assert relay.run_once() == 1
    if not fast_path:
        wait_for(lambda: len(handle.history()) == 2)  # the workflow task ran
        assert orchestrator.wait_idle(5)
        _lose_everything_unpublished(orchestrator)
        wait_for(lambda: redispatch_stalled(engine, stale_after=0.01) == 1)
        assert relay.run_once() == 1

    def finished() -> bool:
        relay.run_once()  # the rest of the run goes through the relay as usual
        return handle.describe().status.is_closed

    wait_for(finished, timeout=10)
    assert handle.result(timeout=1) == ["lost:done"]
    assert [c["attempt"] for c in CALLS.seen if c["name"] == "step"] == [1]


def test_workflow_code_changing_a_result_does_not_change_the_history(client: Any) -> None:
    from sample_workflows import Mutator

    from orchestrator.definition import definition_of
    from orchestrator.instance import ActivityDefaults, WorkflowInstance

    handle = client.start_workflow(Mutator, workflow_id="m1")
    assert handle.result(timeout=10) == 3
    history = handle.history()
    completed = [e for e in history if e.event.TYPE == "ActivityCompleted"]
    assert completed[0].event.result == {"items": [1, 2]}  # type: ignore[attr-defined]
    fresh = WorkflowInstance(
        definition_of(Mutator),
        run_id=handle.run_id,
        workflow_id="m1",
        defaults=ActivityDefaults(start_to_close=60, max_payload_bytes=2**21),
    )
    assert fresh.advance(history, processed_seq=history[-1].seq) == []


def test_nothing_starts_after_the_workflow_closed(client: Any, make_orchestrator: Any) -> None:
    from sample_workflows import Leaky

    handle = client.start_workflow(Leaky, workflow_id="leak")
    assert handle.result(timeout=10) == "done"
    assert [e.event.TYPE for e in handle.history()] == ["WorkflowStarted", "WorkflowCompleted"]
    assert "step" not in CALLS.names()


def test_a_run_that_closes_with_work_open_cancels_it(make_orchestrator: Any) -> None:
    from sample_workflows import LeavesWorkOpen

    orchestrator = make_orchestrator([LeavesWorkOpen], ALL_ACTIVITIES)
    handle = orchestrator.client().start_workflow(LeavesWorkOpen, workflow_id="open-work")
    assert handle.result(timeout=10) == "done"
    with orchestrator.engine.sessions() as session:
        statuses = (
            session.execute(
                select(activity_tasks.c.status)
                .where(activity_tasks.c.run_id == handle.run_id)
                .order_by(activity_tasks.c.activity_id)
            )
            .scalars()
            .all()
        )
        left = session.execute(
            select(func.count()).select_from(timers).where(timers.c.run_id == handle.run_id)
        ).scalar()
    assert sorted(statuses) == ["CANCELLED", "COMPLETED"]
    assert left == 0


def test_a_start_writes_its_run_row_once_and_one_outbox_insert(make_orchestrator: Any) -> None:
    orchestrator = make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES, lifecycle_events=True)
    client = orchestrator.client()
    here = threading.get_ident()
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.get_ident() == here:  # not the embedded workers' statements
            statements.append(" ".join(statement.split()[:3]))

    event.listen(orchestrator.db, "before_cursor_execute", record)
    try:
        handle = client.start_workflow(Pipeline, [Job(name="a")], workflow_id="once")
    finally:
        event.remove(orchestrator.db, "before_cursor_execute", record)
    assert handle.result(timeout=10) == ["a:done"]
    # The embedded broker marks the message published after the commit, in a
    # transaction of its own.
    writes = [
        s
        for s in statements
        if s.split()[0] in {"INSERT", "UPDATE", "DELETE"} and s != "UPDATE outbox_messages SET"
    ]
    assert sorted(writes) == [
        "INSERT INTO activity_tasks",
        "INSERT INTO outbox_messages",
        "INSERT INTO workflow_events",
        "INSERT INTO workflow_runs",
    ]


def test_terminate_stops_queued_activities_and_appends_nothing_after(client: Any) -> None:
    from sample_workflows import Wide

    handle = client.start_workflow(Wide, 12, workflow_id="wide")
    wait_for(lambda: "slow" in CALLS.names())
    handle.terminate("enough")
    wait_for(lambda: handle.describe().status is RunStatus.TERMINATED)
    # The four embedded worker threads finish what they had; nothing else starts.
    assert client._orchestrator.wait_idle(10)
    history = handle.history()
    assert history[-1].event.TYPE == "WorkflowTerminated"
    assert CALLS.names().count("slow") < 12


def cached_listener(make_orchestrator: Any, workflow_id: str) -> tuple[Any, Any, Any]:
    """An orchestrator, a signalled Listener run, and its instance, open in the cache."""
    from sample_patterns import Listener

    orchestrator = make_orchestrator([Listener], [])
    handle = orchestrator.client().start_workflow(Listener, workflow_id=workflow_id)
    handle.signal("ping")
    assert orchestrator.wait_idle(10)
    cache = orchestrator.engine.cache
    instance = cache.take(handle.run_id)
    assert instance is not None and not instance.loop.is_closed()
    cache.put(instance)
    return orchestrator, handle, instance


def test_closing_the_orchestrator_closes_the_instances_it_cached(make_orchestrator: Any) -> None:
    orchestrator, _handle, instance = cached_listener(make_orchestrator, "cached")
    cache = orchestrator.engine.cache
    orchestrator.close()
    assert len(cache) == 0
    assert instance.loop.is_closed()


def test_an_instance_a_failed_transaction_advanced_is_closed_not_cached(
    make_orchestrator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.engine import Engine

    orchestrator, handle, instance = cached_listener(make_orchestrator, "fails-midway")
    cache = orchestrator.engine.cache

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("recording failed")

    # The decision takes the instance from the cache and advances it; then the
    # transaction fails before its commit.
    monkeypatch.setattr(Engine, "_record", broken)
    with pytest.raises(RuntimeError, match="recording failed"):
        handle.signal("ping")
    assert instance.loop.is_closed()
    assert cache.take(handle.run_id) is None


TEARDOWNS: list[str] = []


@workflow.defn(name="TearsDown")
class TearsDown:
    @workflow.run
    async def run(self) -> None:
        try:
            await workflow.wait_condition(lambda: False)
        finally:
            # Like a saga compensating: the teardown itself waits.
            TEARDOWNS.append("cancelled")
            try:
                await workflow.wait_condition(lambda: False)
            finally:
                TEARDOWNS.append("cancelled again")


def test_closing_an_instance_twice_tears_its_code_down_once(make_orchestrator: Any) -> None:
    from orchestrator.definition import definition_of
    from orchestrator.instance import ActivityDefaults, WorkflowInstance

    handle = make_orchestrator([TearsDown], []).client().start_workflow(TearsDown)
    instance = WorkflowInstance(
        definition_of(TearsDown),
        run_id=handle.run_id,
        workflow_id=handle.workflow_id,
        defaults=ActivityDefaults(start_to_close=60, max_payload_bytes=2**21),
    )
    history = handle.history()
    assert instance.advance(history, processed_seq=history[-1].seq) == []
    TEARDOWNS.clear()
    instance.close()
    instance.close()
    assert TEARDOWNS == ["cancelled"]
