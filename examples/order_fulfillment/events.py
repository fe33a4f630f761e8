"""The domain events of the order saga, under stable names.

The saga emits them as it goes; peripheral services (notifications,
analytics) subscribe to them instead of being steps of the saga. Names are
routing keys and never change; a payload change old readers cannot take gets
a new class under the same name with the next version.

Step events carry when the step started and finished by the workflow's own
deterministic clock, so a replay emits the very same event.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from events import DomainEvent, event_type

__all__ = [
    "InventoryReserved",
    "OrderCompensated",
    "OrderCompleted",
    "PaymentCharged",
    "ShipmentCreated",
    "StepCompleted",
]


@event_type("order.completed", version=1)
class OrderCompleted(DomainEvent):
    """The order was reserved, paid and shipped."""

    order_id: str
    customer_email: str
    total_cents: int
    charge_id: str
    shipment_id: str
    tracking_number: str


@event_type("order.compensated", version=1)
class OrderCompensated(DomainEvent):
    """A step failed for good and the steps done before it were undone.

    Attributes:
        failed_step: The activity that failed (``"create_shipment"``...).
        reason: The failure's type (``"UnshippableAddress"``...).
        message: The failure's message. Defaults to empty.
    """

    order_id: str
    customer_email: str
    total_cents: int
    failed_step: str
    reason: str
    message: str = ""


class StepCompleted(DomainEvent):
    """Base of the events of one saga step: when it started and finished.

    Attributes:
        STEP: The activity the step runs, set by each subclass.
    """

    STEP: ClassVar[str]

    order_id: str
    started_at: datetime
    finished_at: datetime

    @property
    def latency_ms(self) -> int:
        """Milliseconds from the step's start to its finish (never negative)."""
        return max(0, round((self.finished_at - self.started_at).total_seconds() * 1000))


@event_type("order.inventory_reserved", version=1)
class InventoryReserved(StepCompleted):
    """Stock for every line of the order is held."""

    STEP: ClassVar[str] = "reserve_inventory"

    reservation_id: str


@event_type("order.payment_charged", version=1)
class PaymentCharged(StepCompleted):
    """The customer's card was charged."""

    STEP: ClassVar[str] = "charge_payment"

    charge_id: str
    amount_cents: int


@event_type("order.shipment_created", version=1)
class ShipmentCreated(StepCompleted):
    """The carrier accepted the shipment."""

    STEP: ClassVar[str] = "create_shipment"

    shipment_id: str
    tracking_number: str
