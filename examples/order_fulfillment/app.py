"""The example's orchestrator: its workflows, its activities, and the Celery app.

Workers load it by module path, for instance::

    celery -A examples.order_fulfillment.app worker -Q workflows,activities

Nothing here connects at import: the orchestrator builds its database engine
and Celery connections on first use, in the process (or forked child) that
uses them. Settings come from ``ORCHESTRATOR_*`` environment variables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from examples.order_fulfillment.activities import (
    cancel_shipment,
    charge_payment,
    create_shipment,
    refund_payment,
    release_inventory,
    reserve_inventory,
    send_confirmation,
)
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator.app import Orchestrator
from orchestrator.settings import Settings

__all__ = ["ACTIVITIES", "WORKFLOWS", "build", "celery", "orchestrator"]

ACTIVITIES: list[Callable[..., Any]] = [
    reserve_inventory,
    release_inventory,
    charge_payment,
    refund_payment,
    create_shipment,
    cancel_shipment,
    send_confirmation,
]

WORKFLOWS: list[type[Any]] = [OrderSaga]


def build(settings: Settings | None = None) -> Orchestrator:
    """A new orchestrator of the example (``settings`` default to the environment)."""
    return Orchestrator(workflows=WORKFLOWS, activities=ACTIVITIES, settings=settings)


orchestrator = build()
celery = orchestrator.celery
