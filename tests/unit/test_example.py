"""The order fulfilment example, end to end in embedded mode (SQLite, in-process broker)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic
import pytest
from sqlalchemy import Connection, func, insert, select

from activities import ActivityInfo, ApplicationError
from activities.context import activity_scope
from examples.order_fulfillment import activities as steps
from examples.order_fulfillment import services
from examples.order_fulfillment.app import ACTIVITIES, WORKFLOWS, build
from examples.order_fulfillment.demo import demo_orders, run_demo
from examples.order_fulfillment.models import (
    DECLINED_CARD,
    Address,
    LineItem,
    Order,
    OrderResult,
    Shipment,
    Simulation,
)
from examples.order_fulfillment.schema import (
    INITIAL_STOCK,
    inventory_reservations,
    inventory_stock,
    notifications,
    payments,
    shipments,
)
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator.app import Orchestrator
from orchestrator.client import WorkflowHandle
from orchestrator.definition import definition_of
from orchestrator.errors import WorkflowFailedError
from orchestrator.history import ActivityCompleted, ActivityScheduled
from orchestrator.instance import ActivityDefaults, WorkflowInstance
from orchestrator.policies import RunStatus
from orchestrator.schema import metadata as engine_metadata
from orchestrator.settings import EMBEDDED_BROKER, Settings

RESULT_TIMEOUT = 30


# -- fixtures and helpers ------------------------------------------------------------
@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite file that both the engine and the services use."""
    url = f"sqlite:///{tmp_path}/x.db"
    monkeypatch.setenv("ORCHESTRATOR_DATABASE_URL", url)
    services.reset_engine_cache()
    yield url
    services.reset_engine_cache()


@pytest.fixture
def orchestrator(database: str) -> Iterator[Orchestrator]:
    orch = build(
        Settings(database_url=database, broker_url=EMBEDDED_BROKER, scheduler_poll_seconds=0.05)
    )
    engine_metadata.create_all(orch.db)
    yield orch
    orch.close()


def make_order(order_id: str = "order-1", **changes: Any) -> Order:
    fields: dict[str, Any] = {
        "order_id": order_id,
        "customer_email": "customer@example.com",
        "items": [
            LineItem(sku="WIDGET", quantity=2, unit_price_cents=1250),
            LineItem(sku="GADGET", quantity=1, unit_price_cents=2499),
        ],
        "card_number": "4242424242424242",
        "address": Address(
            name="A Customer", street="1 Main Street", city="Sample City", country="GB"
        ),
    }
    fields.update(changes)
    return Order(**fields)


def start(orchestrator: Orchestrator, order: Order) -> WorkflowHandle:
    return orchestrator.client().start_workflow(OrderSaga, order, workflow_id=order.order_id)


def compensated(handle: WorkflowHandle) -> WorkflowFailedError:
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=RESULT_TIMEOUT)
    assert caught.value.status == RunStatus.COMPENSATED.value
    return caught.value


def root_cause(error: WorkflowFailedError) -> str:
    assert error.failure is not None
    assert error.failure.cause is not None
    return error.failure.cause.type


def scheduled(handle: WorkflowHandle, *, compensation: bool) -> list[str]:
    return [
        e.event.activity_type
        for e in handle.history()
        if isinstance(e.event, ActivityScheduled) and e.event.is_compensation is compensation
    ]


def stock() -> dict[str, int]:
    with services.get_engine().connect() as conn:
        rows = conn.execute(select(inventory_stock.c.sku, inventory_stock.c.available)).all()
    return {row.sku: row.available for row in rows}


def rows(conn: Connection, table: Any, order_id: str) -> list[Any]:
    return list(conn.execute(select(table).where(table.c.order_id == order_id)).mappings())


def info_for(
    activity_type: str, key: str, *, run_id: str = "run-1", attempt: int = 1
) -> ActivityInfo:
    now = datetime.now(UTC)
    return ActivityInfo(
        activity_id="1",
        activity_type=activity_type,
        workflow_id="order-1",
        workflow_type="OrderSaga",
        run_id=run_id,
        attempt=attempt,
        idempotency_key=key,
        task_queue="activities",
        scheduled_at=now,
        started_at=now,
        deadline=None,
    )


