"""The order saga end to end, through real worker processes on PostgreSQL and RabbitMQ.

One worker (prefork, workflows and activities) and one scheduler serve every
test of this module; each test uses its own order and workflow ids.
"""

from __future__ import annotations

import harness
import pytest
from sqlalchemy import Column, Engine, MetaData, String, Table, insert, select
from sqlalchemy.orm import Session

from activities.errors import InvalidPayloadError
from examples.order_fulfillment.activities import (
    charge_payment,
    create_shipment,
    reserve_inventory,
)
from examples.order_fulfillment.app import ACTIVITIES
from examples.order_fulfillment.models import Order, OrderResult, Shipment
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import (
    IdConflictPolicy,
    IdReusePolicy,
    NondeterminismError,
    Orchestrator,
    RunStatus,
    Settings,
    UnknownWorkflowTypeError,
    WorkflowAlreadyStartedError,
    WorkflowFailedError,
    workflow,
)
from orchestrator.celery_app import send_start_request
from orchestrator.definition import definition_of
from orchestrator.instance import ActivityDefaults, WorkflowInstance
from orchestrator.schema import outbox_messages, workflow_events, workflow_runs

pytestmark = pytest.mark.integration

RESULT_TIMEOUT = 30.0

app_metadata = MetaData()
# A table of "the application": it must commit or roll back together with the run.
app_orders = Table(
    "it_app_orders",
    app_metadata,
    Column("order_id", String(128), primary_key=True),
    Column("workflow_id", String(255), nullable=False),
)


@workflow.defn(name="OrderSaga")
class ReorderedOrderSaga:
    """OrderSaga after a careless edit: it charges before it reserves."""

    @workflow.run
    async def run(self, order: Order) -> OrderResult:
        charge_id: str = await workflow.execute_activity(charge_payment, order)
        reservation_id: str = await workflow.execute_activity(reserve_inventory, order)
        shipment: Shipment = await workflow.execute_activity(create_shipment, order)
        return OrderResult(
            order_id=order.order_id,
            reservation_id=reservation_id,
            charge_id=charge_id,
            shipment_id=shipment.shipment_id,
            tracking_number=shipment.tracking_number,
        )


@pytest.fixture(scope="module", autouse=True)
def worker(module_procs: harness.ProcessGroup, db: Engine) -> harness.Proc:
    app_metadata.create_all(db)
    module_procs.scheduler()
    return module_procs.worker("worker")


def counts(db: Engine) -> tuple[int, int, int]:
    return (
        harness.count(db, workflow_runs),
        harness.count(db, workflow_events),
        harness.count(db, outbox_messages),
    )


def test_fulfilled_order(db: Engine, orchestrator: Orchestrator) -> None:
    order = harness.make_order(harness.unique("ok"))
    before = harness.stock(db)

    handle = orchestrator.client().start_workflow(
        OrderSaga, order, workflow_id=f"order-{order.order_id}"
    )
    result = handle.result(timeout=RESULT_TIMEOUT)

    assert isinstance(result, OrderResult)
    assert result.order_id == order.order_id
    history = handle.history()
    assert harness.timeline(history) == harness.FULFILLED_TIMELINE
    harness.assert_history_sound(history)
    run = handle.describe()
    assert run.status is RunStatus.COMPLETED
    assert run.closed_at is not None
    assert run.task_failure is None
    assert run.history_length == len(history)
    assert run.result == result.model_dump(mode="json")

    found = harness.order_rows(db, order.order_id)
    assert {row["reservation_id"] for row in found["inventory_reservations"]} == {
        result.reservation_id
    }
    assert {row["sku"]: row["quantity"] for row in found["inventory_reservations"]} == {
        "WIDGET": 2,
        "GADGET": 1,
    }
    assert [(p["charge_id"], p["amount_cents"], p["status"]) for p in found["payments"]] == [
        (result.charge_id, order.total_cents, "charged")
    ]
    assert [(s["shipment_id"], s["tracking_number"], s["status"]) for s in found["shipments"]] == [
        (result.shipment_id, result.tracking_number, "created")
    ]
    assert [n["email"] for n in found["notifications"]] == [order.customer_email]
    after = harness.stock(db)
    assert after["WIDGET"] == before["WIDGET"] - 2
    assert after["GADGET"] == before["GADGET"] - 1
    assert after["GIZMO"] == before["GIZMO"]


