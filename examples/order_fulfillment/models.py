"""The order that the saga fulfils, and what it returns.

Two magic values let a demo or a test reach each failure path without any fault
injection: the card number :data:`DECLINED_CARD` is always declined (non-retryable
``PaymentDeclined``, before anything is charged) and the country
:data:`UNSHIPPABLE_COUNTRY` cannot be shipped to (non-retryable
``UnshippableAddress``, after payment, so the saga must refund and release).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DECLINED_CARD",
    "UNSHIPPABLE_COUNTRY",
    "Address",
    "LineItem",
    "Order",
    "OrderResult",
    "Shipment",
    "Simulation",
]

DECLINED_CARD = "4000000000000002"
"""A card number the payment service always declines."""

UNSHIPPABLE_COUNTRY = "XX"
"""A country code the shipping service never delivers to."""


class _Model(BaseModel):
    # Inputs are stored in the history and replayed: reject typos instead of
    # silently dropping them, and never let workflow code mutate its input.
    model_config = ConfigDict(extra="forbid", frozen=True)


class LineItem(_Model):
    """One line of an order: a product, how many, and the price of one."""

    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0)
    unit_price_cents: int = Field(ge=0)


class Address(_Model):
    """Where the order is shipped.

    ``country`` is a two-letter upper-case code; ``"XX"`` cannot be shipped to.
    """

    name: str = Field(min_length=1)
    street: str = Field(min_length=1)
    city: str = Field(min_length=1)
    country: str = Field(pattern=r"^[A-Z]{2}$")


class Simulation(_Model):
    """Fault injection carried by the order itself, for tests and demos.

    Carrying it in the input (rather than in process-wide switches) makes it
    reach whichever worker process runs each activity, and keeps it recorded in
    the run's history. The defaults inject nothing.

    Attributes:
        charge_delay_seconds: ``charge_payment`` sleeps this long after committing
            its charge and before returning, which leaves a window in which a
            worker can be killed with the charge written but not yet reported.
        fail_first_attempts: Activity name -> number of first attempts that raise
            a retryable ``TransientError`` before doing anything.
        refund_fails: ``refund_payment`` raises a retryable ``RefundGatewayDown``
            on every attempt, so that the compensation eventually fails for good.
        compensation_attempts: When set, compensations give up (and are
            dead-lettered) after this many attempts, 100 ms apart, instead of
            their usual policy: demos and tests need not wait half a minute.
    """

    charge_delay_seconds: float = Field(default=0, ge=0)
    fail_first_attempts: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    refund_fails: bool = False
    compensation_attempts: int | None = Field(default=None, ge=1)


class Order(_Model):
    """A customer's order.

    ``card_number`` is a test number: the input is stored in the run's history,
    so a real system would pass a payment token here, never a card number. The
    card :data:`DECLINED_CARD` (``4000000000000002``) is declined with a
    non-retryable ``PaymentDeclined``; an address in country ``XX`` makes
    shipping fail with a non-retryable ``UnshippableAddress``.
    """

    order_id: str = Field(min_length=1, max_length=128)
    customer_email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    items: list[LineItem] = Field(min_length=1)
    card_number: str = Field(pattern=r"^\d{12,19}$")
    address: Address
    simulate: Simulation = Simulation()

    @property
    def total_cents(self) -> int:
        """What the customer pays: the sum of quantity x unit price over the items."""
        return sum(item.quantity * item.unit_price_cents for item in self.items)


class Shipment(_Model):
    """What the shipping service returns for a created shipment."""

    shipment_id: str
    tracking_number: str


class OrderResult(_Model):
    """The references of a fulfilled order, one per service involved."""

    order_id: str
    reservation_id: str
    charge_id: str
    shipment_id: str
    tracking_number: str