# -- the saga through the engine -----------------------------------------------------
def test_happy_path_fulfils_the_order_once(orchestrator: Orchestrator) -> None:
    order = make_order()
    handle = start(orchestrator, order)

    result = handle.result(timeout=RESULT_TIMEOUT)

    assert isinstance(result, OrderResult)
    assert result.order_id == order.order_id
    assert handle.describe().status is RunStatus.COMPLETED
    assert scheduled(handle, compensation=False) == [
        "reserve_inventory",
        "charge_payment",
        "create_shipment",
        "send_confirmation",
    ]
    assert scheduled(handle, compensation=True) == []
    with services.get_engine().connect() as conn:
        reserved = rows(conn, inventory_reservations, order.order_id)
        charged = rows(conn, payments, order.order_id)
        shipped = rows(conn, shipments, order.order_id)
        notified = rows(conn, notifications, order.order_id)
    assert {r["reservation_id"] for r in reserved} == {result.reservation_id}
    assert {(r["sku"], r["quantity"], r["status"]) for r in reserved} == {
        ("WIDGET", 2, "reserved"),
        ("GADGET", 1, "reserved"),
    }
    assert [(p["charge_id"], p["amount_cents"], p["status"]) for p in charged] == [
        (result.charge_id, 2 * 1250 + 2499, "charged")
    ]
    assert [(s["shipment_id"], s["tracking_number"], s["status"]) for s in shipped] == [
        (result.shipment_id, result.tracking_number, "created")
    ]
    assert [n["email"] for n in notified] == ["customer@example.com"]
    assert stock() == {**INITIAL_STOCK, "WIDGET": 998, "GADGET": 999}


def test_unshippable_address_compensates_in_reverse_order(orchestrator: Orchestrator) -> None:
    order = make_order(
        address=Address(name="A Customer", street="2 Unknown Road", city="Nowhere", country="XX")
    )
    handle = start(orchestrator, order)

    error = compensated(handle)

    assert root_cause(error) == "UnshippableAddress"
    assert scheduled(handle, compensation=True) == [
        "cancel_shipment",
        "refund_payment",
        "release_inventory",
    ]
    with services.get_engine().connect() as conn:
        charged = rows(conn, payments, order.order_id)
        reserved = rows(conn, inventory_reservations, order.order_id)
        assert rows(conn, shipments, order.order_id) == []
        assert rows(conn, notifications, order.order_id) == []
    assert [(p["status"], p["refunded_at"] is not None) for p in charged] == [("refunded", True)]
    assert {r["status"] for r in reserved} == {"released"}
    assert stock() == INITIAL_STOCK


def test_declined_card_compensates_without_charging(orchestrator: Orchestrator) -> None:
    order = make_order(card_number=DECLINED_CARD)
    handle = start(orchestrator, order)

    error = compensated(handle)

    assert root_cause(error) == "PaymentDeclined"
    assert scheduled(handle, compensation=False) == ["reserve_inventory", "charge_payment"]
    # Registered before the charge, so it runs although there is nothing to refund.
    assert scheduled(handle, compensation=True) == ["refund_payment", "release_inventory"]
    with services.get_engine().connect() as conn:
        assert rows(conn, payments, order.order_id) == []
    assert stock() == INITIAL_STOCK


def test_out_of_stock_reserves_nothing(orchestrator: Orchestrator) -> None:
    order = make_order(
        items=[
            LineItem(sku="WIDGET", quantity=1, unit_price_cents=1250),
            LineItem(sku="GIZMO", quantity=INITIAL_STOCK["GIZMO"] + 1, unit_price_cents=999),
        ]
    )
    handle = start(orchestrator, order)

    error = compensated(handle)

    assert root_cause(error) == "OutOfStock"
    assert scheduled(handle, compensation=True) == ["release_inventory"]
    with services.get_engine().connect() as conn:
        assert rows(conn, inventory_reservations, order.order_id) == []
    assert stock() == INITIAL_STOCK


