"""Activities: the steps of a workflow that touch the outside world.

Declare one with :func:`defn` and read its context with :func:`info`::

    import activities as activity

    @activity.defn(retry_policy=activity.RetryPolicy(maximum_attempts=5))
    def charge_card(order: Order) -> Receipt:
        key = activity.info().idempotency_key
        ...

This package knows nothing of storage or messaging; the engine schedules
activities and records their outcomes, running each attempt with
:func:`execute`.
"""

from activities.context import ActivityInfo, heartbeat, in_activity, info
from activities.definition import ActivityDefinition, defn, get_definition
from activities.errors import (
    ActivityCancelledError,
    ActivityDefinitionError,
    ApplicationError,
    InvalidPayloadError,
    InvalidRetryPolicyError,
    NotInActivityError,
    PayloadError,
    PayloadTooLargeError,
)
from activities.execution import Outcome, execute
from activities.failure import Failure
from activities.payload import DEFAULT_MAX_PAYLOAD_BYTES, from_payload, to_payload, validate_input
from activities.retry import DEFAULT_RETRY_POLICY, RetryPolicy

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "DEFAULT_RETRY_POLICY",
    "ActivityCancelledError",
    "ActivityDefinition",
    "ActivityDefinitionError",
    "ActivityInfo",
    "ApplicationError",
    "Failure",
    "InvalidPayloadError",
    "InvalidRetryPolicyError",
    "NotInActivityError",
    "Outcome",
    "PayloadError",
    "PayloadTooLargeError",
    "RetryPolicy",
    "defn",
    "execute",
    "from_payload",
    "get_definition",
    "heartbeat",
    "in_activity",
    "info",
    "to_payload",
    "validate_input",
]
