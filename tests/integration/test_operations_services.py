"""Operator actions against real workers on PostgreSQL and RabbitMQ.

A compensation that fails until its downstream is fixed is dead-lettered, then
replayed from two terminals at once; pausing a run really stops its dispatch.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from datetime import UTC, datetime

import harness
import pytest
from sqlalchemy import Engine, delete, insert, select

from examples.order_fulfillment.schema import gateway_outages, payments
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import Orchestrator, RunStatus, WorkflowFailedError
from orchestrator.dead_letters import COMPENSATION_DEAD_LETTER_QUEUE
from orchestrator.schema import audit_log, dead_letters

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module", autouse=True)
def worker(module_procs: harness.ProcessGroup) -> harness.Proc:
    module_procs.scheduler()
    return module_procs.worker("worker")


def set_refunds_down(db: Engine, down: bool) -> None:
    with db.begin() as conn:
        conn.execute(delete(gateway_outages).where(gateway_outages.c.service == "refunds"))
        if down:
            conn.execute(insert(gateway_outages).values(service="refunds", since=datetime.now(UTC)))


def test_dead_lettered_refund_is_replayed_once_and_the_saga_compensates(
    db: Engine, orchestrator: Orchestrator
) -> None:
    before = harness.stock(db)
    set_refunds_down(db, True)
    harness.purge_queues([COMPENSATION_DEAD_LETTER_QUEUE])
    order = harness.make_order(harness.unique("dl"), country="XX", compensation_attempts=2)
    handle = orchestrator.client().start_workflow(
        OrderSaga, order, workflow_id=f"order-{order.order_id}"
    )
    harness.wait_until(
        lambda: handle.describe().status is RunStatus.COMPENSATION_BLOCKED,
        30,
        "the run to be blocked on its dead-lettered refund",
    )
    with db.connect() as conn:
        letter = (
            conn.execute(
                select(dead_letters).where(dead_letters.c.workflow_id == handle.workflow_id)
            )
            .mappings()
            .one()
        )
        charged = (
            conn.execute(select(payments.c.status).where(payments.c.order_id == order.order_id))
            .scalars()
            .all()
        )
    assert letter["activity_type"] == "refund_payment" and letter["status"] == "OPEN"
    assert [a["attempt"] for a in letter["attempts"]] == [1, 2]
    assert charged == ["charged"]
    assert harness.stock(db) != before  # release_inventory has not run yet
    # A copy waits in the broker for visibility.
    state = harness.queue_state([COMPENSATION_DEAD_LETTER_QUEUE])[COMPENSATION_DEAD_LETTER_QUEUE]
    assert state is not None and state[0] >= 1

    result = harness.run_cli("ls", "--stuck")
    assert result.returncode == 0 and handle.workflow_id in result.stdout

    set_refunds_down(db, False)
    # Two operators replay the same dead letter at the same moment.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(
            pool.map(
                lambda who: harness.run_cli(
                    "--json", "--actor", who, "dlq", "replay", letter["id"], "--reason", "fixed"
                ),
                ["ann", "bob"],
            )
        )
    assert [o.returncode for o in outcomes] == [0, 0], [o.stderr for o in outcomes]
    replayed = [json.loads(o.stdout)[0]["replayed"] for o in outcomes]
    assert sorted(replayed) == [False, True]

    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=30)
    assert caught.value.status == "COMPENSATED"
    assert harness.stock(db) == before
    with db.connect() as conn:
        statuses = (
            conn.execute(select(payments.c.status).where(payments.c.order_id == order.order_id))
            .scalars()
            .all()
        )
        audit = conn.execute(
            select(audit_log.c.action, audit_log.c.actor).where(
                audit_log.c.workflow_id == handle.workflow_id
            )
        ).all()
    assert statuses == ["refunded"]
    assert len(audit) == 1 and audit[0][0] == "dlq.replay"
    refunds = [
        e
        for e in handle.history()
        if e.event.TYPE == "ActivityCompleted" and e.event.activity_type == "refund_payment"  # type: ignore[attr-defined]
    ]
    assert len(refunds) == 1


def test_pause_stops_dispatch_until_resume(db: Engine, orchestrator: Orchestrator) -> None:
    # The charge must outlast the pause command's start (a new interpreter, slow
    # on a busy machine): paused after it, the run would just finish.
    order = harness.make_order(harness.unique("pause"), charge_delay_seconds=5.0)
    handle = orchestrator.client().start_workflow(
        OrderSaga, order, workflow_id=f"order-{order.order_id}"
    )
    harness.wait_until(
        lambda: harness.order_rows(db, order.order_id)["payments"], 30, "the charge to start"
    )
    paused = harness.run_cli("--actor", "ops", "pause", handle.workflow_id, "--reason", "check")
    assert paused.returncode == 0, paused.stderr
    harness.wait_until(
        lambda: handle.history()[-1].event.TYPE == "ActivityCompleted", 30, "the charge to end"
    )
    settled = [e.event.TYPE for e in handle.history()]
    # Nothing may happen: watch for 2 s, long enough for an unpaused run to have
    # scheduled and run its shipment (it takes well under a second here).
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert [e.event.TYPE for e in handle.history()] == settled
        time.sleep(0.1)
    assert harness.order_rows(db, order.order_id)["shipments"] == []
    shown = harness.run_cli("show", handle.workflow_id)
    assert "(paused)" in shown.stdout

    resumed = harness.run_cli("--actor", "ops", "resume", handle.workflow_id)
    assert resumed.returncode == 0, resumed.stderr
    assert handle.result(timeout=30).order_id == order.order_id
    assert len(harness.order_rows(db, order.order_id)["shipments"]) == 1