def test_unshippable_order_is_compensated_in_reverse(
    db: Engine, orchestrator: Orchestrator
) -> None:
    order = harness.make_order(harness.unique("xx"), country="XX")
    before = harness.stock(db)

    handle = orchestrator.client().start_workflow(
        OrderSaga, order, workflow_id=f"order-{order.order_id}"
    )
    with pytest.raises(WorkflowFailedError) as failed:
        handle.result(timeout=RESULT_TIMEOUT)

    assert failed.value.status == "COMPENSATED"
    assert failed.value.failure is not None
    assert failed.value.failure.type == "ActivityError"
    assert "UnshippableAddress" in failed.value.failure.message
    history = handle.history()
    harness.assert_history_sound(history)
    assert harness.timeline(history) == [
        ("WorkflowStarted", None, False),
        ("ActivityScheduled", "reserve_inventory", False),
        ("ActivityCompleted", "reserve_inventory", False),
        ("EventEmitted", "order.inventory_reserved", False),
        ("ActivityScheduled", "charge_payment", False),
        ("ActivityCompleted", "charge_payment", False),
        ("EventEmitted", "order.payment_charged", False),
        ("ActivityScheduled", "create_shipment", False),
        ("ActivityFailed", "create_shipment", False),
        ("ActivityScheduled", "cancel_shipment", True),
        ("ActivityCompleted", "cancel_shipment", True),
        ("ActivityScheduled", "refund_payment", True),
        ("ActivityCompleted", "refund_payment", True),
        ("ActivityScheduled", "release_inventory", True),
        ("ActivityCompleted", "release_inventory", True),
        ("EventEmitted", "order.compensated", False),
        ("WorkflowCompensated", None, False),
    ]
    closing = history[-1].event
    assert closing.compensations == 3  # type: ignore[attr-defined]

    found = harness.order_rows(db, order.order_id)
    assert [(p["amount_cents"], p["status"]) for p in found["payments"]] == [
        (order.total_cents, "refunded")
    ]
    assert {r["status"] for r in found["inventory_reservations"]} == {"released"}
    assert found["shipments"] == []
    assert found["notifications"] == []
    assert harness.stock(db) == before


def test_start_joins_the_applications_transaction(
    db: Engine,
    orchestrator: Orchestrator,
    detoured: Orchestrator,
    private_queue: harness.PrivateQueue,
) -> None:
    client = detoured.client()
    app_db = detoured.db

    dropped = harness.make_order(harness.unique("rollback"))
    dropped_id = f"order-{dropped.order_id}"
    with Session(app_db) as session:
        session.execute(
            insert(app_orders).values(order_id=dropped.order_id, workflow_id=dropped_id)
        )
        handle = client.start_workflow(OrderSaga, dropped, workflow_id=dropped_id, session=session)
        # Inside the transaction the run exists, for this session only.
        assert (
            session.scalar(
                select(workflow_runs.c.status).where(workflow_runs.c.run_id == handle.run_id)
            )
            == "RUNNING"
        )
        assert harness.run_ids_of(db, dropped_id) == []
        session.rollback()

    assert harness.run_ids_of(db, dropped_id) == []
    assert harness.count(db, outbox_messages, outbox_messages.c.aggregate_id == dropped_id) == 0
    assert harness.count(db, app_orders, app_orders.c.order_id == dropped.order_id) == 0
    # Publishing after commit returns only once the broker confirmed, so a
    # message sent for the rolled-back start would already be waiting here.
    assert private_queue.drain() == []

    kept = harness.make_order(harness.unique("commit"))
    kept_id = f"order-{kept.order_id}"
    with Session(app_db) as session:
        session.execute(insert(app_orders).values(order_id=kept.order_id, workflow_id=kept_id))
        handle = client.start_workflow(OrderSaga, kept, workflow_id=kept_id, session=session)
        assert private_queue.drain() == []
        session.commit()

    sent = private_queue.drain()
    assert [(t.task, t.kwargs) for t in sent] == [
        ("orchestrator.workflow_task", {"run_id": handle.run_id})
    ]
    # Published rows are marked in batches, a few milliseconds after the publish.
    harness.wait_until(lambda: harness.unpublished(db, kept_id) == [], 5, "the publish mark")
    harness.forward(orchestrator.publisher, sent)
    assert handle.result(timeout=RESULT_TIMEOUT).order_id == kept.order_id
    assert harness.count(db, app_orders, app_orders.c.order_id == kept.order_id) == 1
    assert harness.run_ids_of(db, kept_id) == [handle.run_id]
    assert len(harness.order_rows(db, kept.order_id)["payments"]) == 1
    assert harness.order_rows(db, dropped.order_id)["payments"] == []