def test_transient_failures_are_retried_and_charge_once(orchestrator: Orchestrator) -> None:
    order = make_order(
        simulate=Simulation(
            fail_first_attempts={
                "reserve_inventory": 1,
                "charge_payment": 2,
                "send_confirmation": 1,
            }
        )
    )
    handle = start(orchestrator, order)

    result = handle.result(timeout=RESULT_TIMEOUT)

    attempts = {
        e.event.activity_type: e.event.attempt
        for e in handle.history()
        if isinstance(e.event, ActivityCompleted)
    }
    assert attempts == {
        "reserve_inventory": 2,
        "charge_payment": 3,
        "create_shipment": 1,
        "send_confirmation": 2,
    }
    with services.get_engine().connect() as conn:
        charged = rows(conn, payments, order.order_id)
        assert len(rows(conn, notifications, order.order_id)) == 1
    assert [p["charge_id"] for p in charged] == [result.charge_id]
    assert stock() == {**INITIAL_STOCK, "WIDGET": 998, "GADGET": 999}


def test_completed_history_replays_without_new_commands(orchestrator: Orchestrator) -> None:
    handle = start(orchestrator, make_order())
    handle.result(timeout=RESULT_TIMEOUT)
    history = handle.history()

    # A fresh instance, as on another worker after a crash, must reissue exactly
    # the recorded commands: any difference raises NondeterminismError.
    instance = WorkflowInstance(
        definition_of(OrderSaga),
        run_id=handle.run_id,
        workflow_id=handle.workflow_id,
        defaults=ActivityDefaults(start_to_close=60, max_payload_bytes=1 << 20),
    )
    try:
        assert instance.advance(history, processed_seq=len(history)) == []
    finally:
        instance.close()


# -- each activity on its own: a repeated attempt writes once ------------------------
def test_reserve_twice_with_one_key_reserves_once(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("reserve_inventory", "key-r")):
        first = steps.reserve_inventory(order)
        second = steps.reserve_inventory(order)
    assert first == second
    with services.get_engine().connect() as conn:
        assert len(rows(conn, inventory_reservations, order.order_id)) == 2  # one per product
    assert stock() == {**INITIAL_STOCK, "WIDGET": 998, "GADGET": 999}


def test_reserve_merges_repeated_products(database: str) -> None:
    order = make_order(
        items=[
            LineItem(sku="WIDGET", quantity=2, unit_price_cents=1250),
            LineItem(sku="WIDGET", quantity=3, unit_price_cents=1250),
        ]
    )
    with activity_scope(info_for("reserve_inventory", "key-m")):
        steps.reserve_inventory(order)
    assert stock()["WIDGET"] == INITIAL_STOCK["WIDGET"] - 5


def test_release_twice_puts_stock_back_once(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("reserve_inventory", "key-r")):
        steps.reserve_inventory(order)
    with activity_scope(info_for("release_inventory", "key-u")):
        steps.release_inventory(order)
        steps.release_inventory(order)
    assert stock() == INITIAL_STOCK
    with services.get_engine().connect() as conn:
        assert {r["status"] for r in rows(conn, inventory_reservations, order.order_id)} == {
            "released"
        }


def test_release_touches_only_its_own_run(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("reserve_inventory", "key-a", run_id="run-a")):
        steps.reserve_inventory(order)
    with activity_scope(info_for("release_inventory", "key-b", run_id="run-b")):
        steps.release_inventory(order)  # a later run of the same order id reserved nothing
    assert stock() == {**INITIAL_STOCK, "WIDGET": 998, "GADGET": 999}


def test_charge_twice_with_one_key_charges_once(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("charge_payment", "key-c")):
        first = steps.charge_payment(order)
        second = steps.charge_payment(order)
    assert first == second
    with services.get_engine().connect() as conn:
        assert [p["charge_id"] for p in rows(conn, payments, order.order_id)] == [first]


def test_concurrent_charges_with_one_key_charge_once(database: str) -> None:
    order = make_order()
    services.get_engine()  # tables first, so the threads race on the charge only
    results: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        with activity_scope(info_for("charge_payment", "key-c")):
            charge_id = steps.charge_payment(order)
        with lock:
            results.append(charge_id)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6
    assert len(set(results)) == 1
    with services.get_engine().connect() as conn:
        assert len(rows(conn, payments, order.order_id)) == 1


