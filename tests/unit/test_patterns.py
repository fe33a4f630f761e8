"""Signals, queries, durable timers, entities, children, heartbeats, termination."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sample_patterns import (
    DAY,
    PATTERN_ACTIVITIES,
    PATTERN_WORKFLOWS,
    Approval,
    Counter,
    Decision,
    FanSpec,
    Greedy,
    Heartbeats,
    Listener,
    LongJob,
    Mailbox,
    Napper,
    PartialFailures,
    Tree,
)
from sample_workflows import CALLS, wait_for

from orchestrator import RunStatus, WorkflowFailedError
from orchestrator.errors import UnknownSignalError
from orchestrator.testing import WorkflowEnvironment

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env() -> Any:
    with WorkflowEnvironment(workflows=PATTERN_WORKFLOWS, activities=PATTERN_ACTIVITIES) as env:
        yield env


def test_a_thirty_day_sleep_finishes_at_once_under_time_skipping(env: Any) -> None:
    started = time.monotonic()
    handle = env.client.start_workflow(Napper, 30.0, workflow_id="nap")
    assert handle.result(timeout=10) == "slept 30 days"
    assert time.monotonic() - started < 2
    types = [e.event.TYPE for e in handle.history()]
    assert types.count("TimerStarted") == 2 and types.count("TimerFired") == 2


def test_signals_sent_before_the_wait_are_kept_in_order(env: Any) -> None:
    handle = env.client.start_workflow(Mailbox, 0.3, workflow_id="mail")
    handle.signal("post", "first")
    handle.signal("post", "second")
    assert handle.result(timeout=10) == ["first", "second"]
    assert "slow" in CALLS.names()


def test_a_decision_completes_the_approval(env: Any) -> None:
    handle = env.client.start_workflow(Approval, "budget", workflow_id="a1")
    handle.signal("decide", Decision(approved=True, by="ann"))
    assert handle.result(timeout=10) == "approved by ann"
    assert handle.query("status") == {"decisions": 1, "reminded": False}
    assert "notify" not in CALLS.names()


def test_escalation_then_give_up_and_compensate(env: Any) -> None:
    handle = env.client.start_workflow(Approval, "laptop", workflow_id="a2")
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=10)
    assert caught.value.status == "COMPENSATED"
    assert caught.value.failure is not None and caught.value.failure.type == "TimeoutError"
    assert CALLS.names() == ["notify", "compensate"]
    assert handle.query("status") == {"decisions": 0, "reminded": True}


def test_signal_after_the_reminder_completes_the_run(env: Any) -> None:
    handle = env.client.start_workflow(Approval, "desk", workflow_id="a3")
    wait_for(lambda: "TimerStarted" in [e.event.TYPE for e in handle.history()])
    env.sleep(DAY + 1)
    wait_for(lambda: "notify" in CALLS.names())
    handle.signal("decide", Decision(approved=True, by="cy"))
    assert handle.result(timeout=10) == "approved by cy"


def test_bad_signals_and_queries_are_refused(env: Any) -> None:
    handle = env.client.start_workflow(Approval, "x", workflow_id="a4")
    assert env.orchestrator.wait_idle(5)  # the run has reached its wait
    before = len(handle.history())
    with pytest.raises(UnknownSignalError, match="has no signal 'nope'"):
        handle.signal("nope")
    with pytest.raises(UnknownSignalError, match="has no query 'nope'"):
        handle.query("nope")
    with pytest.raises(Exception, match="invalid argument for decide"):
        handle.signal("decide", {"approved": "maybe"})
    assert len(handle.history()) == before
    handle.terminate("not needed")


def test_signal_with_start_starts_once_and_delivers(env: Any) -> None:
    first = env.client.signal_with_start(
        Counter, 0, signal="add", signal_arg=5, workflow_id="counter-1"
    )
    second = env.client.signal_with_start(
        Counter, 0, signal="add", signal_arg=2, workflow_id="counter-1"
    )
    assert first.run_id == second.run_id
    wait_for(lambda: first.query("value") == 7)
    first.signal("finish")
    assert first.result(timeout=10) == 7


def test_signal_with_start_runs_no_code_for_a_run_it_does_not_create(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = env.client.signal_with_start(
        Counter, 0, signal="add", signal_arg=1, workflow_id="counter-3"
    )
    engine = env.orchestrator.engine
    decided_for: list[str] = []
    decide = engine._decide

    def spy(session: Any, run: Any, now: Any) -> Any:
        decided_for.append(run.run_id)
        return decide(session, run, now)

    monkeypatch.setattr(engine, "_decide", spy)
    second = env.client.signal_with_start(
        Counter, 0, signal="add", signal_arg=2, workflow_id="counter-3"
    )
    assert second.run_id == first.run_id
    wait_for(lambda: first.query("value") == 3)
    # Workers advanced the open run; nothing decided a would-be second run.
    assert set(decided_for) <= {first.run_id}
    first.signal("finish")
    assert first.result(timeout=10) == 3


def test_entity_continues_as_new_and_keeps_its_state(env: Any) -> None:
    handle = env.client.start_workflow(Counter, 100, workflow_id="counter-2")
    for amount in range(1, 8):
        handle.signal("add", amount)
        wait_for(lambda: env.client.get_handle("counter-2").describe().status is RunStatus.RUNNING)
        handle = env.client.get_handle("counter-2")
    wait_for(lambda: env.client.get_handle("counter-2").query("value") == 128)
    latest = env.client.get_handle("counter-2")
    assert latest.run_id != handle.run_id or latest.describe().history_length < 30
    latest.signal("finish")
    assert latest.result(timeout=10) == 128
    with env.orchestrator.engine.sessions() as session:
        from sqlalchemy import select

        from orchestrator.schema import workflow_runs

        statuses = (
            session.execute(
                select(workflow_runs.c.status).where(workflow_runs.c.workflow_id == "counter-2")
            )
            .scalars()
            .all()
        )
    assert statuses.count("CONTINUED_AS_NEW") >= 2 and statuses.count("COMPLETED") == 1


def test_fan_out_over_children_and_activities(env: Any) -> None:
    handle = env.client.start_workflow(
        Tree, FanSpec(children=20, activities=50), workflow_id="tree"
    )
    assert handle.result(timeout=60) == 1000
    assert CALLS.names().count("notify") == 1000


def test_partial_failures_with_return_exceptions(env: Any) -> None:
    handle = env.client.start_workflow(PartialFailures, workflow_id="partial")
    assert handle.result(timeout=10) == {"ok": 1, "failed": 1}


def test_pending_limit_is_a_clear_error(tmp_path: Any) -> None:
    with WorkflowEnvironment(
        workflows=PATTERN_WORKFLOWS, activities=PATTERN_ACTIVITIES, max_pending=10
    ) as env:
        assert env.client.start_workflow(Greedy, 10, workflow_id="ok").result(timeout=10) == 10
        with pytest.raises(WorkflowFailedError) as caught:
            env.client.start_workflow(Greedy, 11, workflow_id="greedy").result(timeout=10)
        assert caught.value.failure is not None
        assert caught.value.failure.type == "PendingLimitError"
        assert "10 pending" in caught.value.failure.message


def test_history_limit_fails_the_run(tmp_path: Any) -> None:
    with WorkflowEnvironment(
        workflows=PATTERN_WORKFLOWS, activities=PATTERN_ACTIVITIES, max_history_events=8
    ) as env:
        handle = env.client.start_workflow(Listener, workflow_id="big")
        for _ in range(10):
            if handle.describe().status.is_closed:
                break
            handle.signal("ping")
        with pytest.raises(WorkflowFailedError) as caught:
            handle.result(timeout=10)
        assert caught.value.failure is not None
        assert caught.value.failure.type == "HistoryLimitError"


def test_heartbeat_timeout_retries_with_the_last_details(env: Any) -> None:
    handle = env.client.start_workflow(Heartbeats, 1.0, workflow_id="hb")
    assert handle.result(timeout=10) == "resumed from {'progress': 1}"
    attempts = [c["value"] for c in CALLS.seen if c["name"] == "beating"]
    assert attempts == [None, {"progress": 1}]


def test_cancellation_reaches_a_heartbeating_activity(env: Any) -> None:
    handle = env.client.start_workflow(LongJob, 20.0, workflow_id="long")
    from sqlalchemy import select

    from orchestrator.schema import activity_tasks

    def started() -> bool:
        with env.orchestrator.engine.sessions() as session:
            status = session.execute(select(activity_tasks.c.status)).scalar()
        return bool(status == "STARTED")

    wait_for(started)  # the activity is running and heartbeating
    handle.cancel("stop")
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=10)
    assert caught.value.status == "CANCELLED"
    wait_for(lambda: "long_job" in CALLS.names())


def test_terminate_stops_without_running_code(env: Any) -> None:
    handle = env.client.start_workflow(Approval, "t", workflow_id="term")
    handle.terminate("operator said so")
    description = handle.describe()
    assert description.status is RunStatus.TERMINATED
    assert description.failure is not None and "operator said so" in description.failure.message
    assert [e.event.TYPE for e in handle.history()][-1] == "WorkflowTerminated"
    assert env.orchestrator.wait_idle(5)
    assert "compensate" not in CALLS.names()


def test_no_signal_is_lost_when_an_entity_continues_as_new(env: Any) -> None:
    # Signals that reach one workflow task together (here: sent while the run is
    # paused) and that come after the code decided to continue must reach the
    # next run, not vanish with this one.
    handle = env.client.start_workflow(Counter, 0, workflow_id="burst")
    assert env.orchestrator.wait_idle(5)
    handle.pause()
    for _ in range(10):
        handle.signal("add", 1)
    handle.signal("finish")
    handle.resume()
    assert env.client.get_handle("burst").result(timeout=20) == 10
    first = handle.history()
    carried = first[-1].event.carried_signals  # type: ignore[attr-defined]
    assert first[-1].event.TYPE == "WorkflowContinuedAsNew"
    assert [s["name"] for s in carried] == ["add"] * 7 + ["finish"]
