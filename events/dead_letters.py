"""Dead-lettered events of a subscriber group: list them, replay them, discard them.

A poison event sits in its group's dead-letter queue ``X.G.dead-letter`` (see
:mod:`events.topology`) with the reason in its headers (see
:mod:`events.runtime`). These functions work on that queue directly:

- :func:`list_dead_letters` browses it without removing anything;
- :func:`replay_dead_letters` moves chosen events (or all) back to the group's
  own queue ``X.G``, where the group's running subscribers take them;
- :func:`discard_dead_letters` removes chosen events for good.

How a queue is read without losing its order: every message of it is taken
with ``basic.get`` and held unacknowledged on one channel, so no other reader
can see it meanwhile. Chosen messages are then moved (published with
publisher confirms, then acknowledged) or acknowledged away, and closing the
channel gives every other message back, in order. Always the whole queue: a
quorum queue puts messages given back behind those given back earlier (and a
``basic.reject`` with requeue behind every message), so giving back only the
first few would move them behind the rest. Only dead letters that arrive
while a command runs, or that two commands read at the same time, can end up
out of order.

Group queues have *single active consumer*, and quorum queues refuse
``basic.get`` on such a queue: nothing here reads a group's queue, it only
publishes to it (through the default exchange, so that only that group gets
the event again). Dead-letter queues are declared without it.

Why acting twice acts once: a message is moved by whoever holds it and then
acknowledged, so it is gone from the dead-letter queue; a second replay (or
one running at the same time in another terminal) does not find it there.
If a move is cut short between the confirmed publish and the acknowledgement,
the message is given back and also sits in the group's queue: a later replay
delivers it again, and the group's inbox drops that second delivery.

A read of a quorum queue message that is given back can count as a delivery
(the ``x-delivery-count`` header; it does on RabbitMQ 3.x). Dead-letter
queues are declared without a delivery limit, but from RabbitMQ 4.0 quorum
queues have one of 20 by default, and a dead-letter queue has nowhere to send
a message over it: the broker would drop it. So once a message has been read
:data:`REFRESH_AFTER` times, every held message is replaced by a fresh copy
of itself at the tail, in order: the whole queue at once, so the order stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import amqp.exceptions

from events.envelope import DEFAULT_EXCHANGE
from events.errors import EventError
from events.runtime import DEAD_LETTER_REASON_HEADER
from events.topology import Topology

__all__ = [
    "REFRESH_AFTER",
    "DeadEvent",
    "DeadLetterError",
    "Progress",
    "discard_dead_letters",
    "list_dead_letters",
    "replay_dead_letters",
]

_log = logging.getLogger("events.dead_letters")

REFRESH_AFTER = 10
"""Reads after which a dead letter is replaced by a fresh copy (see the module's notes)."""

# Headers the runtime adds when it dead-letters an event.
_DEAD_LETTER_HEADERS = frozenset(
    {
        DEAD_LETTER_REASON_HEADER,
        "x-dead-letter-group",
        "x-dead-lettered-at",
        "x-original-exchange",
        "x-original-routing-key",
    }
)
# Headers the broker keeps: delivery counts and its own dead-lettering history.
_BROKER_HEADERS = frozenset(
    {
        "x-delivery-count",
        "x-acquired-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
_REPLAYED_AT_HEADER = "x-replayed-at"
_REPLAY_COUNT_HEADER = "x-replay-count"
_PREVIEW_LENGTH = 60
_CONFIRM_TIMEOUT = 30.0


class DeadLetterError(EventError):
    """A dead-letter queue cannot be read or acted on: it does not exist, or a move failed."""


@dataclass(frozen=True)
class DeadEvent:
    """One dead-lettered event, as read from its group's dead-letter queue.

    Attributes:
        event_id: The envelope's event id; else the message id; else, for a
            body with neither, ``body-`` and a digest of the body and the time
            it was dead-lettered (stable for as long as the message stays).
        type: The event type, if the envelope or the message says.
        reason: Why it was dead-lettered (the ``x-dead-letter-reason`` header,
            or the broker's reason, such as ``delivery_limit``).
        group: The subscriber group.
        occurred_at: When the event happened, if readable.
        dead_lettered_at: When it was dead-lettered, if recorded.
        correlation_id: The envelope's correlation id (the workflow id of
            events a workflow emitted), if any.
        routing_key: The routing key it was published with, if recorded.
        deliveries: How often the broker has handed this copy out before (the
            reads of earlier listings).
        replays: How often it was replayed before (and failed again).
        preview: The start of the body, on one line.
        body: The raw body.
    """

    event_id: str
    type: str | None
    reason: str
    group: str
    occurred_at: datetime | None
    dead_lettered_at: datetime | None
    correlation_id: str | None
    routing_key: str | None
    deliveries: int
    replays: int
    preview: str
    body: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "reason": self.reason,
            "group": self.group,
            "occurred_at": _iso(self.occurred_at),
            "dead_lettered_at": _iso(self.dead_lettered_at),
            "correlation_id": self.correlation_id,
            "routing_key": self.routing_key,
            "deliveries": self.deliveries,
            "replays": self.replays,
            "preview": self.preview,
            "body": self.body.decode("utf-8", errors="replace"),
        }


Progress = Callable[[int, int, DeadEvent], None]
"""``progress(number, total, event)``: called after each event is moved or discarded."""


# ------------------------------------------------------------------------ reading a message
def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str) and value:
        return value
    return None


def _time(value: Any) -> datetime | None:
    """A time from an ISO string, a POSIX timestamp or a datetime; ``None`` if unreadable."""
    parsed: datetime | None = None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        with suppress(OverflowError, OSError, ValueError):
            parsed = datetime.fromtimestamp(value, UTC)
    elif (text := _text(value)) is not None:
        with suppress(ValueError):
            parsed = datetime.fromisoformat(text)
    if parsed is not None and parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _body_bytes(body: bytes | str, content_encoding: str | None = None) -> bytes:
    """The body as bytes: the client decodes bodies that name their encoding."""
    if isinstance(body, bytes):
        return body
    try:
        return body.encode(content_encoding or "utf-8")
    except (LookupError, UnicodeEncodeError):
        return body.encode("utf-8")


def _preview(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    if len(text) > _PREVIEW_LENGTH:
        return text[: _PREVIEW_LENGTH - 3] + "..."
    return text


def _envelope_fields(body: bytes) -> dict[str, Any]:
    """The envelope's fields, as far as the body is a JSON object; ``{}`` otherwise."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _broker_death(headers: Mapping[str, Any]) -> tuple[str | None, datetime | None]:
    """The broker's own dead-lettering reason and time (``x-death``), if any."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        latest = deaths[0]
        reason = _text(latest.get("reason"))
        queue = _text(latest.get("queue"))
        if reason and queue:
            reason = f"{reason} (dead-lettered by the broker from {queue})"
        return reason, _time(latest.get("time"))
    return _text(headers.get("x-first-death-reason")), None


def _read_dead_letter(
    group: str,
    body: bytes | str,
    properties: Mapping[str, Any],
    headers: Mapping[str, Any] | None = None,
) -> DeadEvent:
    """Describe one message of ``group``'s dead-letter queue, whatever its body holds.

    ``properties`` are the message's AMQP properties; ``headers`` its headers
    (default: ``properties["application_headers"]``).
    """
    if headers is None:
        headers = properties.get("application_headers") or {}
    raw = _body_bytes(body, _text(properties.get("content_encoding")))
    envelope = _envelope_fields(raw)
    broker_reason, broker_time = _broker_death(headers)
    dead_lettered_at = _time(headers.get("x-dead-lettered-at")) or broker_time
    event_id = _text(envelope.get("event_id")) or _text(properties.get("message_id"))
    if event_id is None:
        digest = hashlib.sha256(raw)
        digest.update(str(headers.get("x-dead-lettered-at") or "").encode())
        event_id = f"body-{digest.hexdigest()[:16]}"
    return DeadEvent(
        event_id=event_id,
        type=_text(envelope.get("type")) or _text(properties.get("type")),
        reason=_text(headers.get(DEAD_LETTER_REASON_HEADER)) or broker_reason or "unknown",
        group=group,
        occurred_at=_time(envelope.get("occurred_at")) or _time(properties.get("timestamp")),
        dead_lettered_at=dead_lettered_at,
        correlation_id=_text(envelope.get("correlation_id"))
        or _text(properties.get("correlation_id")),
        routing_key=_text(headers.get("x-original-routing-key")),
        deliveries=max(
            _count(headers.get("x-delivery-count")), _count(headers.get("x-acquired-count"))
        ),
        replays=_count(headers.get(_REPLAY_COUNT_HEADER)),
        preview=_preview(raw),
        body=raw,
    )


def _republished_properties(
    properties: Mapping[str, Any], *, replayed_at: datetime | None = None
) -> dict[str, Any]:
    """The properties of a fresh copy of a dead-lettered message.

    The broker's counts and history go; with ``replayed_at`` (a copy that
    goes back to the group), the runtime's dead-letter headers go too and the
    replay is recorded. The message id, type, correlation id and time stay, so
    the copy is the same event.
    """
    copied = {
        key: value
        for key, value in properties.items()
        # The broker checks user_id against the publishing user.
        if key not in ("application_headers", "user_id") and value is not None
    }
    dropped = _BROKER_HEADERS | (_DEAD_LETTER_HEADERS if replayed_at is not None else frozenset())
    headers = {
        key: value
        for key, value in (properties.get("application_headers") or {}).items()
        if key not in dropped
    }
    if replayed_at is not None:
        headers[_REPLAYED_AT_HEADER] = replayed_at.isoformat()
        headers[_REPLAY_COUNT_HEADER] = _count(headers.get(_REPLAY_COUNT_HEADER)) + 1
    copied["application_headers"] = headers
    copied["delivery_mode"] = 2
    return copied


# ------------------------------------------------------------------------------- the queue
@dataclass(eq=False)
class _Held:
    """A message taken from the dead-letter queue; ``settled`` once acknowledged."""

    message: Any
    event: DeadEvent
    settled: bool = False

    @property
    def tag(self) -> Any:
        return self.message.delivery_info["delivery_tag"]

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self.message.properties or {})


class _DeadLetterQueue:
    """One group's dead-letter queue, read through a channel that holds what it took."""

    def __init__(self, connection: Any, topology: Topology, group: str) -> None:
        self.connection = connection
        self.topology = topology
        self.group = group
        self.name = topology.dead_letter_queue(group)
        self.held: list[_Held] = []
        self._channel: Any = None
        self._publisher: Any = None
        self._returned: list[BaseException] = []

    def require(self, queue: str, missing: str) -> None:
        # A passive declare of a missing queue closes its channel: a channel of its own.
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue=queue, passive=True)
        except amqp.exceptions.NotFound as exc:
            raise DeadLetterError(missing) from exc
        finally:
            with suppress(Exception):
                channel.close()

    def take(self) -> list[_Held]:
        """Take every message of the queue, oldest first, and hold them."""
        if self._channel is None:
            self._channel = self.connection.channel()
        while (message := self._channel.basic_get(queue=self.name, no_ack=False)) is not None:
            properties = dict(message.properties or {})
            event = _read_dead_letter(self.group, message.body, properties)
            self.held.append(_Held(message, event))
        return self.held

    def publish(self, held: _Held, queue: str, properties: dict[str, Any]) -> None:
        """Publish a copy of ``held`` to ``queue``, confirmed; raise if it went nowhere."""
        if self._publisher is None:
            self._publisher = self.connection.channel()
            self._publisher.events["basic_return"].add(
                lambda error, *_: self._returned.append(error)
            )
        copy = amqp.Message(held.event.body, **properties)
        self._publisher.basic_publish_confirm(
            copy,
            exchange="",
            routing_key=queue,
            mandatory=True,
            confirm_timeout=_CONFIRM_TIMEOUT,
        )
        if self._returned:
            error = self._returned.pop()
            raise DeadLetterError(f"the broker routed the event to no queue {queue!r}: {error}")

    def ack(self, held: _Held) -> None:
        self._channel.basic_ack(delivery_tag=held.tag)
        held.settled = True

    def unsettled(self) -> list[_Held]:
        return [held for held in self.held if not held.settled]

    def refresh(self) -> int:
        """Replace the held messages by fresh copies if one was read often; return how many.

        The whole queue is held, so putting every message at the tail keeps
        their order.
        """
        remaining = self.unsettled()
        if not any(held.event.deliveries >= REFRESH_AFTER for held in remaining):
            return 0
        for held in remaining:
            self.publish(held, self.name, _republished_properties(held.properties))
        for held in remaining:
            self.ack(held)
        refreshed = len(remaining)
        _log.info(
            "replaced %d dead letters of group %s with fresh copies (read %d times or more)",
            refreshed,
            self.group,
            REFRESH_AFTER,
        )
        return refreshed

    def give_back(self) -> None:
        """Close the reading channel: every held message returns to its place."""
        for channel in (self._channel, self._publisher):
            if channel is not None:
                with suppress(Exception):
                    channel.close()
        self._channel = self._publisher = None
        self.held = []


