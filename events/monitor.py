"""Looking at events from outside: tailing the exchange, and the state of each group."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import amqp.exceptions
from pydantic import ValidationError
from sqlalchemy import Engine, func, select

from events._broker import kombu
from events.envelope import DEFAULT_EXCHANGE, EventEnvelope
from events.schema import inbox
from events.topology import QueueType, Topology, declare_exchange

__all__ = ["EventsStatus", "GroupStatus", "TailedMessage", "status", "tail"]

_POLL = 0.5


@dataclass(frozen=True)
class TailedMessage:
    """One message seen by :func:`tail`.

    Attributes:
        routing_key: The key it was published with.
        envelope: The event, or ``None`` if the body is not a valid envelope.
        error: Why the body could not be read, when ``envelope`` is ``None``.
        body: The raw body.
    """

    routing_key: str
    envelope: EventEnvelope | None
    error: str | None
    body: bytes | str


def _read(body: bytes | str, routing_key: str) -> TailedMessage:
    try:
        envelope = EventEnvelope.model_validate_json(body)
    except (ValidationError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return TailedMessage(routing_key, None, reason, body)
    return TailedMessage(routing_key, envelope, None, body)


def tail(
    broker_url: str,
    on_message: Callable[[TailedMessage], None],
    *,
    exchange: str = DEFAULT_EXCHANGE,
    pattern: str = "#",
    count: int | None = None,
    timeout: float | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    queue_type: QueueType = "auto",
) -> int:
    """Show events published to ``exchange`` from now on; return how many were seen.

    Binds a private, temporary queue with ``pattern`` (default ``"#"``, every
    event), so it takes nothing away from subscriber groups. Stops after
    ``count`` messages, after ``timeout`` seconds, or when ``stop`` is set,
    whichever comes first (defaults: none of them). ``ready`` is set once
    the queue is bound. ``queue_type`` is the type of the unroutable queue,
    declared with the exchange if it does not exist yet.
    """
    seen = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    with kombu.Connection(broker_url) as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.channel()
        declare_exchange(channel, Topology(exchange), queue_type)
        queue = channel.queue_declare(
            queue="", exclusive=True, auto_delete=True, durable=False
        ).queue
        channel.queue_bind(queue=queue, exchange=exchange, routing_key=pattern)

        def deliver(message: Any) -> None:
            nonlocal seen
            if count is not None and seen >= count:
                return
            seen += 1
            routing_key = str((message.delivery_info or {}).get("routing_key") or "")
            on_message(_read(message.body, routing_key))

        channel.basic_qos(prefetch_size=0, prefetch_count=100, a_global=False)
        channel.basic_consume(queue=queue, callback=deliver, no_ack=True)
        if ready is not None:
            ready.set()
        while (count is None or seen < count) and not (stop is not None and stop.is_set()):
            wait = _POLL
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            try:
                connection.drain_events(timeout=wait)
            except TimeoutError:
                continue
    return seen


@dataclass(frozen=True)
class GroupStatus:
    """The state of one subscriber group.

    Attributes:
        group: The group's name.
        queue: Its queue.
        exists: Whether the queue exists on the broker.
        ready: Events waiting in the queue (not counting those being handled).
        consumers: Consumers attached (standing-by ones included).
        dead_letters: Messages in the group's dead-letter queue.
        handled: Events the group has handled, by its inbox.
        last_handled_at: When it handled its latest event.
        lag_seconds: How long after it occurred the latest event was handled.
    """

    group: str
    queue: str
    exists: bool
    ready: int | None
    consumers: int | None
    dead_letters: int | None
    handled: int
    last_handled_at: datetime | None
    lag_seconds: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "queue": self.queue,
            "exists": self.exists,
            "ready": self.ready,
            "consumers": self.consumers,
            "dead_letters": self.dead_letters,
            "handled": self.handled,
            "last_handled_at": self.last_handled_at.isoformat() if self.last_handled_at else None,
            "lag_seconds": self.lag_seconds,
        }


@dataclass(frozen=True)
class EventsStatus:
    """The event exchange's unroutable backlog and every known group's state."""

    exchange: str
    unroutable: int | None
    groups: list[GroupStatus]

    def to_json(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "unroutable": self.unroutable,
            "groups": [group.to_json() for group in self.groups],
        }


def _queue_counts(connection: Any, name: str) -> tuple[int, int] | None:
    # A passive declare of a missing queue closes its channel: one channel each.
    channel = connection.channel()
    try:
        declared = channel.queue_declare(queue=name, passive=True)
    except amqp.exceptions.NotFound:
        return None
    finally:
        if getattr(channel, "is_open", False):
            channel.close()
    return int(declared.message_count), int(declared.consumer_count)


def status(
    engine: Engine,
    broker_url: str,
    *,
    exchange: str = DEFAULT_EXCHANGE,
    groups: Iterable[str] = (),
) -> EventsStatus:
    """Queue depths, dead letters and lag of ``groups`` and of every group in the inbox."""
    topology = Topology(exchange)
    with engine.connect() as conn:
        known = set(conn.execute(select(inbox.c.group_name).distinct()).scalars())
    names = sorted(known | set(groups))
    results: list[GroupStatus] = []
    with kombu.Connection(broker_url) as connection:
        connection.ensure_connection(max_retries=1)
        unroutable = _queue_counts(connection, topology.unroutable_queue)
        for group in names:
            queue = _queue_counts(connection, topology.group_queue(group))
            dead = _queue_counts(connection, topology.dead_letter_queue(group))
            handled, last_at, lag = _inbox_state(engine, group)
            results.append(
                GroupStatus(
                    group=group,
                    queue=topology.group_queue(group),
                    exists=queue is not None,
                    ready=queue[0] if queue else None,
                    consumers=queue[1] if queue else None,
                    dead_letters=dead[0] if dead else None,
                    handled=handled,
                    last_handled_at=last_at,
                    lag_seconds=lag,
                )
            )
    return EventsStatus(exchange, unroutable[0] if unroutable else None, results)


def _inbox_state(engine: Engine, group: str) -> tuple[int, datetime | None, float | None]:
    with engine.connect() as conn:
        handled = conn.execute(
            select(func.count()).select_from(inbox).where(inbox.c.group_name == group)
        ).scalar_one()
        latest = conn.execute(
            select(inbox.c.processed_at, inbox.c.occurred_at)
            .where(inbox.c.group_name == group)
            .order_by(inbox.c.processed_at.desc())
            .limit(1)
        ).first()
    if latest is None:
        return int(handled), None, None
    processed_at, occurred_at = (_aware(value) for value in latest)
    return int(handled), processed_at, max(0.0, (processed_at - occurred_at).total_seconds())


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def dumps(value: Any) -> str:
    """Compact JSON for output lines."""
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False, default=str)
