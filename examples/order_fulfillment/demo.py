"""Two orders through the saga, in one process, with nothing to install or start.

``python -m examples.order_fulfillment.demo`` runs the orchestrator embedded
(SQLite and an in-process broker) and starts two orders: ``order-1001``, which
is fulfilled, and ``order-1002``, addressed to a country that cannot be shipped
to, whose payment is refunded and stock released. It prints each run's
timeline from its history and the services' balances afterwards; ``--json``
prints the same as one JSON document. The exit status is 0 when both runs ended
as expected and the stock of the failed order is back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import select

from activities.failure import Failure
from examples.order_fulfillment import services
from examples.order_fulfillment.app import build
from examples.order_fulfillment.models import Address, LineItem, Order
from examples.order_fulfillment.schema import (
    inventory_stock,
    notifications,
    payments,
    shipments,
)
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator.client import RunDescription
from orchestrator.errors import ResultTimeoutError, WorkflowFailedError
from orchestrator.history import (
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    RecordedEvent,
    WorkflowCompensated,
)
from orchestrator.policies import RunStatus
from orchestrator.schema import metadata as engine_metadata
from orchestrator.settings import EMBEDDED_BROKER, Settings

__all__ = ["demo_orders", "main", "run_demo"]

RESULT_TIMEOUT = 30.0


def demo_orders() -> tuple[Order, Order]:
    """The order that goes through, and the one that cannot be shipped."""
    fulfilled = Order(
        order_id="order-1001",
        customer_email="customer-1001@example.com",
        items=[
            LineItem(sku="WIDGET", quantity=2, unit_price_cents=1250),
            LineItem(sku="GADGET", quantity=1, unit_price_cents=2499),
        ],
        card_number="4242424242424242",
        address=Address(
            name="Customer 1001", street="1 Main Street", city="Sample City", country="GB"
        ),
    )
    unshippable = Order(
        order_id="order-1002",
        customer_email="customer-1002@example.com",
        items=[
            LineItem(sku="GIZMO", quantity=3, unit_price_cents=999),
            LineItem(sku="WIDGET", quantity=1, unit_price_cents=1250),
        ],
        card_number="4242424242424242",
        address=Address(
            name="Customer 1002", street="2 Unknown Road", city="Nowhere", country="XX"
        ),
    )
    return fulfilled, unshippable


@dataclass(frozen=True)
class _Run:
    description: RunDescription
    history: list[RecordedEvent]


def run_demo(out: TextIO, *, database_url: str | None = None, as_json: bool = False) -> int:
    """Run both orders embedded and report on ``out``; 0 if both ended as expected.

    ``database_url`` defaults to a new SQLite file in a temporary directory,
    removed afterwards. On a database that already holds stock, the stock is
    checked against what it was before the demo, not against the initial stock.
    """
    if database_url is not None:
        return _run_demo(out, database_url, as_json)
    with tempfile.TemporaryDirectory(prefix="orders-demo-") as directory:
        return _run_demo(out, f"sqlite:///{Path(directory) / 'demo.db'}", as_json)


def _run_demo(out: TextIO, database_url: str, as_json: bool) -> int:
    orchestrator = build(Settings(broker_url=EMBEDDED_BROKER, database_url=database_url))
    with services.use_database(database_url):
        try:
            engine_metadata.create_all(orchestrator.db)
            stock_before = _stock()
            client = orchestrator.client()
            fulfilled, unshippable = demo_orders()
            handles = [
                client.start_workflow(OrderSaga, order, workflow_id=order.order_id)
                for order in (fulfilled, unshippable)
            ]
            for handle in handles:
                # The description below says how each ended (or that it did not).
                with contextlib.suppress(WorkflowFailedError, ResultTimeoutError):
                    handle.result(timeout=RESULT_TIMEOUT)
            runs = [_Run(h.describe(), h.history()) for h in handles]
            balances = _balances(stock_before, [h.run_id for h in handles])
        finally:
            # Workers first: they may still be using the services' engine.
            orchestrator.close()
            services.reset_engine_cache(database_url)
    ok = _as_expected(runs, balances, fulfilled)
    if as_json:
        document = {
            "database_url": database_url,
            "runs": [
                {
                    "description": run.description.to_json(),
                    "history": [event.to_json() for event in run.history],
                }
                for run in runs
            ],
            "balances": balances,
            "ok": ok,
        }
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        _print_report(out, database_url, runs, balances, ok)
    return 0 if ok else 1


# -- checks and balances -------------------------------------------------------------
def _stock() -> dict[str, int]:
    with services.get_engine().connect() as conn:
        rows = conn.execute(
            select(inventory_stock.c.sku, inventory_stock.c.available).order_by(
                inventory_stock.c.sku
            )
        ).all()
    return {row.sku: row.available for row in rows}


def _balances(stock_before: dict[str, int], run_ids: list[str]) -> dict[str, Any]:
    """The services' rows written by these runs, and the stock before and after."""
    stock_after = _stock()
    with services.get_engine().connect() as conn:
        charged = conn.execute(
            select(payments.c.order_id, payments.c.amount_cents, payments.c.status)
            .where(payments.c.run_id.in_(run_ids))
            .order_by(payments.c.order_id, payments.c.created_at)
        ).all()
        shipped = conn.execute(
            select(shipments.c.order_id, shipments.c.tracking_number, shipments.c.status)
            .where(shipments.c.run_id.in_(run_ids))
            .order_by(shipments.c.order_id, shipments.c.created_at)
        ).all()
        notified = conn.execute(
            select(notifications.c.order_id, notifications.c.email, notifications.c.subject)
            .where(notifications.c.run_id.in_(run_ids))
            .order_by(notifications.c.order_id, notifications.c.created_at)
        ).all()
    return {
        "stock": {
            sku: {"before": stock_before.get(sku, 0), "after": stock_after.get(sku, 0)}
            for sku in sorted(set(stock_before) | set(stock_after))
        },
        "payments": [
            {"order_id": order_id, "amount_cents": amount, "status": status}
            for order_id, amount, status in charged
        ],
        "shipments": [
            {"order_id": order_id, "tracking_number": tracking, "status": status}
            for order_id, tracking, status in shipped
        ],
        "notifications": [
            {"order_id": order_id, "email": email, "subject": subject}
            for order_id, email, subject in notified
        ],
    }


