"""Domain events: choreography next to the orchestrated sagas.

Core saga steps are orchestrated; peripheral side effects (notifications,
analytics, audit) subscribe to domain events instead, so adding one never
touches workflow code.

- Declare event types: ``@event_type("order.completed", version=1)`` on a
  :class:`DomainEvent` subclass.
- Publish through the outbox, in the transaction that makes them true:
  :func:`publish` (applications) or :func:`event_message` (the engine).
  :class:`EventPublisher` sends outbox event rows to a RabbitMQ topic exchange.
- Subscribe: ``@subscriber("order.*", group="notifications")`` on a handler
  ``(event, session)``; :class:`SubscriberRuntime` (``orchestrator subscribers
  run``) runs each group's handlers once per event, through an inbox table.
- Poison events wait in their group's dead-letter queue: :func:`list_dead_letters`,
  :func:`replay_dead_letters` and :func:`discard_dead_letters` (``orchestrator
  subscribers dead-letters ...``) look at them, move them back, or drop them.

See ``docs/events.md`` for the topology and the ordering guarantees.
"""

from __future__ import annotations

from events.dead_letters import (
    DeadEvent,
    DeadLetterError,
    discard_dead_letters,
    list_dead_letters,
    replay_dead_letters,
)
from events.domain import DomainEvent, EventRegistry, Upcaster, event_type, registry
from events.envelope import DEFAULT_EXCHANGE, EventEnvelope, event_message, publish
from events.errors import (
    EventError,
    EventSchemaError,
    EventTypeError,
    RejectEvent,
    SubscriberError,
    TopologyError,
    UnknownEventTypeError,
)
from events.publisher import EventPublisher
from events.runtime import DEAD_LETTER_REASON_HEADER, Outcome, SubscriberRuntime
from events.schema import inbox
from events.subscribers import (
    MODULES_ENV_VAR,
    SubscriberRegistry,
    Subscription,
    load_subscriber_modules,
    subscriber,
    subscriptions,
    topic_matches,
)
from events.topology import Topology

__all__ = [
    "DEAD_LETTER_REASON_HEADER",
    "DEFAULT_EXCHANGE",
    "MODULES_ENV_VAR",
    "DeadEvent",
    "DeadLetterError",
    "DomainEvent",
    "EventEnvelope",
    "EventError",
    "EventPublisher",
    "EventRegistry",
    "EventSchemaError",
    "EventTypeError",
    "Outcome",
    "RejectEvent",
    "SubscriberError",
    "SubscriberRegistry",
    "SubscriberRuntime",
    "Subscription",
    "Topology",
    "TopologyError",
    "UnknownEventTypeError",
    "Upcaster",
    "discard_dead_letters",
    "event_message",
    "event_type",
    "inbox",
    "list_dead_letters",
    "load_subscriber_modules",
    "publish",
    "registry",
    "replay_dead_letters",
    "subscriber",
    "subscriptions",
    "topic_matches",
]
