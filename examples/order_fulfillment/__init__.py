"""The reference application: an order saga that reserves, charges, ships and confirms.

``app`` wires it into an orchestrator (and a Celery app for workers), ``demo``
runs two orders embedded, and ``python -m examples.order_fulfillment.demo``
prints what happened.
"""
