"""The order saga: reserve, charge, ship, confirm; undo in reverse if a step fails for good.

Workflow code is replayed from its history after a crash or on another worker,
so it only decides: every effect happens in an activity, and nothing here reads
the clock, randomness or any I/O.
"""

from __future__ import annotations

from datetime import timedelta

from activities import RetryPolicy
from examples.order_fulfillment.activities import (
    cancel_shipment,
    charge_payment,
    create_shipment,
    refund_payment,
    release_inventory,
    reserve_inventory,
    send_confirmation,
)
from examples.order_fulfillment.events import (
    InventoryReserved,
    OrderCompensated,
    OrderCompleted,
    PaymentCharged,
    ShipmentCreated,
)
from examples.order_fulfillment.models import Order, OrderResult, Shipment
from orchestrator import workflow
from orchestrator.errors import ActivityError

__all__ = ["OrderSaga"]


@workflow.defn(name="OrderSaga")
class OrderSaga:
    """Fulfil one order, or leave no trace of it in inventory, payments and shipping.

    Each compensation is registered before its step, so a step that fails after
    a partial effect is undone as well. The run ends ``COMPLETED`` with an
    :class:`OrderResult`, or ``COMPENSATED`` with the failure of the step that
    stopped it (a declined card, an unshippable address, missing stock...).
    The confirmation e-mail comes after the saga: a fulfilled order is not
    refunded because an e-mail could not be sent.
    """

    @workflow.run
    async def run(self, order: Order) -> OrderResult:
        log = workflow.logger
        log.info("order %s: %d cents", order.order_id, order.total_cents)
        undo_retry = (
            RetryPolicy(
                initial_interval=timedelta(milliseconds=100),
                backoff_coefficient=1.0,
                maximum_attempts=order.simulate.compensation_attempts,
            )
            if order.simulate.compensation_attempts
            else None
        )
        try:
            async with workflow.Saga() as saga:
                saga.add_compensation(release_inventory, order, retry=undo_retry)
                started = workflow.now()
                reservation_id: str = await workflow.execute_activity(reserve_inventory, order)
                log.info("order %s: inventory reserved (%s)", order.order_id, reservation_id)
                workflow.emit(
                    InventoryReserved(
                        order_id=order.order_id,
                        started_at=started,
                        finished_at=workflow.now(),
                        reservation_id=reservation_id,
                    )
                )

                saga.add_compensation(refund_payment, order, retry=undo_retry)
                started = workflow.now()
                charge_id: str = await workflow.execute_activity(charge_payment, order)
                log.info("order %s: payment charged (%s)", order.order_id, charge_id)
                workflow.emit(
                    PaymentCharged(
                        order_id=order.order_id,
                        started_at=started,
                        finished_at=workflow.now(),
                        charge_id=charge_id,
                        amount_cents=order.total_cents,
                    )
                )

                saga.add_compensation(cancel_shipment, order, retry=undo_retry)
                started = workflow.now()
                shipment: Shipment = await workflow.execute_activity(create_shipment, order)
                log.info(
                    "order %s: shipment created (%s, tracking %s)",
                    order.order_id,
                    shipment.shipment_id,
                    shipment.tracking_number,
                )
                workflow.emit(
                    ShipmentCreated(
                        order_id=order.order_id,
                        started_at=started,
                        finished_at=workflow.now(),
                        shipment_id=shipment.shipment_id,
                        tracking_number=shipment.tracking_number,
                    )
                )
        except ActivityError as exc:
            log.warning(
                "order %s: %s failed (%s); completed steps were undone",
                order.order_id,
                exc.activity_type,
                exc.failure.type,
            )
            # The saga has compensated by now: say so to whoever listens.
            workflow.emit(
                OrderCompensated(
                    order_id=order.order_id,
                    customer_email=order.customer_email,
                    total_cents=order.total_cents,
                    failed_step=exc.activity_type,
                    reason=exc.failure.type,
                    message=exc.failure.message,
                )
            )
            raise

        try:
            await workflow.execute_activity(send_confirmation, order)
            log.info("order %s: confirmation sent", order.order_id)
        except ActivityError as exc:
            # Still fulfilled: paid and shipped. The failure stays in the history
            # for an operator to resend.
            log.warning("order %s: confirmation not sent: %s", order.order_id, exc.failure.message)

        workflow.emit(
            OrderCompleted(
                order_id=order.order_id,
                customer_email=order.customer_email,
                total_cents=order.total_cents,
                charge_id=charge_id,
                shipment_id=shipment.shipment_id,
                tracking_number=shipment.tracking_number,
            )
        )
        return OrderResult(
            order_id=order.order_id,
            reservation_id=reservation_id,
            charge_id=charge_id,
            shipment_id=shipment.shipment_id,
            tracking_number=shipment.tracking_number,
        )
