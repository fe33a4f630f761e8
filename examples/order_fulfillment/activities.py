"""The steps of an order and their compensations, against the services' tables.

Each forward step does its work in one transaction keyed by
``activity.info().idempotency_key``, which is the same for every attempt of a
step: an attempt that finds the key already used returns what the earlier
attempt recorded and writes nothing. A retry after a crash, a timeout or a
redelivered message therefore never reserves, charges or ships twice.

Compensations undo what the forward step did for the same saga run (they are
registered before the step, so they may find nothing to undo) by moving rows
from one status to the next, which a second call finds already done.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

import activities as activity
from activities import ApplicationError, RetryPolicy
from examples.order_fulfillment.models import (
    DECLINED_CARD,
    UNSHIPPABLE_COUNTRY,
    Order,
    Shipment,
)
from examples.order_fulfillment.schema import (
    inventory_reservations,
    inventory_stock,
    notifications,
    payments,
    shipments,
)
from examples.order_fulfillment.services import get_engine, is_down

__all__ = [
    "cancel_shipment",
    "charge_payment",
    "create_shipment",
    "refund_payment",
    "release_inventory",
    "reserve_inventory",
    "send_confirmation",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

START_TO_CLOSE = timedelta(seconds=10)

STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=300),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=5,
)
"""Forward steps: a few quick retries, then the saga compensates."""

COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=10,
)
"""Compensations: a failed one leaves the order half undone, so they try longer."""

NOTIFICATION_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=10,
)
"""The confirmation: the order stands whether or not it goes out, so it may take its time."""


# -- helpers ------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(UTC)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def _simulate_transient_failure(order: Order) -> None:
    """Fail the first attempts an order's simulation asks for, before doing anything."""
    info = activity.info()
    failures = order.simulate.fail_first_attempts.get(info.activity_type, 0)
    if info.attempt <= failures:
        raise ApplicationError(
            f"simulated transient failure of {info.activity_type} "
            f"(attempt {info.attempt} of {failures} failing)",
            type="TransientError",
        )


def _once(
    read: Callable[[Connection], T | None], write: Callable[[Connection], T]
) -> tuple[T, bool]:
    """Return what an earlier attempt with this key recorded, else ``write`` it.

    Both run in one transaction. Returns the value and whether this call wrote it.
    """
    engine = get_engine()
    try:
        with engine.begin() as conn:
            found = read(conn)
            if found is not None:
                return found, False
            return write(conn), True
    except IntegrityError:
        # On PostgreSQL two attempts of one step can both see no row (one timed
        # out but still runs); the key's primary key lets only one insert win,
        # and the loser's whole transaction rolls back.
        with engine.begin() as conn:
            found = read(conn)
        if found is None:
            raise
        return found, False


def _quantities(order: Order) -> dict[str, int]:
    """Quantity per product, in a fixed order so that concurrent orders lock rows alike."""
    totals: dict[str, int] = {}
    for item in order.items:
        totals[item.sku] = totals.get(item.sku, 0) + item.quantity
    return dict(sorted(totals.items()))


# -- inventory ---------------------------------------------------------------------
@activity.defn(start_to_close=START_TO_CLOSE, retry_policy=STEP_RETRY)
def reserve_inventory(order: Order) -> str:
    """Take the order's items out of stock; return the reservation id.

    Raises a non-retryable ``OutOfStock`` (and reserves nothing) if any product
    is unknown or short.
    """
    _simulate_transient_failure(order)
    info = activity.info()
    key = info.idempotency_key

    def read(conn: Connection) -> str | None:
        return conn.scalar(
            select(inventory_reservations.c.reservation_id)
            .where(inventory_reservations.c.idempotency_key == key)
            .limit(1)
        )

    def write(conn: Connection) -> str:
        reservation_id = _new_id("rsv")
        quantities = _quantities(order)
        now = _now()
        # One multi-row statement rather than an executemany: a duplicate key
        # then fails as a single statement on every driver.
        conn.execute(
            insert(inventory_reservations).values(
                [
                    {
                        "idempotency_key": key,
                        "sku": sku,
                        "reservation_id": reservation_id,
                        "order_id": order.order_id,
                        "run_id": info.run_id,
                        "quantity": quantity,
                        "status": "reserved",
                        "created_at": now,
                    }
                    for sku, quantity in quantities.items()
                ]
            )
        )
        for sku, quantity in quantities.items():
            # The condition makes check-and-decrement one statement, so two
            # orders cannot both take the last units.
            taken = conn.execute(
                update(inventory_stock)
                .where(inventory_stock.c.sku == sku, inventory_stock.c.available >= quantity)
                .values(available=inventory_stock.c.available - quantity)
            ).rowcount
            if taken != 1:
                available = conn.scalar(
                    select(inventory_stock.c.available).where(inventory_stock.c.sku == sku)
                )
                reason = "is not a known product" if available is None else "is short"
                raise ApplicationError(
                    f"{sku} {reason}: {quantity} requested, {available or 0} available",
                    type="OutOfStock",
                    non_retryable=True,
                    details={"sku": sku, "requested": quantity, "available": available},
                )
        return reservation_id

    reservation_id, created = _once(read, write)
    log.info(
        "reservation %s for order %s%s",
        reservation_id,
        order.order_id,
        "" if created else " (already made)",
    )
    return reservation_id