def test_broker_only_start_is_deduplicated(
    db: Engine, orchestrator: Orchestrator, worker: harness.Proc
) -> None:
    order = harness.make_order(harness.unique("broker"))
    workflow_id = f"order-{order.order_id}"
    payload = order.model_dump(mode="json")

    send_start_request(harness.BROKER_URL, "OrderSaga", workflow_id, payload)
    send_start_request(harness.BROKER_URL, "OrderSaga", workflow_id, payload)

    run_ids = harness.wait_until(
        lambda: harness.run_ids_of(db, workflow_id), 20, f"a run of {workflow_id}"
    )
    handle = orchestrator.client().get_handle(workflow_id)
    assert handle.result(timeout=RESULT_TIMEOUT).order_id == order.order_id
    # Both requests must have been handled before counting runs.
    harness.wait_until(
        lambda: (
            worker.count_in_log(f"orchestrator.start_workflow[start-{workflow_id}] succeeded") == 2
        ),
        20,
        "the worker to handle both start requests",
    )
    assert harness.run_ids_of(db, workflow_id) == run_ids == [handle.run_id]
    assert len(harness.order_rows(db, order.order_id)["payments"]) == 1
    assert harness.timeline(handle.history()) == harness.FULFILLED_TIMELINE


def test_bad_starts_are_refused_and_write_nothing(
    db: Engine,
    orchestrator: Orchestrator,
    detoured: Orchestrator,
    quiet_orchestrator: Orchestrator,
    private_queue: harness.PrivateQueue,
) -> None:
    client = detoured.client()
    order = harness.make_order(harness.unique("dup"))
    workflow_id = f"order-{order.order_id}"
    before = counts(db)

    bad = order.model_dump(mode="json")
    bad["address"]["country"] = "Great Britain"
    with pytest.raises(InvalidPayloadError, match="country"):
        client.start_workflow(OrderSaga, bad, workflow_id=workflow_id)
    with pytest.raises(InvalidPayloadError, match="items"):
        client.start_workflow("OrderSaga", {**bad, "items": []}, workflow_id=workflow_id)
    with pytest.raises(UnknownWorkflowTypeError, match="NoSuchType"):
        client.start_workflow("NoSuchType", {}, workflow_id=workflow_id)
    assert counts(db) == before

    # A run that stays open: its first message waits in the outbox.
    first = quiet_orchestrator.client().start_workflow(OrderSaga, order, workflow_id=workflow_id)
    opened = counts(db)
    # One run, its first event, and two messages: its first task and workflow.started.
    assert opened == (before[0] + 1, before[1] + 1, before[2] + 2)
    with pytest.raises(WorkflowAlreadyStartedError) as conflict:
        client.start_workflow(OrderSaga, order, workflow_id=workflow_id)
    assert (conflict.value.run_id, conflict.value.status) == (first.run_id, "RUNNING")
    same = client.start_workflow(
        OrderSaga,
        order,
        workflow_id=workflow_id,
        id_conflict_policy=IdConflictPolicy.USE_EXISTING,
    )
    assert same.run_id == first.run_id
    assert counts(db) == opened
    assert private_queue.drain() == []

    harness.publish_pending(db, orchestrator.publisher, workflow_id)
    assert first.result(timeout=RESULT_TIMEOUT).order_id == order.order_id
    closed = counts(db)
    with pytest.raises(WorkflowAlreadyStartedError) as rejected:
        client.start_workflow(
            OrderSaga,
            order,
            workflow_id=workflow_id,
            id_reuse_policy=IdReusePolicy.REJECT_DUPLICATE,
        )
    assert (rejected.value.run_id, rejected.value.status) == (first.run_id, "COMPLETED")
    assert counts(db) == closed
    assert harness.run_ids_of(db, workflow_id) == [first.run_id]
    assert private_queue.drain() == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["start", "NoSuchType", "--input", "{}"], "unknown workflow type 'NoSuchType'"),
        (["start", "OrderSaga", "--input", '{"order_id": "x"}'], "expected Order"),
        (["start", "OrderSaga", "--input", "{not json"], "not valid JSON"),
    ],
)
def test_cli_refuses_a_bad_start_with_one_line(db: Engine, args: list[str], needle: str) -> None:
    before = counts(db)

    finished = harness.run_cli(*args)

    assert finished.returncode == 2, finished
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "Traceback" not in finished.stderr + finished.stdout
    assert counts(db) == before