def _as_expected(runs: list[_Run], balances: dict[str, Any], fulfilled: Order) -> bool:
    """The first run completed, the second compensated, and only the first kept stock."""
    statuses = [run.description.status for run in runs]
    if statuses != [RunStatus.COMPLETED, RunStatus.COMPENSATED]:
        return False
    taken: dict[str, int] = {}
    for item in fulfilled.items:
        taken[item.sku] = taken.get(item.sku, 0) + item.quantity
    return all(
        levels["after"] == levels["before"] - taken.get(sku, 0)
        for sku, levels in balances["stock"].items()
    )


# -- the readable report -------------------------------------------------------------
def _print_report(
    out: TextIO, database_url: str, runs: list[_Run], balances: dict[str, Any], ok: bool
) -> None:
    out.write(f"Order fulfilment demo (embedded, {database_url})\n")
    for run in runs:
        out.write("\n")
        _print_run(out, run)
    out.write("\n")
    _print_balances(out, balances)
    out.write("\n")
    if ok:
        out.write("OK: order-1001 COMPLETED; order-1002 COMPENSATED (refunded, stock released).\n")
    else:
        out.write("UNEXPECTED: see the statuses and balances above.\n")


def _print_run(out: TextIO, run: _Run) -> None:
    description = run.description
    out.write(f"{description.workflow_id}  {description.status.value}\n")
    if description.status is RunStatus.COMPLETED and isinstance(description.result, dict):
        result = description.result
        out.write(
            f"  result: reservation {result.get('reservation_id')}, "
            f"charge {result.get('charge_id')}, shipment {result.get('shipment_id')}, "
            f"tracking {result.get('tracking_number')}\n"
        )
    elif description.failure is not None:
        out.write(f"  cause: {_cause(description.failure)}\n")
    start = run.history[0].created_at if run.history else description.created_at
    activities: dict[str, ActivityScheduled] = {}
    for recorded in run.history:
        event = recorded.event
        offset = round((recorded.created_at - start).total_seconds() * 1000)
        detail = ""
        if isinstance(event, ActivityScheduled):
            activities[event.activity_id] = event
            detail = _activity_label(event)
        elif isinstance(event, ActivityCompleted | ActivityFailed):
            scheduled = activities.get(event.activity_id)
            detail = _activity_label(scheduled) if scheduled else event.activity_type
            if event.attempt > 1:
                detail += f"  (attempt {event.attempt})"
            if isinstance(event, ActivityFailed):
                detail += f"  {event.failure.get('type')}"
        elif isinstance(event, WorkflowCompensated):
            detail = f"{event.compensations} compensation(s) ran"
        out.write(f"  {'+' + str(offset):>7} ms  {event.TYPE:<20} {detail}".rstrip() + "\n")


def _activity_label(event: ActivityScheduled) -> str:
    return (
        f"{event.activity_type}  [compensation]" if event.is_compensation else event.activity_type
    )


def _cause(failure: Failure) -> str:
    # An activity's failure arrives wrapped; its message already names the
    # activity and the original error type.
    if failure.type == "ActivityError":
        return failure.message
    return f"{failure.type}: {failure.message}"


def _print_balances(out: TextIO, balances: dict[str, Any]) -> None:
    out.write("Balances\n")
    out.write("  stock (before -> after)\n")
    for sku, levels in balances["stock"].items():
        change = levels["after"] - levels["before"]
        note = f"  ({change:+d})" if change else ""
        line = f"    {sku:<8} {levels['before']:>6} -> {levels['after']:<6}{note}"
        out.write(line.rstrip() + "\n")
    out.write("  payments\n")
    for row in balances["payments"] or [{"order_id": "(none)", "amount_cents": 0, "status": ""}]:
        out.write(f"    {row['order_id']:<12} {row['amount_cents']:>7} cents  {row['status']}\n")
    out.write("  shipments\n")
    for row in balances["shipments"]:
        out.write(f"    {row['order_id']:<12} {row['status']:<10} {row['tracking_number']}\n")
    if not balances["shipments"]:
        out.write("    (none)\n")
    out.write("  notifications\n")
    for row in balances["notifications"]:
        out.write(f"    {row['order_id']:<12} to {row['email']}: {row['subject']}\n")
    if not balances["notifications"]:
        out.write("    (none)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.order_fulfillment.demo",
        description="Run two orders through the order saga, embedded.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL to use (default: a temporary SQLite file)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run_demo(sys.stdout, database_url=args.database_url, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
