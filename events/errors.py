"""Errors of the events package, under the project's :class:`OrchestratorError`."""

from __future__ import annotations

from outbox.errors import OrchestratorError

__all__ = [
    "EventError",
    "EventSchemaError",
    "EventTypeError",
    "RejectEvent",
    "SubscriberError",
    "TopologyError",
    "UnknownEventTypeError",
]


class EventError(OrchestratorError):
    """Base class of the errors raised by :mod:`events`."""


class EventTypeError(EventError):
    """An event type is declared wrongly: a bad name, or two classes under one name and version."""


class UnknownEventTypeError(EventError):
    """No class is registered under an event's type name and schema version."""


class EventSchemaError(EventError):
    """An event's payload does not fit the schema of its type and version."""


class SubscriberError(EventError):
    """A subscriber is declared or configured wrongly."""


class TopologyError(EventError):
    """The broker refused the exchanges and queues events need."""


class RejectEvent(EventError):
    """Raised by a handler to send the event to its group's dead-letter queue at once.

    For events the handler can tell it will never accept, so that they are not
    retried first. ``reason`` is recorded on the dead-lettered message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
