"""Timers, signals, queries, children, cancellation and entities through real processes.

The workflows of ``pattern_app`` run in worker and scheduler subprocesses on
PostgreSQL and RabbitMQ, on queues of their own. One fleet (a workflow worker,
an activity worker, a scheduler and a relay) serves the module; tests that kill
processes with SIGKILL replace them, and the fleet carries on with the
replacements. The test's own client has the fast path off, so every signal,
cancellation and start is acted on by a worker, not by the client.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
import uuid
from collections import Counter as Tally
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import harness
import pattern_app
import pytest
from pattern_app import (
    ACTIVITY_QUEUE,
    APP_REF,
    WORKFLOW_QUEUE,
    Approval,
    Booking,
    Counter,
    Decision,
    FanSpec,
    Sleeper,
    Tree,
    effects,
)
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from orchestrator import Orchestrator, RunStatus, Settings, WorkflowFailedError, WorkflowHandle
from orchestrator.history import (
    ActivityCompleted,
    ActivityScheduled,
    ChildWorkflowClosed,
    ChildWorkflowScheduled,
    RecordedEvent,
    SignalReceived,
    TimerFired,
    TimerStarted,
    WorkflowCancelled,
)
from orchestrator.runs import load_history
from orchestrator.schema import activity_tasks, outbox_messages, timers, workflow_runs

# Generous: the first test's setup may wait for another session's lock on the services.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

QUEUES = (WORKFLOW_QUEUE, ACTIVITY_QUEUE)
ENV = {"ORCHESTRATOR_WORKFLOW_QUEUE": WORKFLOW_QUEUE}
RESULT_TIMEOUT = 45.0


# ------------------------------------------------------------------------------- fleet
class Fleet:
    """The pattern application's processes; any of them can be killed and replaced."""

    def __init__(self, group: harness.ProcessGroup) -> None:
        self.group = group
        self.workflow_worker: harness.Proc | None = None
        self.activity_worker: harness.Proc | None = None
        self.scheduler: harness.Proc | None = None
        self.relay: harness.Proc | None = None
        self._generation = 0

    def _name(self, role: str) -> str:
        return f"pattern-{role}-{self._generation}"

    def _worker(self, role: str, queue: str, concurrency: int) -> harness.Proc:
        name = self._name(role)
        return self.group.start(
            name,
            "--app",
            APP_REF,
            "worker",
            "--queues",
            queue,
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
            env=ENV,
        )

    def start(self, *, ready: bool = True) -> None:
        """Start whichever of the four processes is not running."""
        self._generation += 1
        if self.scheduler is None or not self.scheduler.alive:
            self.scheduler = self.group.start(
                self._name("scheduler"),
                "--app",
                APP_REF,
                "scheduler",
                env={**ENV, "ORCHESTRATOR_SCHEDULER_POLL_SECONDS": "0.2"},
            )
        if self.relay is None or not self.relay.alive:
            self.relay = self.group.start(
                self._name("relay"),
                "--app",
                APP_REF,
                "relay",
                env={
                    **ENV,
                    "ORCHESTRATOR_RELAY_POLL_SECONDS": "0.5",
                    "ORCHESTRATOR_RELAY_GRACE_SECONDS": "1",
                },
            )
        if self.workflow_worker is None or not self.workflow_worker.alive:
            self.workflow_worker = self._worker("workflow-worker", WORKFLOW_QUEUE, 2)
        if self.activity_worker is None or not self.activity_worker.alive:
            self.activity_worker = self._worker("activity-worker", ACTIVITY_QUEUE, 2)
        if ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        for proc in (self.workflow_worker, self.activity_worker):
            assert proc is not None
            proc.wait_for_log(r" ready\.", timeout=60)

    def kill9(self, *procs: harness.Proc | None) -> None:
        for proc in procs:
            assert proc is not None
            proc.kill9()
            assert proc.returncode == -signal.SIGKILL, f"{proc.name} ended with {proc.returncode}"


@pytest.fixture(scope="module")
def app(database_url: str) -> Iterator[Orchestrator]:
    """The test's side of the application: starts, signals, queries, cancels, inspects."""
    built = pattern_app.build(
        Settings(
            database_url=database_url,
            broker_url=harness.BROKER_URL,
            workflow_queue=WORKFLOW_QUEUE,
            fast_path=False,
        )
    )
    yield built
    built.close()


