"""At-least-once delivery: duplicated messages must not duplicate effects or history.

Every process of this module leaves its messages in the outbox
(``ORCHESTRATOR_PUBLISH_AFTER_COMMIT=false``), so nothing reaches the broker
but what a relay, or the test acting as one, sends.
"""

from __future__ import annotations

import signal

import harness
import pytest
from sqlalchemy import Engine, select

from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import Orchestrator
from orchestrator.client import WorkflowHandle
from orchestrator.schema import outbox_messages
from outbox.message import OutboxMessage

pytestmark = pytest.mark.integration

RELAY_ONLY = {"ORCHESTRATOR_PUBLISH_AFTER_COMMIT": "false"}
NO_GRACE = {"ORCHESTRATOR_RELAY_GRACE_SECONDS": "0"}
STEPS = ("reserve_inventory", "charge_payment", "create_shipment", "send_confirmation")


@pytest.fixture(scope="module")
def worker(module_procs: harness.ProcessGroup) -> harness.Proc:
    # Every step through a message, which these tests deliver, drop or repeat:
    # no activity runs eagerly, without one.
    return module_procs.worker("worker", env={**RELAY_ONLY, "ORCHESTRATOR_EAGER_MAX_STEPS": "0"})


def outbox_row(db: Engine, message_id: str) -> dict[str, object]:
    with db.connect() as conn:
        row = (
            conn.execute(select(outbox_messages).where(outbox_messages.c.id == message_id))
            .mappings()
            .one()
        )
    return dict(row)


def handled(worker: harness.Proc, message: OutboxMessage) -> int:
    """How many deliveries of ``message`` the worker has finished."""
    return worker.count_in_log(f"{message.destination}[{message.id}] succeeded")


def assert_fulfilled_once(db: Engine, handle: WorkflowHandle, order_id: str) -> None:
    history = handle.history()
    assert harness.timeline(history) == harness.FULFILLED_TIMELINE
    harness.assert_history_sound(history)
    tasks = harness.activity_rows(db, handle.run_id)
    assert {name: (row["status"], row["attempt"]) for name, row in tasks.items()} == dict.fromkeys(
        STEPS, ("COMPLETED", 1)
    )
    found = harness.order_rows(db, order_id)
    assert len({r["reservation_id"] for r in found["inventory_reservations"]}) == 1
    assert len(found["inventory_reservations"]) == 2
    assert [p["status"] for p in found["payments"]] == ["charged"]
    assert len(found["shipments"]) == 1
    assert len(found["notifications"]) == 1
    run = harness.run_row(db, handle.run_id)
    assert run["processed_seq"] == run["history_length"] == len(history)


@pytest.mark.timeout(120)
def test_relay_killed_after_claim_and_after_publish(
    db: Engine,
    quiet_orchestrator: Orchestrator,
    worker: harness.Proc,
    procs: harness.ProcessGroup,
) -> None:
    order = harness.make_order(harness.unique("relay-crash"))
    workflow_id = f"order-{order.order_id}"
    handle = quiet_orchestrator.client().start_workflow(OrderSaga, order, workflow_id=workflow_id)
    [start] = harness.unpublished(db, workflow_id)

    claimer = procs.relay(
        "relay-killed-after-claim",
        env={**RELAY_ONLY, **NO_GRACE, "ORCHESTRATOR_CRASH_AT": "relay.after_claim"},
    )
    assert claimer.wait_dead(30) == -signal.SIGKILL
    row = outbox_row(db, start.id)
    assert (row["published_at"], row["publish_attempts"]) == (None, 0)
    assert worker.count_in_log(start.id) == 0
    assert harness.history_length(db, handle.run_id) == 1

    publisher = procs.relay(
        "relay-killed-after-publish",
        env={**RELAY_ONLY, **NO_GRACE, "ORCHESTRATOR_CRASH_AT": "relay.after_publish"},
    )
    assert publisher.wait_dead(30) == -signal.SIGKILL
    row = outbox_row(db, start.id)
    assert (row["published_at"], row["publish_attempts"]) == (None, 0)
    # Sent but never marked: the broker has it, the outbox still owes it.
    harness.wait_until(lambda: handled(worker, start) == 1, 20, "the worker to run the start")
    assert harness.timeline(handle.history()) == harness.FULFILLED_TIMELINE[:2]

    procs.relay("relay", env={**RELAY_ONLY, **NO_GRACE})
    handle.result(timeout=45)

    harness.wait_until(
        lambda: handled(worker, start) == 2, 20, "the worker to run the start's duplicate"
    )
    assert outbox_row(db, start.id)["published_at"] is not None
    assert harness.unpublished(db, workflow_id) == []
    assert_fulfilled_once(db, handle, order.order_id)


@pytest.mark.timeout(120)
def test_every_message_delivered_twice_is_applied_once(
    db: Engine,
    orchestrator: Orchestrator,
    quiet_orchestrator: Orchestrator,
    worker: harness.Proc,
) -> None:
    order = harness.make_order(harness.unique("twice"))
    workflow_id = f"order-{order.order_id}"
    handle = quiet_orchestrator.client().start_workflow(OrderSaga, order, workflow_id=workflow_id)
    sent: list[OutboxMessage] = []

    def relay_twice() -> bool:
        sent.extend(harness.publish_pending(db, orchestrator.publisher, workflow_id, times=2))
        return handle.describe().status.is_closed

    harness.wait_until(relay_twice, 45, "the run to close with each message sent twice")

    assert harness.unpublished(db, workflow_id) == []
    assert [m.destination for m in sent] == ["orchestrator.workflow_task", *STEPS]
    harness.wait_until(
        lambda: all(handled(worker, m) >= 2 for m in sent), 20, "both copies of every message"
    )
    assert [handled(worker, m) for m in sent] == [2] * len(sent)
    assert_fulfilled_once(db, handle, order.order_id)

    # Late copies of every message, long after their state moved on, change nothing.
    history = [e.to_json() for e in handle.history()]
    tasks = harness.activity_rows(db, handle.run_id)
    found = harness.order_rows(db, order.order_id)
    for message in sent:
        orchestrator.publisher.publish([message])
    harness.wait_until(
        lambda: all(handled(worker, m) >= 3 for m in sent), 20, "the late copies to be handled"
    )
    assert [e.to_json() for e in handle.history()] == history
    assert harness.activity_rows(db, handle.run_id) == tasks
    assert harness.order_rows(db, order.order_id) == found