def test_charge_that_loses_a_race_returns_the_winners_charge(database: str) -> None:
    order = make_order()
    engine = services.get_engine()
    reads: list[str | None] = []

    def read(conn: Connection) -> str | None:
        # The first read misses the row, as when two attempts read before either commits.
        found = conn.scalar(select(payments.c.charge_id).where(payments.c.idempotency_key == "k"))
        reads.append(found)
        return found if len(reads) > 1 else None

    def write(conn: Connection) -> str:
        conn.execute(
            insert(payments).values(
                idempotency_key="k",
                charge_id="ch_loser",
                order_id=order.order_id,
                run_id="run-1",
                amount_cents=1,
                status="charged",
                created_at=datetime.now(UTC),
            )
        )
        return "ch_loser"

    with engine.begin() as conn:
        conn.execute(
            insert(payments).values(
                idempotency_key="k",
                charge_id="ch_winner",
                order_id=order.order_id,
                run_id="run-1",
                amount_cents=1,
                status="charged",
                created_at=datetime.now(UTC),
            )
        )

    assert steps._once(read, write) == ("ch_winner", False)


def test_declined_card_writes_nothing(database: str) -> None:
    order = make_order(card_number=DECLINED_CARD)
    with (
        activity_scope(info_for("charge_payment", "key-d")),
        pytest.raises(ApplicationError) as caught,
    ):
        steps.charge_payment(order)
    assert (caught.value.type, caught.value.non_retryable) == ("PaymentDeclined", True)
    with services.get_engine().connect() as conn:
        assert rows(conn, payments, order.order_id) == []


def test_refund_twice_refunds_once(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("charge_payment", "key-c")):
        steps.charge_payment(order)
    with activity_scope(info_for("refund_payment", "key-f")):
        steps.refund_payment(order)
        with services.get_engine().connect() as conn:
            refunded_at = rows(conn, payments, order.order_id)[0]["refunded_at"]
        steps.refund_payment(order)
    with services.get_engine().connect() as conn:
        charged = rows(conn, payments, order.order_id)
    assert [(p["status"], p["refunded_at"]) for p in charged] == [("refunded", refunded_at)]


def test_refund_gateway_down_is_retryable(database: str) -> None:
    order = make_order(simulate=Simulation(refund_fails=True))
    with (
        activity_scope(info_for("refund_payment", "key-f", attempt=7)),
        pytest.raises(ApplicationError) as caught,
    ):
        steps.refund_payment(order)
    assert (caught.value.type, caught.value.non_retryable) == ("RefundGatewayDown", False)


def test_shipment_twice_with_one_key_ships_once(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("create_shipment", "key-s")):
        first = steps.create_shipment(order)
        second = steps.create_shipment(order)
    assert isinstance(first, Shipment)
    assert first == second
    with services.get_engine().connect() as conn:
        assert len(rows(conn, shipments, order.order_id)) == 1


def test_cancel_shipment_twice_cancels_once(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("create_shipment", "key-s")):
        steps.create_shipment(order)
    with activity_scope(info_for("cancel_shipment", "key-x")):
        steps.cancel_shipment(order)
        with services.get_engine().connect() as conn:
            cancelled_at = rows(conn, shipments, order.order_id)[0]["cancelled_at"]
        steps.cancel_shipment(order)
    with services.get_engine().connect() as conn:
        shipped = rows(conn, shipments, order.order_id)
    assert [(s["status"], s["cancelled_at"]) for s in shipped] == [("cancelled", cancelled_at)]


def test_confirmation_twice_with_one_key_sends_once(database: str) -> None:
    order = make_order()
    with activity_scope(info_for("send_confirmation", "key-n")):
        steps.send_confirmation(order)
        steps.send_confirmation(order)
    with services.get_engine().connect() as conn:
        assert len(rows(conn, notifications, order.order_id)) == 1