@pytest.fixture(scope="module")
def fleet(module_procs: harness.ProcessGroup, db: Engine, app: Orchestrator) -> Iterator[Fleet]:
    pattern_app.effects_metadata.create_all(db)
    harness.wait_until(
        lambda: harness.consumers_of(QUEUES) == 0,
        15,
        f"no consumers on the pattern queues (found {harness.queue_state(QUEUES)})",
    )
    harness.purge_queues(QUEUES)
    running = Fleet(module_procs)
    running.start()
    yield running
    _close_leftovers(db, app)


def _close_leftovers(db: Engine, app: Orchestrator) -> None:
    """Leave no open run and no unsent message of this application to later modules.

    Another application's scheduler or relay sharing the database would take
    them and route them to queues that no worker of this application reads.
    """
    names = [defn.name for defn in app.registry.workflows.values()]
    with db.connect() as conn:
        still_open = conn.execute(
            select(workflow_runs.c.run_id).where(
                workflow_runs.c.workflow_type.in_(names), workflow_runs.c.closed_at.is_(None)
            )
        ).scalars()
        for run_id in still_open:
            app.engine.run_control(run_id, "terminate", "left open by a pattern test")
    harness.wait_until(
        lambda: (
            harness.count(
                db,
                outbox_messages,
                outbox_messages.c.queue.in_(QUEUES),
                outbox_messages.c.published_at.is_(None),
            )
            == 0
        ),
        15,
        "the pattern application's outbox to drain",
    )


# ----------------------------------------------------------------------------- helpers
def types_of(history: list[RecordedEvent]) -> list[str]:
    return [recorded.event.TYPE for recorded in history]


def events_of(history: list[RecordedEvent], kind: type[Any]) -> list[Any]:
    return [recorded for recorded in history if isinstance(recorded.event, kind)]


def open_run(db: Engine, workflow_id: str) -> Any:
    found = harness.rows(
        db,
        workflow_runs,
        workflow_runs.c.workflow_id == workflow_id,
        workflow_runs.c.closed_at.is_(None),
    )
    return found[0] if found else None


def caught_up(db: Engine, workflow_id: str) -> bool:
    """The workflow id has an open run, and a worker has processed all of its history."""
    run = open_run(db, workflow_id)
    return run is not None and run["processed_seq"] == run["history_length"]


def history_of(db: Engine, run_id: str) -> list[RecordedEvent]:
    """The history of any run, the successors of an entity and children included."""
    with Session(db) as session:
        return load_history(session, run_id)


def runs_of(db: Engine, workflow_id: str) -> list[Any]:
    found = harness.rows(db, workflow_runs, workflow_runs.c.workflow_id == workflow_id)
    return sorted(found, key=lambda row: row["created_at"])


def effect_rows(db: Engine, *keys: str) -> dict[str, Any]:
    found = harness.rows(db, effects, effects.c.idempotency_key.in_(keys))
    return {row["idempotency_key"]: row for row in found}


def children_of(db: Engine, run_id: str) -> list[Any]:
    return harness.rows(db, workflow_runs, workflow_runs.c.parent_run_id == run_id)


def child_activity_counts(db: Engine, parent_run_id: str) -> Tally[str]:
    with db.connect() as conn:
        statuses = conn.execute(
            select(activity_tasks.c.status)
            .join(workflow_runs, workflow_runs.c.run_id == activity_tasks.c.run_id)
            .where(workflow_runs.c.parent_run_id == parent_run_id)
        ).scalars()
        return Tally(statuses)


def child_activity_rows(db: Engine, parent_run_id: str) -> list[Any]:
    with db.connect() as conn:
        return list(
            conn.execute(
                select(activity_tasks)
                .join(workflow_runs, workflow_runs.c.run_id == activity_tasks.c.run_id)
                .where(workflow_runs.c.parent_run_id == parent_run_id)
            )
            .mappings()
            .all()
        )


