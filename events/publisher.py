"""Publishes outbox event rows to the topic exchange, with publisher confirms."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from events.envelope import DEFAULT_EXCHANGE
from events.errors import TopologyError
from events.topology import QueueType, Topology, declare_exchange
from outbox.errors import BrokerUnavailableError, PublishError
from outbox.message import OutboxMessage
from outbox.publisher import broker_unavailable

__all__ = ["EventPublisher"]

_log = logging.getLogger("events.publisher")

CONTENT_TYPE = "application/json"


def encode_body(body: dict[str, Any]) -> bytes:
    """The bytes an event body travels as: compact UTF-8 JSON."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _timestamp(body: dict[str, Any]) -> int | None:
    occurred = body.get("occurred_at")
    if not isinstance(occurred, str):
        return None
    try:
        return int(datetime.fromisoformat(occurred).timestamp())
    except ValueError:
        return None


class EventPublisher:
    """An outbox :class:`~outbox.Publisher` for ``kind="event"`` messages.

    Each message goes to the exchange in its ``queue`` field (default
    ``exchange``) with its ``destination`` as the routing key, persistent, with
    the event id as AMQP ``message_id`` and the event type as ``type``. Every
    publish waits for the broker's confirm. The first publish to an exchange
    on a connection declares it with its alternate exchange and unroutable
    queue (see :mod:`events.topology`). Safe to share between threads; one
    connection, opened on first use and reopened after a failure.

    Args:
        broker_url: AMQP URL of the broker.
        exchange: Exchange of messages that name none. Defaults to ``orchestrator.events``.
        queue_type: Type of the unroutable queue it declares. Defaults to ``"auto"``
            (quorum where the broker supports it).
        confirm_timeout: Seconds to wait for each confirm, for any reply of the
            broker, and for it to take a write (one that blocks its publishers
            does none of these). Defaults to 10.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        exchange: str = DEFAULT_EXCHANGE,
        queue_type: QueueType = "auto",
        confirm_timeout: float = 10.0,
    ) -> None:
        self.broker_url = broker_url
        self.exchange = exchange
        self.queue_type: QueueType = queue_type
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._connection: Any = None
        self._producer: Any = None
        self._declared: set[str] = set()

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Send ``messages`` in order; return once the broker confirmed each.

        Raises:
            PublishError: a message is not an event, the broker refused the
                topology, or a publish was not confirmed. Earlier messages of
                the batch may have reached the broker.
        """
        if not messages:
            return
        for message in messages:
            if message.kind != "event":
                raise PublishError(f"cannot publish {message.kind} {message.id} as an event")
        with self._lock:
            try:
                producer = self._ensure_producer()
                for message in messages:
                    self._publish_one(producer, message)
            except TopologyError as exc:
                self._reset(abandon=True)
                raise PublishError(str(exc)) from exc
            except Exception as exc:
                # Whatever state the connection is in, the next batch starts afresh.
                self._reset(abandon=True)
                if broker_unavailable(exc):
                    raise BrokerUnavailableError(f"publishing events failed: {exc!r}") from exc
                raise PublishError(f"publishing events failed: {exc!r}") from exc

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            from events._broker import kombu

            # A broker that has blocked its publishers (a memory or disk alarm)
            # neither reads nor answers: a write, and a wait for a reply, give
            # up as a confirm does.
            connection = kombu.Connection(
                self.broker_url,
                transport_options={
                    "confirm_publish": True,
                    "read_timeout": self.confirm_timeout,
                    "write_timeout": self.confirm_timeout,
                },
            )
            try:
                connection.ensure_connection(max_retries=1)
                channel = connection.channel()
                self._producer = kombu.Producer(channel, auto_declare=False)
            except BaseException:
                connection.release()
                raise
            self._connection = connection
            self._declared.clear()
        return self._producer

    def _publish_one(self, producer: Any, message: OutboxMessage) -> None:
        exchange = message.queue or self.exchange
        if exchange not in self._declared:
            declare_exchange(producer.channel, Topology(exchange), self.queue_type)
            self._declared.add(exchange)
        body = message.body
        properties: dict[str, Any] = {"message_id": message.id}
        if isinstance(body.get("type"), str):
            properties["type"] = body["type"]
        if isinstance(body.get("correlation_id"), str):
            properties["correlation_id"] = body["correlation_id"]
        if isinstance(body.get("producer"), str):
            properties["app_id"] = body["producer"][:255]
        timestamp = _timestamp(body)
        if timestamp is not None:
            properties["timestamp"] = timestamp
        headers: dict[str, Any] = dict(message.headers)
        if isinstance(body.get("schema_version"), int):
            headers.setdefault("x-schema-version", body["schema_version"])
        producer.publish(
            encode_body(body),
            exchange=exchange,
            routing_key=message.destination,
            content_type=CONTENT_TYPE,
            content_encoding="utf-8",
            delivery_mode=2,
            headers=headers,
            retry=False,
            confirm_timeout=self.confirm_timeout,
            **properties,
        )

    def _reset(self, *, abandon: bool) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        self._declared.clear()
        if connection is None:
            return
        try:
            if abandon:
                # After a failure, without a word to the broker: closing politely
                # waits for its replies, and a blocked broker sends none.
                connection.collect()
            else:
                connection.release()
        except Exception:  # pragma: no cover - closing a broken connection
            _log.debug("closing the event publisher's connection failed", exc_info=True)

    def close(self) -> None:
        """Close the broker connection (the next publish opens a new one)."""
        with self._lock:
            self._reset(abandon=False)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
