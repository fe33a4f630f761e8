"""The tables of the example's services: inventory, payments, shipping, notifications.

They live on their own :data:`metadata`, not the engine's: they stand for
systems the orchestrator does not own, and the engine's migrations must never
create or drop them. They share its database only so that the example needs
nothing more to run.

Each forward step writes rows keyed by the activity's idempotency key, so a
retried attempt finds what an earlier attempt wrote. Rows also record the saga
run that wrote them (``run_id``): compensations undo that run's work only,
even when an order id is reused by a later run.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "INITIAL_STOCK",
    "gateway_outages",
    "inventory_reservations",
    "inventory_stock",
    "metadata",
    "notifications",
    "payments",
    "shipments",
]

INITIAL_STOCK: dict[str, int] = {"WIDGET": 1000, "GADGET": 1000, "GIZMO": 1000}
"""Stock each product starts with, inserted when missing."""

metadata = MetaData()

# Idempotency keys embed the workflow id (up to 255 characters), the run id and
# the activity id.
_KEY = 320

inventory_stock = Table(
    "inventory_stock",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("available", Integer, nullable=False),
    CheckConstraint("available >= 0", name="ck_inventory_stock_available"),
)

inventory_reservations = Table(
    "inventory_reservations",
    metadata,
    # One row per product of a reservation; all rows of one share the key.
    Column("idempotency_key", String(_KEY), primary_key=True),
    Column("sku", String(64), primary_key=True),
    Column("reservation_id", String(64), nullable=False),
    Column("order_id", String(128), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # reserved | released
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("released_at", DateTime(timezone=True), nullable=True),
)
Index("ix_inventory_reservations_order", inventory_reservations.c.order_id)

payments = Table(
    "payments",
    metadata,
    Column("idempotency_key", String(_KEY), primary_key=True),
    Column("charge_id", String(64), nullable=False, unique=True),
    Column("order_id", String(128), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("amount_cents", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # charged | refunded
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("refunded_at", DateTime(timezone=True), nullable=True),
)
Index("ix_payments_order", payments.c.order_id)

shipments = Table(
    "shipments",
    metadata,
    Column("idempotency_key", String(_KEY), primary_key=True),
    Column("shipment_id", String(64), nullable=False, unique=True),
    Column("order_id", String(128), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("tracking_number", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # created | cancelled
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("cancelled_at", DateTime(timezone=True), nullable=True),
)
Index("ix_shipments_order", shipments.c.order_id)

gateway_outages = Table(
    "gateway_outages",
    metadata,
    # A row per downstream service that is down (the refund gateway, say): lets a
    # demo or a test break a compensation and fix it again while runs are in flight.
    Column("service", String(64), primary_key=True),
    Column("since", DateTime(timezone=True), nullable=False),
)

notifications = Table(
    "notifications",
    metadata,
    Column("idempotency_key", String(_KEY), primary_key=True),
    Column("order_id", String(128), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("email", String(320), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