# ------------------------------------------------------------------------------- tests
def test_a_durable_timer_survives_sigkill_of_every_process(
    app: Orchestrator, fleet: Fleet, db: Engine
) -> None:
    handle = app.client().start_workflow(Sleeper, 4.0, workflow_id=harness.unique("sleeper"))
    harness.wait_until(
        lambda: TimerStarted.TYPE in types_of(handle.history()), 20, "the timer to be started"
    )
    timer_row = harness.wait_until(
        lambda: harness.rows(db, timers, timers.c.run_id == handle.run_id),
        5,
        "the timer row",
    )[0]
    due = timer_row["fire_at"].astimezone(UTC)

    fleet.kill9(fleet.scheduler, fleet.relay, fleet.workflow_worker, fleet.activity_worker)
    # Everything died before the timer fell due: only a process started afterwards can fire it.
    assert datetime.now(UTC) < due, "the processes were killed after the timer was due"
    assert TimerFired.TYPE not in types_of(handle.history())
    assert harness.count(db, timers, timers.c.run_id == handle.run_id) == 1

    fleet.start(ready=False)
    report = handle.result(timeout=RESULT_TIMEOUT)

    history = handle.history()
    harness.assert_history_sound(history)
    assert types_of(history) == [
        "WorkflowStarted",
        "TimerStarted",
        "TimerFired",
        "ActivityScheduled",
        "ActivityCompleted",
        "WorkflowCompleted",
    ]
    started = events_of(history, TimerStarted)[0]
    fired = events_of(history, TimerFired)
    assert len(fired) == 1 and fired[0].event.timer_id == started.event.timer_id
    assert started.event.seconds == 4.0
    # Not early: the timer fired at or after its due time, which is 4 s after it started.
    assert fired[0].created_at >= due
    assert (due - started.created_at).total_seconds() == pytest.approx(4.0, abs=0.01)
    assert report["after"] >= report["before"] + 4.0
    assert report["ran_at"] >= due.timestamp()
    assert harness.count(db, timers, timers.c.run_id == handle.run_id) == 0
    fleet.wait_ready()


def test_signals_arrive_in_order_and_queries_replay_what_workers_processed(
    app: Orchestrator, fleet: Fleet, db: Engine
) -> None:
    client = app.client()
    workflow_id = harness.unique("approval")
    handle = client.start_workflow(Approval, "new laptop", workflow_id=workflow_id)
    sent = [f"comment {i}" for i in range(12)]
    # Sent back to back: the first ones before any worker has run the workflow's code.
    for text in sent:
        handle.signal("comment", text)
    harness.wait_until(lambda: caught_up(db, workflow_id), 20, "the workers to take the signals")

    length = harness.history_length(db, handle.run_id)
    assert handle.query("status") == {"comments": 12, "last": "comment 11", "decided": False}
    assert handle.query("comment_at", 0) == "comment 0"
    assert handle.query("comment_at", 7) == "comment 7"
    # A query replays the history in the caller; it appends nothing and wakes nothing.
    assert harness.history_length(db, handle.run_id) == length

    handle.signal("decide", Decision(approved=True, by="finance"))
    verdict = handle.result(timeout=RESULT_TIMEOUT)

    assert verdict.approved and verdict.by == "finance"
    # The handlers ran in the order the signals were sent.
    assert verdict.comments == sent
    history = handle.history()
    harness.assert_history_sound(history)
    received = [(e.event.name, e.event.input) for e in events_of(history, SignalReceived)]
    assert received == [
        *(("comment", text) for text in sent),
        ("decide", {"approved": True, "by": "finance"}),
    ]
    assert effect_rows(db, verdict.receipt)[verdict.receipt]["note"] == (
        "new laptop approved by finance"
    )
    # The closed run still answers from its history.
    assert handle.query("status")["decided"] is True