@activity.defn(start_to_close=START_TO_CLOSE, retry_policy=COMPENSATION_RETRY)
def release_inventory(order: Order) -> None:
    """Put back the stock this saga run reserved for the order; nothing if none is held."""
    _simulate_transient_failure(order)
    info = activity.info()
    with get_engine().begin() as conn:
        # Flipping the status and reading what was flipped in one statement means
        # a concurrent or repeated release finds nothing left to put back.
        released = conn.execute(
            update(inventory_reservations)
            .where(
                inventory_reservations.c.order_id == order.order_id,
                inventory_reservations.c.run_id == info.run_id,
                inventory_reservations.c.status == "reserved",
            )
            .values(status="released", released_at=_now())
            .returning(inventory_reservations.c.sku, inventory_reservations.c.quantity)
        ).all()
        totals: dict[str, int] = {}
        for sku, quantity in released:
            totals[sku] = totals.get(sku, 0) + quantity
        for sku, quantity in sorted(totals.items()):
            conn.execute(
                update(inventory_stock)
                .where(inventory_stock.c.sku == sku)
                .values(available=inventory_stock.c.available + quantity)
            )
    log.info("released %d reserved line(s) of order %s", len(released), order.order_id)


# -- payments ----------------------------------------------------------------------
@activity.defn(start_to_close=START_TO_CLOSE, retry_policy=STEP_RETRY)
def charge_payment(order: Order) -> str:
    """Charge the order's total to its card; return the charge id.

    The card ``4000000000000002`` is declined with a non-retryable
    ``PaymentDeclined`` before anything is written. After a new charge is
    committed, the attempt sleeps ``order.simulate.charge_delay_seconds``; an
    attempt that finds the charge already made returns at once, so a retry is
    never held up by the delay that an earlier attempt died in.
    """
    _simulate_transient_failure(order)
    if order.card_number == DECLINED_CARD:
        raise ApplicationError(
            f"card ending {order.card_number[-4:]} was declined",
            type="PaymentDeclined",
            non_retryable=True,
        )
    info = activity.info()
    key = info.idempotency_key

    def read(conn: Connection) -> str | None:
        return conn.scalar(select(payments.c.charge_id).where(payments.c.idempotency_key == key))

    def write(conn: Connection) -> str:
        charge_id = _new_id("ch")
        conn.execute(
            insert(payments).values(
                idempotency_key=key,
                charge_id=charge_id,
                order_id=order.order_id,
                run_id=info.run_id,
                amount_cents=order.total_cents,
                status="charged",
                created_at=_now(),
            )
        )
        return charge_id

    charge_id, created = _once(read, write)
    log.info(
        "charge %s of %d cents for order %s%s",
        charge_id,
        order.total_cents,
        order.order_id,
        "" if created else " (already made)",
    )
    if created and order.simulate.charge_delay_seconds > 0:
        time.sleep(order.simulate.charge_delay_seconds)
    return charge_id


