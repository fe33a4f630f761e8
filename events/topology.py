"""The broker objects events travel through, and their names.

For an exchange ``X`` (``orchestrator.events`` by default):

- ``X``: a durable topic exchange; the routing key is the event type. Its
  ``alternate-exchange`` is ``X.unroutable``, so an event no queue is bound
  for is kept instead of dropped.
- ``X.unroutable``: a fanout exchange and a durable queue of the same name.
- per subscriber group ``G``: the durable queue ``X.G``, bound to ``X`` with
  each pattern of the group's handlers, dead-lettering to the fanout exchange
  ``X.G.dead-letter`` and its queue of the same name.

Queues are quorum queues when the broker supports them (RabbitMQ 3.8 and
newer), classic queues otherwise. Declarations are idempotent, but the broker
refuses to redeclare an existing queue or exchange with other arguments.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import amqp.exceptions

from events.errors import SubscriberError, TopologyError

__all__ = [
    "QueueType",
    "Topology",
    "declare_exchange",
    "declare_group",
    "resolve_queue_type",
    "validate_group_name",
]

QueueType = Literal["auto", "quorum", "classic"]

_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MAX_GROUP_LENGTH = 100
_RESERVED_GROUPS = frozenset({"unroutable"})
_QUORUM_SINCE = (3, 8)


def validate_group_name(group: str) -> str:
    """Return ``group`` if it can name a subscriber group, else raise :class:`SubscriberError`.

    A group name is letters, digits, ``_`` and ``-`` (at most 100), and not
    ``unroutable``, which names the exchange's own queue.
    """
    if (
        not isinstance(group, str)
        or len(group) > _MAX_GROUP_LENGTH
        or not _GROUP_NAME.match(group)
        or group in _RESERVED_GROUPS
    ):
        raise SubscriberError(
            f"invalid subscriber group {group!r}: use letters, digits, '_' and '-' "
            "(and not 'unroutable')"
        )
    return group


@dataclass(frozen=True)
class Topology:
    """The names of the exchanges and queues of one event exchange.

    Attributes:
        exchange: The topic exchange. Defaults to ``orchestrator.events``.
    """

    exchange: str = "orchestrator.events"

    @property
    def unroutable_exchange(self) -> str:
        return f"{self.exchange}.unroutable"

    @property
    def unroutable_queue(self) -> str:
        return f"{self.exchange}.unroutable"

    def group_queue(self, group: str) -> str:
        return f"{self.exchange}.{validate_group_name(group)}"

    def dead_letter_exchange(self, group: str) -> str:
        return f"{self.group_queue(group)}.dead-letter"

    def dead_letter_queue(self, group: str) -> str:
        return f"{self.group_queue(group)}.dead-letter"


def resolve_queue_type(channel: Any, wanted: QueueType) -> Literal["quorum", "classic"]:
    """``wanted``, with ``"auto"`` resolved from the version the broker announced."""
    if wanted != "auto":
        return wanted
    properties = getattr(getattr(channel, "connection", None), "server_properties", None) or {}
    product = _text(properties.get("product"))
    version = _version(_text(properties.get("version")))
    if product == "RabbitMQ" and version is not None and version >= _QUORUM_SINCE:
        return "quorum"
    return "classic"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _version(text: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _queue_arguments(queue_type: str, **extra: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-queue-type": queue_type}
    arguments.update({key: value for key, value in extra.items() if value is not None})
    return arguments


@contextmanager
def _declaring(what: str) -> Iterator[None]:
    """Turn a broker refusal into a :class:`TopologyError` naming what was declared."""
    try:
        yield
    except amqp.exceptions.ChannelError as exc:
        raise TopologyError(
            f"the broker refused to declare {what}: {exc}. An existing object of "
            "that name with other arguments must be deleted first"
        ) from exc


def declare_exchange(channel: Any, topology: Topology, queue_type: QueueType = "auto") -> None:
    """Declare the topic exchange, its alternate exchange and the unroutable queue.

    ``queue_type`` (default ``"auto"``) is the type of the unroutable queue.

    Raises:
        TopologyError: the broker refused a declaration (an existing exchange
            or queue with other arguments).
    """
    kind = resolve_queue_type(channel, queue_type)
    with _declaring(f"exchange {topology.unroutable_exchange!r}"):
        channel.exchange_declare(
            exchange=topology.unroutable_exchange, type="fanout", durable=True, auto_delete=False
        )
    with _declaring(f"queue {topology.unroutable_queue!r}"):
        channel.queue_declare(
            queue=topology.unroutable_queue,
            durable=True,
            auto_delete=False,
            arguments=_queue_arguments(kind),
        )
        channel.queue_bind(
            queue=topology.unroutable_queue, exchange=topology.unroutable_exchange, routing_key=""
        )
    with _declaring(f"exchange {topology.exchange!r}"):
        channel.exchange_declare(
            exchange=topology.exchange,
            type="topic",
            durable=True,
            auto_delete=False,
            arguments={"alternate-exchange": topology.unroutable_exchange},
        )


def declare_group(
    channel: Any,
    topology: Topology,
    group: str,
    patterns: list[str] | tuple[str, ...],
    *,
    queue_type: QueueType = "auto",
    single_active_consumer: bool = True,
    delivery_limit: int | None = 20,
) -> None:
    """Declare ``group``'s queue, its dead-letter exchange and queue, and bind ``patterns``.

    Declares the event exchange too, so a group can start before anything was
    published. ``single_active_consumer`` (default on) lets one consumer of
    the group at a time take messages, which keeps them in order; the others
    stand by. ``delivery_limit`` (default 20; quorum queues only, ``None`` for
    none) dead-letters a message redelivered that often, such as one that
    kills every consumer that takes it.

    Raises:
        TopologyError: the broker refused a declaration.
    """
    kind = resolve_queue_type(channel, queue_type)
    declare_exchange(channel, topology, queue_type)
    queue = topology.group_queue(group)
    dead_letters = topology.dead_letter_exchange(group)
    with _declaring(f"exchange {dead_letters!r}"):
        channel.exchange_declare(
            exchange=dead_letters, type="fanout", durable=True, auto_delete=False
        )
    with _declaring(f"queue {topology.dead_letter_queue(group)!r}"):
        channel.queue_declare(
            queue=topology.dead_letter_queue(group),
            durable=True,
            auto_delete=False,
            arguments=_queue_arguments(kind),
        )
        channel.queue_bind(
            queue=topology.dead_letter_queue(group), exchange=dead_letters, routing_key=""
        )
    arguments = _queue_arguments(
        kind,
        **{
            "x-dead-letter-exchange": dead_letters,
            "x-single-active-consumer": True if single_active_consumer else None,
            "x-delivery-limit": delivery_limit if kind == "quorum" else None,
        },
    )
    with _declaring(f"queue {queue!r}"):
        channel.queue_declare(queue=queue, durable=True, auto_delete=False, arguments=arguments)
        for pattern in dict.fromkeys(patterns):
            channel.queue_bind(queue=queue, exchange=topology.exchange, routing_key=pattern)