def test_signal_with_start_starts_one_run_under_concurrent_callers(
    app: Orchestrator, fleet: Fleet, db: Engine
) -> None:
    client = app.client()
    workflow_id = harness.unique("shared-approval")
    callers = 6
    barrier = threading.Barrier(callers)
    handles: list[WorkflowHandle] = []
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            barrier.wait(5)
            handles.append(
                client.signal_with_start(
                    Approval,
                    "team offsite",
                    signal="comment",
                    signal_arg=f"caller {index}",
                    workflow_id=workflow_id,
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(handles) == callers
    assert len({h.run_id for h in handles}) == 1
    assert [row["run_id"] for row in runs_of(db, workflow_id)] == [handles[0].run_id]

    harness.wait_until(lambda: caught_up(db, workflow_id), 20, "the workers to take the signals")
    assert handles[0].query("status")["comments"] == callers
    # With the run open, one more signal_with_start only signals.
    again = client.signal_with_start(
        Approval,
        "team offsite",
        signal="decide",
        signal_arg=Decision(approved=True, by="lead"),
        workflow_id=workflow_id,
    )
    assert again.run_id == handles[0].run_id
    verdict = again.result(timeout=RESULT_TIMEOUT)
    assert sorted(verdict.comments) == sorted(f"caller {i}" for i in range(callers))
    assert verdict.by == "lead"
    history = again.history()
    harness.assert_history_sound(history)
    assert types_of(history).count("WorkflowStarted") == 1
    assert len(events_of(history, SignalReceived)) == callers + 1
    assert len(runs_of(db, workflow_id)) == 1


def _fan_out_completed_once(db: Engine, handle: WorkflowHandle, spec: FanSpec) -> list[Any]:
    """Check a finished fan-out; return its activity rows."""
    total = spec.children * spec.activities
    parent = handle.history()
    harness.assert_history_sound(parent)
    started = [e.event.child_id for e in events_of(parent, ChildWorkflowScheduled)]
    closed = events_of(parent, ChildWorkflowClosed)
    assert len(started) == spec.children
    assert sorted(e.event.child_id for e in closed) == sorted(started)
    assert {e.event.status for e in closed} == {"COMPLETED"}
    children = children_of(db, handle.run_id)
    assert len(children) == spec.children
    assert {c["status"] for c in children} == {"COMPLETED"}
    assert child_activity_counts(db, handle.run_id) == {"COMPLETED": total}
    rows = child_activity_rows(db, handle.run_id)
    keys = [row["idempotency_key"] for row in rows]
    assert len(set(keys)) == total
    for child in children:
        history = history_of(db, child["run_id"])
        harness.assert_history_sound(history)
        scheduled = [e.event.activity_id for e in events_of(history, ActivityScheduled)]
        completed = [e.event for e in events_of(history, ActivityCompleted)]
        assert len(scheduled) == spec.activities
        # Each activity completed exactly once, whatever happened to its attempts.
        assert sorted(e.activity_id for e in completed) == sorted(scheduled)
        assert {e.result for e in completed} == {
            f"{child['workflow_id']}/{child['run_id']}/{activity_id}" for activity_id in scheduled
        }
    # One effect per key, whatever the number of attempts that reached it.
    found = effect_rows(db, *keys)
    assert set(found) == set(keys)
    return rows


def test_fan_out_of_twenty_children_with_fifty_activities_each(
    app: Orchestrator, fleet: Fleet, db: Engine
) -> None:
    spec = FanSpec(children=20, activities=50)
    client = app.client()
    started = time.monotonic()
    handle = client.start_workflow(Tree, spec, workflow_id=harness.unique("tree"))
    assert handle.result(timeout=60) == 1000
    elapsed = time.monotonic() - started
    rows = _fan_out_completed_once(db, handle, spec)
    assert {row["attempt"] for row in rows} == {1}
    found = effect_rows(db, *(row["idempotency_key"] for row in rows))
    assert {row["executions"] for row in found.values()} == {1}
    print(f"fan-out of 1000 activities took {elapsed:.1f}s")


def test_fan_out_survives_sigkill_of_the_activity_worker(
    app: Orchestrator, fleet: Fleet, db: Engine
) -> None:
    spec = FanSpec(children=20, activities=20)
    total = spec.children * spec.activities
    handle = app.client().start_workflow(Tree, spec, workflow_id=harness.unique("tree-kill"))
    harness.wait_until(
        lambda: child_activity_counts(db, handle.run_id)["COMPLETED"] >= total // 3,
        60,
        "a third of the fan-out's activities to complete",
    )
    doomed = fleet.activity_worker
    fleet.kill9(doomed)
    at_kill = child_activity_counts(db, handle.run_id)
    # Attempts the dead worker had claimed; nothing else could have claimed them.
    orphaned = {
        (row["run_id"], row["activity_id"])
        for row in child_activity_rows(db, handle.run_id)
        if row["status"] == "STARTED"
    }
    assert at_kill["COMPLETED"] < total, f"the fan-out was over before the kill: {at_kill}"
    fleet.start()

    assert handle.result(timeout=60) == total

    rows = _fan_out_completed_once(db, handle, spec)
    by_id = {(row["run_id"], row["activity_id"]): row for row in rows}
    for key in orphaned:
        row = by_id[key]
        # Its attempt died with the worker; the deadline passed and a retry completed it.
        assert row["attempt"] >= 2
        assert row["attempt_failures"][0]["failure"]["type"] == "ActivityTimeout"
    found = effect_rows(db, *(row["idempotency_key"] for row in rows))
    executions = sum(row["executions"] for row in found.values())
    # At least once, and more than once only where the kill interrupted an attempt.
    assert total <= executions <= total + len(orphaned)
    print(
        f"killed with {at_kill['COMPLETED']} completed and {len(orphaned)} attempts in flight; "
        f"{executions} executions for {total} effects"
    )


def test_cancelling_a_saga_compensates_through_the_workers(
    app: Orchestrator, fleet: Fleet, db: Engine
) -> None:
    item = harness.unique("desk")
    handle = app.client().start_workflow(Booking, item, workflow_id=f"booking-{item}")

    def holding() -> bool:
        row = harness.activity_rows(db, handle.run_id).get("hold_until_shipped")
        return bool(row and row["status"] == "STARTED" and row["heartbeat_details"])

    harness.wait_until(holding, 20, "the slow step to be running and heartbeating")
    assert handle.cancel("customer changed their mind")

    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=RESULT_TIMEOUT)
    assert caught.value.status == "CANCELLED"
    assert handle.describe().status is RunStatus.CANCELLED

    history = handle.history()
    harness.assert_history_sound(history)
    compensations = [
        e.event.activity_type
        for e in events_of(history, ActivityScheduled)
        if e.event.is_compensation
    ]
    assert compensations == ["cancel_hold", "release"]
    completed = {e.event.activity_type for e in events_of(history, ActivityCompleted)}
    assert completed == {"reserve", "cancel_hold", "release"}
    assert "CancelRequested" in types_of(history)
    closing = history[-1].event
    assert isinstance(closing, WorkflowCancelled) and closing.compensations == 2

    # The slow step ends cancelled either way, by whichever came first: the run's
    # close cancelled its row, or its heartbeat saw the cancellation requested
    # while the compensations ran and the attempt failed as cancelled. It
    # learned of it at a heartbeat and stopped (its note says so below).
    hold = harness.activity_rows(db, handle.run_id)["hold_until_shipped"]
    if hold["status"] != "CANCELLED":
        assert hold["status"] == "FAILED"
        assert hold["last_failure"]["type"] == "ActivityCancelled"

    def stopped() -> bool:
        rows = harness.rows(db, effects, effects.c.idempotency_key.like(f"booking-{item}/%"))
        return any(
            r["activity"] == "hold_until_shipped" and str(r["note"]).startswith("stopped after")
            for r in rows
        )

    harness.wait_until(stopped, 10, "the slow step to stop")
    notes = {
        row["activity"]: row["note"]
        for row in harness.rows(db, effects, effects.c.idempotency_key.like(f"booking-{item}/%"))
    }
    assert notes["reserve"] == f"reserved {item}"
    assert notes["cancel_hold"] == f"hold on {item} cancelled"
    assert notes["release"] == f"released {item}"
    assert notes["hold_until_shipped"].startswith("stopped after")


def test_an_entity_continues_as_new_and_signals_follow_it(
    app: Orchestrator, fleet: Fleet, db: Engine
) -> None:
    client = app.client()
    workflow_id = harness.unique("counter")
    first = client.start_workflow(Counter, 100, workflow_id=workflow_id)
    amounts = list(range(1, 8))
    for amount in amounts:
        # Always through the first run's handle: it follows the run the entity is now.
        first.signal("add", amount)
        harness.wait_until(lambda: caught_up(db, workflow_id), 20, f"add({amount}) to be handled")

    runs = runs_of(db, workflow_id)
    assert [r["status"] for r in runs] == ["CONTINUED_AS_NEW", "CONTINUED_AS_NEW", "RUNNING"]
    assert [r["input"] for r in runs] == [100, 106, 121]
    assert first.query("value") == 128
    latest = client.get_handle(workflow_id)
    assert latest.run_id == runs[-1]["run_id"] != first.run_id

    first.signal("finish")
    assert first.result(timeout=RESULT_TIMEOUT) == 128

    runs = runs_of(db, workflow_id)
    assert [r["status"] for r in runs] == ["CONTINUED_AS_NEW", "CONTINUED_AS_NEW", "COMPLETED"]
    signals_per_run = []
    for run in runs:
        history = history_of(db, run["run_id"])
        harness.assert_history_sound(history)
        signals_per_run.append(
            [(e.event.name, e.event.input) for e in events_of(history, SignalReceived)]
        )
    assert signals_per_run == [
        [("add", 1), ("add", 2), ("add", 3)],
        [("add", 4), ("add", 5), ("add", 6)],
        [("add", 7), ("finish", None)],
    ]
    for earlier, later in itertools.pairwise(runs):
        assert earlier["result"] == {"continued_as": later["run_id"]}
    # Nothing of the entity is left waiting.
    assert harness.count(db, timers, timers.c.run_id.in_([r["run_id"] for r in runs])) == 0