def test_simulated_failures_stop_after_the_configured_attempts(database: str) -> None:
    order = make_order(simulate=Simulation(fail_first_attempts={"charge_payment": 2}))
    for attempt in (1, 2):
        with (
            activity_scope(info_for("charge_payment", "key-t", attempt=attempt)),
            pytest.raises(ApplicationError) as caught,
        ):
            steps.charge_payment(order)
        assert (caught.value.type, caught.value.non_retryable) == ("TransientError", False)
    with services.get_engine().connect() as conn:
        assert rows(conn, payments, order.order_id) == []
    with activity_scope(info_for("charge_payment", "key-t", attempt=3)):
        steps.charge_payment(order)


# -- the services' bootstrap, the app module and the models --------------------------
def test_engine_bootstrap_is_idempotent_and_keeps_moved_stock(database: str) -> None:
    with activity_scope(info_for("reserve_inventory", "key-r")):
        steps.reserve_inventory(make_order())
    moved = stock()
    services.reset_engine_cache()
    assert stock() == moved  # a second bootstrap neither duplicates nor resets rows
    with services.get_engine().connect() as conn:
        assert conn.scalar(select(func.count()).select_from(inventory_stock)) == len(INITIAL_STOCK)


def test_app_registers_everything_and_connects_to_nothing() -> None:
    from examples.order_fulfillment import app

    assert {a.__name__ for a in ACTIVITIES} == {
        "reserve_inventory",
        "release_inventory",
        "charge_payment",
        "refund_payment",
        "create_shipment",
        "cancel_shipment",
        "send_confirmation",
    }
    assert list(WORKFLOWS) == [OrderSaga]
    assert set(app.orchestrator.registry.activities) == {a.__name__ for a in ACTIVITIES}
    assert app.orchestrator.registry.has_workflow("OrderSaga")
    assert app.orchestrator._db is None
    assert app.orchestrator._publisher is None
    assert app.celery is app.orchestrator.celery


def test_order_model_validates_and_totals() -> None:
    fulfilled, unshippable = demo_orders()
    assert fulfilled.total_cents == 2 * 1250 + 2499
    assert unshippable.address.country == "XX"
    assert make_order().simulate == Simulation()
    with pytest.raises(pydantic.ValidationError):
        make_order(items=[])
    with pytest.raises(pydantic.ValidationError):
        LineItem(sku="WIDGET", quantity=0, unit_price_cents=1)
    with pytest.raises(pydantic.ValidationError):
        Address(name="A", street="B", city="C", country="GBR")


# -- the demo ------------------------------------------------------------------------
def test_demo_reports_both_outcomes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCHESTRATOR_DATABASE_URL", raising=False)
    services.reset_engine_cache()
    out = io.StringIO()

    code = run_demo(out, database_url=f"sqlite:///{tmp_path}/demo.db")

    text = out.getvalue()
    assert code == 0, text
    assert "order-1001  COMPLETED" in text
    assert "order-1002  COMPENSATED" in text
    assert "UnshippableAddress" in text
    assert "release_inventory  [compensation]" in text
    assert "refunded" in text


def test_demo_in_a_temporary_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCHESTRATOR_DATABASE_URL", raising=False)
    out = io.StringIO()
    assert run_demo(out) == 0, out.getvalue()


def test_demo_json_parses(tmp_path: Path) -> None:
    out = io.StringIO()

    code = run_demo(out, database_url=f"sqlite:///{tmp_path}/demo.db", as_json=True)

    document = json.loads(out.getvalue())
    assert code == 0
    assert document["ok"] is True
    statuses = {
        run["description"]["workflow_id"]: run["description"]["status"] for run in document["runs"]
    }
    assert statuses == {"order-1001": "COMPLETED", "order-1002": "COMPENSATED"}
    compensations = [
        event["attributes"]["activity_type"]
        for event in document["runs"][1]["history"]
        if event["type"] == "ActivityScheduled" and event["attributes"]["is_compensation"]
    ]
    assert compensations == ["cancel_shipment", "refund_payment", "release_inventory"]
    assert {sku: s["after"] - s["before"] for sku, s in document["balances"]["stock"].items()} == {
        "WIDGET": -2,
        "GADGET": -1,
        "GIZMO": 0,
    }