@activity.defn(start_to_close=START_TO_CLOSE, retry_policy=COMPENSATION_RETRY)
def refund_payment(order: Order) -> None:
    """Refund what this saga run charged for the order; nothing if nothing was charged.

    With ``order.simulate.refund_fails``, or while the ``refunds`` gateway is marked
    down (:func:`services.set_outage`), every attempt raises a retryable
    ``RefundGatewayDown``; once its retries run out the refund is dead-lettered.
    """
    _simulate_transient_failure(order)
    if order.simulate.refund_fails or is_down("refunds"):
        raise ApplicationError("the refund gateway is unavailable", type="RefundGatewayDown")
    info = activity.info()
    with get_engine().begin() as conn:
        refunded = conn.execute(
            update(payments)
            .where(
                payments.c.order_id == order.order_id,
                payments.c.run_id == info.run_id,
                payments.c.status == "charged",
            )
            .values(status="refunded", refunded_at=_now())
        ).rowcount
    log.info("refunded %d charge(s) of order %s", refunded, order.order_id)


# -- shipping ----------------------------------------------------------------------
@activity.defn(start_to_close=START_TO_CLOSE, retry_policy=STEP_RETRY)
def create_shipment(order: Order) -> Shipment:
    """Book the order's shipment; return its id and tracking number.

    An address in country ``XX`` raises a non-retryable ``UnshippableAddress``.
    """
    _simulate_transient_failure(order)
    if order.address.country == UNSHIPPABLE_COUNTRY:
        raise ApplicationError(
            f"cannot ship to country {order.address.country}",
            type="UnshippableAddress",
            non_retryable=True,
        )
    info = activity.info()
    key = info.idempotency_key

    def read(conn: Connection) -> Shipment | None:
        row = conn.execute(
            select(shipments.c.shipment_id, shipments.c.tracking_number).where(
                shipments.c.idempotency_key == key
            )
        ).first()
        return None if row is None else Shipment(shipment_id=row[0], tracking_number=row[1])

    def write(conn: Connection) -> Shipment:
        shipment = Shipment(
            shipment_id=_new_id("shp"), tracking_number=f"TRK{uuid.uuid4().hex[:12].upper()}"
        )
        conn.execute(
            insert(shipments).values(
                idempotency_key=key,
                shipment_id=shipment.shipment_id,
                order_id=order.order_id,
                run_id=info.run_id,
                tracking_number=shipment.tracking_number,
                status="created",
                created_at=_now(),
            )
        )
        return shipment

    shipment, created = _once(read, write)
    log.info(
        "shipment %s for order %s%s",
        shipment.shipment_id,
        order.order_id,
        "" if created else " (already booked)",
    )
    return shipment


@activity.defn(start_to_close=START_TO_CLOSE, retry_policy=COMPENSATION_RETRY)
def cancel_shipment(order: Order) -> None:
    """Cancel the shipment this saga run booked for the order; nothing if none was."""
    _simulate_transient_failure(order)
    info = activity.info()
    with get_engine().begin() as conn:
        cancelled = conn.execute(
            update(shipments)
            .where(
                shipments.c.order_id == order.order_id,
                shipments.c.run_id == info.run_id,
                shipments.c.status == "created",
            )
            .values(status="cancelled", cancelled_at=_now())
        ).rowcount
    log.info("cancelled %d shipment(s) of order %s", cancelled, order.order_id)


# -- notifications -----------------------------------------------------------------
@activity.defn(start_to_close=START_TO_CLOSE, retry_policy=NOTIFICATION_RETRY)
def send_confirmation(order: Order) -> None:
    """Queue the confirmation e-mail of a fulfilled order (once, however often retried)."""
    _simulate_transient_failure(order)
    info = activity.info()
    key = info.idempotency_key

    def read(conn: Connection) -> bool | None:
        found = conn.scalar(
            select(notifications.c.idempotency_key).where(notifications.c.idempotency_key == key)
        )
        return None if found is None else True

    def write(conn: Connection) -> bool:
        lines = "\n".join(
            f"  {item.quantity} x {item.sku} at {item.unit_price_cents / 100:.2f}"
            for item in order.items
        )
        conn.execute(
            insert(notifications).values(
                idempotency_key=key,
                order_id=order.order_id,
                run_id=info.run_id,
                email=order.customer_email,
                subject=f"Your order {order.order_id} is on its way",
                body=(
                    f"Hello {order.address.name},\n\n{lines}\n"
                    f"Total charged: {order.total_cents / 100:.2f}\n"
                ),
                created_at=_now(),
            )
        )
        return True

    _, created = _once(read, write)
    log.info(
        "confirmation of order %s %s",
        order.order_id,
        "queued" if created else "was already queued",
    )
