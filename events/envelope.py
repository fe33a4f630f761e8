"""The envelope every event travels in, and how it enters the outbox."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from activities.payload import DEFAULT_MAX_PAYLOAD_BYTES, to_payload
from events.domain import MAX_TYPE_LENGTH, DomainEvent, EventRegistry, is_declared, registry
from events.errors import EventTypeError
from outbox.message import OutboxMessage
from outbox.writer import OutboxWriter

__all__ = ["DEFAULT_EXCHANGE", "EventEnvelope", "event_message", "publish"]

DEFAULT_EXCHANGE = "orchestrator.events"
"""The topic exchange events are published to unless told otherwise."""

# Outbox ids and aggregate ids are stored in columns of these widths.
_MAX_ID = 64
_MAX_AGGREGATE = 255


def _new_id() -> str:
    return uuid.uuid4().hex


def _utcnow() -> datetime:
    return datetime.now(UTC)


class EventEnvelope(BaseModel):
    """One occurrence of a domain event, with what a consumer needs to know about it.

    Attributes:
        event_id: Unique id, the same on every delivery; consumers de-duplicate
            on it. Defaults to a random UUID in hex.
        type: The event type name, also the routing key.
        schema_version: Version of ``type``'s payload schema.
        occurred_at: When it happened, in UTC (naive values are taken as UTC).
            Defaults to now.
        correlation_id: The workflow id the event belongs to, if any; events
            with one correlation id are published in commit order. Defaults to ``None``.
        causation_id: Id of what caused it (a message or event id). Defaults to ``None``.
        producer: Who emitted it (``"app"``, a workflow type...).
        payload: The event's data as JSON.
    """

    # Unknown fields are ignored so that a newer producer's envelope still reads.
    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: str = Field(default_factory=_new_id, min_length=1, max_length=_MAX_ID)
    type: str = Field(min_length=1, max_length=MAX_TYPE_LENGTH)
    schema_version: int = Field(ge=1)
    occurred_at: AwareDatetime = Field(default_factory=_utcnow)
    correlation_id: str | None = Field(default=None, max_length=_MAX_AGGREGATE)
    causation_id: str | None = Field(default=None, max_length=_MAX_ID * 4)
    producer: str = Field(min_length=1, max_length=255)
    payload: dict[str, Any]

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _naive_is_utc(cls, value: Any) -> Any:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @classmethod
    def wrap(
        cls,
        event: DomainEvent,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        producer: str = "app",
        occurred_at: datetime | None = None,
        event_id: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> EventEnvelope:
        """Put ``event`` in an envelope under its declared type and version.

        ``occurred_at`` defaults to now and ``event_id`` to a random UUID; pass
        both to make the envelope deterministic (as replayed workflow code must).

        Raises:
            EventTypeError: ``event``'s class was not declared with ``event_type``.
            activities.errors.PayloadError: the payload is not JSON-able or
                larger than ``max_payload_bytes`` (default 2 MiB).
        """
        event_class = type(event)
        if not is_declared(event_class):
            raise EventTypeError(
                f"{event_class.__qualname__} is not a declared event type: "
                "decorate it with @events.event_type(...)"
            )
        payload = to_payload(event, event_class, limit=max_payload_bytes)
        fields: dict[str, Any] = {
            "type": event_class.EVENT_TYPE,
            "schema_version": event_class.EVENT_VERSION,
            "correlation_id": correlation_id,
            "causation_id": causation_id,
            "producer": producer,
            "payload": payload,
        }
        if occurred_at is not None:
            fields["occurred_at"] = occurred_at
        if event_id is not None:
            fields["event_id"] = event_id
        return cls.model_validate(fields)

    def decode(
        self, *, as_version: int | None = None, registry: EventRegistry | None = None
    ) -> DomainEvent:
        """The payload as an instance of its registered class.

        ``as_version`` defaults to the envelope's own schema version; a newer one
        upcasts the payload. ``registry`` defaults to the module-level registry.

        Raises:
            UnknownEventTypeError: the type or version is not registered.
            EventSchemaError: the payload does not fit the class.
        """
        source = registry or _default_registry()
        return source.load(self.type, self.schema_version, self.payload, as_version=as_version)

    def to_json(self) -> dict[str, Any]:
        """The envelope as JSON-able data (what travels on the broker)."""
        return self.model_dump(mode="json")


def _default_registry() -> EventRegistry:
    return registry


def event_message(envelope: EventEnvelope, *, exchange: str = DEFAULT_EXCHANGE) -> OutboxMessage:
    """The outbox row that publishes ``envelope`` to ``exchange`` (default ``orchestrator.events``).

    The row's id is the event id, its routing key the event type and its
    aggregate the correlation id, which is what keeps one workflow's events in
    commit order through the relay.
    """
    return OutboxMessage(
        id=envelope.event_id,
        kind="event",
        destination=envelope.type,
        queue=exchange,
        aggregate_id=envelope.correlation_id,
        body=envelope.to_json(),
    )


def publish(
    session: Session,
    writer: OutboxWriter,
    event: DomainEvent,
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    producer: str = "app",
    exchange: str = DEFAULT_EXCHANGE,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> EventEnvelope:
    """Publish ``event`` through the outbox, in ``session``'s current transaction.

    The event exists only if that transaction commits, and is then published
    at least once. ``producer`` defaults to ``"app"``, ``exchange`` to
    ``orchestrator.events``; ids and time default as in :meth:`EventEnvelope.wrap`.
    Returns the envelope written.
    """
    envelope = EventEnvelope.wrap(
        event,
        correlation_id=correlation_id,
        causation_id=causation_id,
        producer=producer,
        occurred_at=occurred_at,
        event_id=event_id,
    )
    writer.add(session, [event_message(envelope, exchange=exchange)])
    return envelope
