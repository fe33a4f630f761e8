"""Workers killed with SIGKILL at the worst moments; the saga still ends exactly once.

Each test starts its own processes, so that it knows which one holds which
message when it kills it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import harness
import pytest
from sqlalchemy import Engine

from examples.order_fulfillment.app import build
from examples.order_fulfillment.schema import inventory_reservations, payments
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import Orchestrator, Settings
from orchestrator.history import ActivityCompleted

pytestmark = pytest.mark.integration

NO_FAST_PATH = {"ORCHESTRATOR_FAST_PATH": "false"}


@pytest.mark.timeout(120)
def test_activity_worker_killed_while_charging(
    db: Engine, orchestrator: Orchestrator, procs: harness.ProcessGroup
) -> None:
    procs.scheduler()
    starting = [
        procs.worker("workflow-worker", queues=harness.WORKFLOW_QUEUE, ready=False),
        procs.worker("activity-worker-1", queues=harness.ACTIVITY_QUEUE, ready=False),
    ]
    for proc in starting:
        proc.wait_for_log(r" ready\.", timeout=60)
    doomed = starting[1]
    # Longer than the start-to-close timeout (10 s): only a retry can finish the step.
    order = harness.make_order(harness.unique("kill-activity"), charge_delay_seconds=120)
    handle = orchestrator.client().start_workflow(
        OrderSaga, order, workflow_id=f"order-{order.order_id}"
    )

    harness.wait_until(
        lambda: harness.rows(db, payments, payments.c.order_id == order.order_id),
        30,
        "charge_payment to commit its charge",
    )
    charging = harness.activity_rows(db, handle.run_id)["charge_payment"]
    assert (charging["status"], charging["attempt"]) == ("STARTED", 1)
    doomed.kill9()
    assert doomed.returncode == -signal.SIGKILL
    survivor = procs.worker("activity-worker-2", queues=harness.ACTIVITY_QUEUE)

    result = handle.result(timeout=60)

    charges = harness.rows(db, payments, payments.c.order_id == order.order_id)
    assert [(c["charge_id"], c["status"]) for c in charges] == [(result.charge_id, "charged")]
    charged = harness.activity_rows(db, handle.run_id)["charge_payment"]
    assert (charged["status"], charged["attempt"]) == ("COMPLETED", 2)
    assert [f["failure"]["type"] for f in charged["attempt_failures"]] == ["ActivityTimeout"]
    assert "start-to-close" in charged["attempt_failures"][0]["failure"]["message"]
    history = handle.history()
    assert harness.timeline(history) == harness.FULFILLED_TIMELINE
    harness.assert_history_sound(history)
    completed = [
        e.event
        for e in history
        if isinstance(e.event, ActivityCompleted) and e.event.activity_type == "charge_payment"
    ]
    assert [(e.attempt, e.result) for e in completed] == [(2, result.charge_id)]
    # The retry found the charge of the killed attempt instead of making another.
    assert f"for order {order.order_id} (already made)" in survivor.log_text()
    # The killed attempt's message came back from the broker and was recognised as stale.
    harness.wait_until(
        lambda: "dropping stale activity message" in survivor.log_text(),
        10,
        "the redelivered first attempt to be dropped",
    )
    reserved = harness.rows(
        db, inventory_reservations, inventory_reservations.c.order_id == order.order_id
    )
    assert {r["reservation_id"] for r in reserved} == {result.reservation_id}


@pytest.fixture
def slow_start(database_url: str) -> Iterator[Orchestrator]:
    """A client without the fast path: it leaves a run's first step to a workflow worker
    (with it, the start itself schedules the first activity)."""
    built = build(
        Settings(database_url=database_url, broker_url=harness.BROKER_URL, fast_path=False)
    )
    yield built
    built.close()


@pytest.mark.timeout(120)
def test_workflow_worker_killed_between_commit_and_publish(
    db: Engine, slow_start: Orchestrator, procs: harness.ProcessGroup
) -> None:
    orchestrator = slow_start
    starting = [
        procs.worker(
            "workflow-worker-1",
            queues=harness.WORKFLOW_QUEUE,
            pool="solo",
            concurrency=1,
            env={**NO_FAST_PATH, "ORCHESTRATOR_CRASH_AT": "outbox.after_commit"},
            ready=False,
        ),
        procs.worker(
            "activity-worker", queues=harness.ACTIVITY_QUEUE, env=NO_FAST_PATH, ready=False
        ),
    ]
    for proc in starting:
        proc.wait_for_log(r" ready\.", timeout=60)
    doomed = starting[0]
    order = harness.make_order(harness.unique("kill-workflow"))
    workflow_id = f"order-{order.order_id}"
    handle = orchestrator.client().start_workflow(OrderSaga, order, workflow_id=workflow_id)

    assert doomed.wait_dead(30) == -signal.SIGKILL
    # It died holding a committed decision whose message nobody sent.
    assert harness.timeline(handle.history()) == harness.FULFILLED_TIMELINE[:2]
    orphaned = harness.unpublished(db, workflow_id)
    assert [(m.destination, m.body["attempt"]) for m in orphaned] == [("reserve_inventory", 1)]
    assert harness.activity_rows(db, handle.run_id)["reserve_inventory"]["status"] == "SCHEDULED"
    first_task = harness.rows(
        db,
        harness.outbox_messages,
        harness.outbox_messages.c.aggregate_id == workflow_id,
        harness.outbox_messages.c.destination == "orchestrator.workflow_task",
    )
    assert len(first_task) == 1

    procs.relay(env={"ORCHESTRATOR_RELAY_GRACE_SECONDS": "0.5"})
    successor = procs.worker(
        "workflow-worker-2",
        queues=harness.WORKFLOW_QUEUE,
        pool="solo",
        concurrency=1,
        env=NO_FAST_PATH,
    )

    result = handle.result(timeout=60)

    assert result.order_id == order.order_id
    history = handle.history()
    assert harness.timeline(history) == harness.FULFILLED_TIMELINE
    harness.assert_history_sound(history)
    harness.wait_until(lambda: harness.unpublished(db, workflow_id) == [], 5, "the publish marks")
    tasks = harness.activity_rows(db, handle.run_id)
    assert {name: (row["status"], row["attempt"]) for name, row in tasks.items()} == dict.fromkeys(
        ("reserve_inventory", "charge_payment", "create_shipment", "send_confirmation"),
        ("COMPLETED", 1),
    )
    found = harness.order_rows(db, order.order_id)
    assert {r["reservation_id"] for r in found["inventory_reservations"]} == {result.reservation_id}
    assert [p["charge_id"] for p in found["payments"]] == [result.charge_id]
    assert len(found["shipments"]) == 1
    # The unacknowledged first workflow task came back to the new worker: a no-op.
    harness.wait_until(
        lambda: (
            f"orchestrator.workflow_task[{first_task[0]['id']}] succeeded" in successor.log_text()
        ),
        10,
        "the redelivered first workflow task to be handled",
    )