@contextmanager
def _open(broker_url: str, exchange: str, group: str) -> Iterator[_DeadLetterQueue]:
    from events._broker import kombu

    topology = Topology(exchange)
    name = topology.dead_letter_queue(group)
    with kombu.Connection(broker_url) as connection:
        try:
            connection.ensure_connection(max_retries=1)
        except Exception as exc:
            raise DeadLetterError(f"cannot reach the broker: {exc}") from exc
        queue = _DeadLetterQueue(connection, topology, group)
        queue.require(
            name,
            f"subscriber group {group!r} has no dead-letter queue {name!r} on the broker "
            f"(no subscriber of the group has run on exchange {exchange!r})",
        )
        try:
            yield queue
        finally:
            queue.give_back()


def _refresh_quietly(queue: _DeadLetterQueue) -> None:
    """Refresh after the main work; a failure keeps every original (and maybe some copies)."""
    try:
        queue.refresh()
    except Exception as exc:
        _log.warning("could not refresh the dead letters of group %s: %s", queue.group, exc)


def _wanted(event_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(event_id.strip() for event_id in event_ids if event_id.strip()))


# -------------------------------------------------------------------------------- the API
def list_dead_letters(
    broker_url: str,
    *,
    group: str,
    exchange: str = DEFAULT_EXCHANGE,
    limit: int = 100,
) -> list[DeadEvent]:
    """The first ``limit`` (default 100) dead letters of ``group``, oldest first.

    Nothing is removed: the whole queue is read and given back in its order.
    Messages another command holds at this moment are not seen.

    Raises:
        DeadLetterError: the group has no dead-letter queue.
        SubscriberError: ``group`` is not a valid group name.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    with _open(broker_url, exchange, group) as queue:
        events = [held.event for held in queue.take()[:limit]]
        _refresh_quietly(queue)
    return events


def replay_dead_letters(
    broker_url: str,
    *,
    group: str,
    event_ids: list[str] | None,
    exchange: str = DEFAULT_EXCHANGE,
    progress: Progress | None = None,
) -> list[tuple[str, bool]]:
    """Move dead letters of ``group`` back to the group's queue; ``None`` moves them all.

    Each chosen message is published to the group's queue ``X.G`` (with
    publisher confirms, so the broker has it) and only then acknowledged from
    the dead-letter queue; ``progress(number, total, event)`` is called after
    each. They go in their dead-letter order, behind what the group's queue
    holds already. Messages not chosen stay where they were.

    Returns ``(event_id, moved)`` pairs: for each id asked for, whether it was
    moved (``False``: not in the dead-letter queue, so replayed or discarded
    already, or held by another command at this moment); with ``None``, one
    pair for each event moved.

    Raises:
        DeadLetterError: the group has no dead-letter queue or no queue, or
            the broker did not take a copy; events moved before that stay moved.
    """
    wanted = None if event_ids is None else _wanted(event_ids)
    if wanted == []:
        return []
    target = Topology(exchange).group_queue(group)
    chosen_ids = None if wanted is None else set(wanted)
    moved: list[str] = []
    with _open(broker_url, exchange, group) as queue:
        queue.require(
            target,
            f"subscriber group {group!r} has no queue {target!r} on the broker: "
            "start its subscribers once, then replay",
        )
        chosen = [
            held for held in queue.take() if chosen_ids is None or held.event.event_id in chosen_ids
        ]
        for number, held in enumerate(chosen, start=1):
            replayed_at = datetime.now(UTC)
            try:
                queue.publish(
                    held, target, _republished_properties(held.properties, replayed_at=replayed_at)
                )
            except Exception as exc:
                raise DeadLetterError(
                    f"replay of group {group!r} stopped after {number - 1} of {len(chosen)} "
                    f"events: moving {held.event.event_id} failed: {exc}"
                ) from exc
            queue.ack(held)
            moved.append(held.event.event_id)
            _log.debug("event %s of group %s replayed to %s", held.event.event_id, group, target)
            if progress is not None:
                progress(number, len(chosen), held.event)
        _refresh_quietly(queue)
    if moved:
        _log.info("replayed %d dead letters of group %s to %s", len(moved), group, target)
    if wanted is None:
        return [(event_id, True) for event_id in dict.fromkeys(moved)]
    done = set(moved)
    return [(event_id, event_id in done) for event_id in wanted]


def discard_dead_letters(
    broker_url: str,
    *,
    group: str,
    event_ids: list[str],
    reason: str,
    exchange: str = DEFAULT_EXCHANGE,
    progress: Progress | None = None,
) -> list[DeadEvent]:
    """Remove the dead letters ``event_ids`` of ``group`` for good; return what was removed.

    Each removal is logged (warning) with ``reason``, which must not be empty.
    Ids that are not in the queue are left out of the result; other messages
    stay where they were.

    Raises:
        DeadLetterError: the group has no dead-letter queue, or no reason is given.
    """
    if not reason.strip():
        raise DeadLetterError("discarding dead letters needs a reason")
    wanted = set(_wanted(event_ids))
    if not wanted:
        return []
    discarded: list[DeadEvent] = []
    with _open(broker_url, exchange, group) as queue:
        chosen = [held for held in queue.take() if held.event.event_id in wanted]
        for number, held in enumerate(chosen, start=1):
            queue.ack(held)
            discarded.append(held.event)
            _log.warning(
                "dead letter %s (%s) of group %s discarded: %s",
                held.event.event_id,
                held.event.type or "unknown type",
                group,
                reason,
            )
            if progress is not None:
                progress(number, len(chosen), held.event)
        _refresh_quietly(queue)
    return discarded