def test_changed_workflow_code_is_reported_as_nondeterminism(
    db: Engine, quiet_orchestrator: Orchestrator
) -> None:
    order = harness.make_order(harness.unique("nondet"))
    workflow_id = f"order-{order.order_id}"
    quiet = quiet_orchestrator
    handle = quiet.client().start_workflow(OrderSaga, order, workflow_id=workflow_id)
    changed = Orchestrator(
        workflows=[ReorderedOrderSaga],
        activities=ACTIVITIES,
        settings=Settings(
            database_url=quiet.settings.database_url,
            broker_url=harness.BROKER_URL,
            publish_after_commit=False,
        ),
    )
    try:
        # The released code records its first decision; a cancellation request
        # then leaves a new event for the next workflow task to process.
        quiet.engine.workflow_task(handle.run_id)
        assert handle.cancel("stop") is True
        recorded = handle.history()
        assert [(seq.seq, seq.event.TYPE) for seq in recorded] == [
            (1, "WorkflowStarted"),
            (2, "ActivityScheduled"),
            (3, "CancelRequested"),
        ]
        messages_before = harness.count(
            db, outbox_messages, outbox_messages.c.aggregate_id == workflow_id
        )

        changed.engine.workflow_task(handle.run_id)

        run = handle.describe()
        assert run.status is RunStatus.RUNNING
        assert run.task_failure is not None
        assert run.task_failure.type == "NondeterminismError"
        message = run.task_failure.message
        assert "history event 2" in message
        assert "ActivityScheduled(activity reserve_inventory, id 1)" in message
        assert "ActivityScheduled(activity charge_payment, id 1)" in message
        assert [e.to_json() for e in handle.history()] == [e.to_json() for e in recorded]
        row = harness.run_row(db, handle.run_id)
        assert (row["processed_seq"], row["history_length"], row["task_failures"]) == (2, 3, 1)
        assert (
            harness.count(db, outbox_messages, outbox_messages.c.aggregate_id == workflow_id)
            == messages_before
        )

        # The same history replayed in memory: the released code accepts it
        # and reacts to the cancellation, the changed code is caught at event 2.
        defaults = ActivityDefaults(start_to_close=60, max_payload_bytes=2 * 1024 * 1024)
        released = WorkflowInstance(
            definition_of(OrderSaga),
            run_id=handle.run_id,
            workflow_id=workflow_id,
            defaults=defaults,
        )
        commands = released.advance(recorded, processed_seq=2)
        released.close()
        assert [(c.TYPE, getattr(c, "activity_type", None)) for c in commands] == [
            ("ActivityScheduled", "release_inventory")
        ]
        edited = WorkflowInstance(
            definition_of(ReorderedOrderSaga),
            run_id=handle.run_id,
            workflow_id=workflow_id,
            defaults=defaults,
        )
        with pytest.raises(NondeterminismError) as caught:
            edited.advance(recorded, processed_seq=2)
        edited.close()
        assert caught.value.seq == 2
        assert caught.value.recorded == "ActivityScheduled(activity reserve_inventory, id 1)"
        assert caught.value.issued == "ActivityScheduled(activity charge_payment, id 1)"
    finally:
        changed.close()
        harness.forget_run(db, workflow_id)
