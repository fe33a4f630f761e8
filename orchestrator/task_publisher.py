"""Publishes outbox task messages as Celery task messages, a batch per broker confirm.

Each message is built by Celery (``app.amqp.as_task_v2``: the protocol's
headers, properties and body, with the current task as parent) and sent on a
connection of the publisher's own in confirm mode, to the queue the message
names. A batch is sent whole and then waits once for the broker to confirm all
of it, instead of Celery's ``send_task`` waiting for each message in turn: a
start publishes in about two thirds of the client time, and a relay's batch of
a hundred waits for one confirm round instead of a hundred. What ``send_task``
would add here is not needed: the engine decides the queue (Celery's routes
and priorities are not consulted), the queue was declared once, and the
publish is not retried in place (a failed batch stays in the outbox for the
relay). Where an application hooks Celery's publish signals (tracing does),
every message goes through ``send_task`` as before, so that the hooks see it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any

from amqp import spec
from celery import Celery, signals
from celery.utils.nodenames import anon_nodename
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.serialization import dumps

from orchestrator.celery_app import dead_letter_queue
from orchestrator.dead_letters import COMPENSATION_DEAD_LETTER_QUEUE
from orchestrator.flower import task_kwargsrepr
from outbox.errors import BrokerUnavailableError, PublishError
from outbox.message import OutboxMessage
from outbox.publisher import broker_unavailable

_CONFIRMS = [spec.Basic.Ack, spec.Basic.Nack]
# How long a batch waits for the broker's confirms, or for any reply, before
# the batch is left to the relay. A confirm takes a millisecond; a broker that
# has blocked its publishers (a memory or disk alarm) sends none and stops
# reading, and a start that waited on it would hold its caller for as long as
# the alarm lasts. Its run is committed either way.
CONFIRM_TIMEOUT = 5.0
_PERSISTENT = 2


class _Link:
    """One thread's connection and channel in confirm mode, and what it declared."""

    def __init__(self, broker_url: str) -> None:
        # A blocked broker neither reads nor answers: a write, and a wait for a
        # reply (a queue's declaration between two publishes of a batch), give
        # up as a confirm does.
        self.connection = Connection(
            broker_url,
            transport_options={"read_timeout": CONFIRM_TIMEOUT, "write_timeout": CONFIRM_TIMEOUT},
        )
        channel: Any = self.connection.default_channel
        channel.confirm_select()
        # Confirms are counted as the channel reads them, whenever that is: a
        # publish also reads what has arrived (py-amqp checks for a blocked
        # connection), which can be the confirm of an earlier message.
        channel.events["basic_ack"].add(self._acked)
        channel.events["basic_nack"].add(self._nacked)
        self.channel = channel
        self.next_tag = 1
        self.unconfirmed: set[int] = set()
        self.refused = 0
        self.declared: set[str] = set()

    def send(self, message: Any, routing_key: str) -> None:
        self.sent()
        self.channel.basic_publish(message, exchange="", routing_key=routing_key)

    def sent(self) -> None:
        """Count one more publish on the channel: its confirm is awaited."""
        self.unconfirmed.add(self.next_tag)
        self.next_tag += 1

    def _confirmed(self, delivery_tag: int, multiple: bool) -> set[int]:
        done = (
            {tag for tag in self.unconfirmed if tag <= delivery_tag}
            if multiple
            else {delivery_tag} & self.unconfirmed
        )
        self.unconfirmed -= done
        return done

    def _acked(self, delivery_tag: int, multiple: bool) -> None:
        self._confirmed(delivery_tag, multiple)

    def _nacked(self, delivery_tag: int, multiple: bool) -> None:
        self.refused += len(self._confirmed(delivery_tag, multiple))

    def wait_confirmed(self, timeout: float) -> None:
        """Wait until the broker confirmed everything sent; raise if it refused any."""
        while self.unconfirmed:
            self.channel.wait(_CONFIRMS, timeout=timeout)
        refused, self.refused = self.refused, 0
        if refused:
            raise PublishError(f"the broker refused {refused} message(s)")

    def abandon(self) -> None:
        """Drop the connection without a word to the broker.

        Only a link that failed is dropped, and closing it politely would wait
        for the broker's replies: a blocked broker sends none, and the close
        would wait for ever.
        """
        with contextlib.suppress(Exception):
            self.connection.collect()


class CeleryPublisher:
    """Publishes outbox task messages as Celery task messages, with publisher confirms.

    It has its own connection in confirm mode (one per thread), so that only the
    messages that carry the system's state wait for the broker's confirm; the
    workers' monitoring events go out on Celery's own connections without
    waiting, which keeps them off the hot path.
    """

    def __init__(self, app: Celery, *, dead_letter_exchange: str) -> None:
        self.app = app
        self._dead_letter_exchange = dead_letter_exchange
        self._local = threading.local()
        # The node name Celery puts in each message's origin header, once.
        self._origin = anon_nodename()
        # A forked worker child must not share its parent's broker socket.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._local = threading.local()

    def _link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is None:
            link = _Link(self.app.conf.broker_url)
            # The queues name this exchange; it must exist before anything is rejected.
            dead_letter_queue(self._dead_letter_exchange).bind(link.channel).declare()
            self._local.link = link
        return link

    def _reset(self) -> None:
        link: _Link | None = getattr(self._local, "link", None)
        self._local.link = None
        if link is not None:
            link.abandon()

    def publish(self, messages_: Sequence[OutboxMessage]) -> None:
        for message in messages_:
            if message.kind != "task":
                raise PublishError(f"cannot publish {message.kind} {message.id} as a task")
        try:
            link = self._link()
            if _publish_hooked(self.app):
                self._send_tasks(link, messages_)
                return
            for message in messages_:
                self._send(link, message)
            link.wait_confirmed(CONFIRM_TIMEOUT)
        except PublishError:
            self._reset()
            raise
        except Exception as exc:
            # A broken connection is rebuilt for the next batch (the relay retries).
            self._reset()
            if broker_unavailable(exc):
                raise BrokerUnavailableError(f"publish failed: {exc!r}") from exc
            raise PublishError(f"publish failed: {exc!r}") from exc

    def _send(self, link: _Link, message: OutboxMessage) -> None:
        if message.queue == COMPENSATION_DEAD_LETTER_QUEUE:
            # A plain message on a queue nobody consumes: operators see dead-lettered
            # compensations in the broker's tools; the database row is the record.
            self._declare(link, Queue(COMPENSATION_DEAD_LETTER_QUEUE, durable=True))
            content_type, encoding, body = dumps(message.body, serializer="json")
            headers = {**message.headers, "message_id": message.id}
            properties = {"message_id": message.id, "delivery_mode": _PERSISTENT}
            prepared = link.channel.prepare_message(
                body, None, content_type, encoding, headers, properties
            )
            link.send(prepared, COMPENSATION_DEAD_LETTER_QUEUE)
            return
        queue = self.app.amqp.queues[message.queue]
        self._declare(link, queue)
        # Sent from inside a task (a worker's step), it is that task's child,
        # as send_task would make it: Flower draws the tree.
        parent = self.app.current_worker_task
        parent_id = parent.request.id if parent is not None else None
        root_id = (parent.request.root_id or parent_id) if parent is not None else None
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            message.id,
            message.destination,
            kwargs=message.body,
            kwargsrepr=task_kwargsrepr(message.body, message.headers),
            origin=self._origin,
            parent_id=parent_id,
            root_id=root_id,
        )
        headers.update(message.headers)
        content_type, encoding, payload = dumps(body, serializer=self.app.conf.task_serializer)
        properties["delivery_mode"] = _PERSISTENT
        prepared = link.channel.prepare_message(
            payload, None, content_type, encoding, headers, properties
        )
        link.send(prepared, queue.name)

    @staticmethod
    def _declare(link: _Link, queue: Queue) -> None:
        if queue.name not in link.declared:
            queue.bind(link.channel).declare()
            link.declared.add(queue.name)

    def _send_tasks(self, link: _Link, messages_: Sequence[OutboxMessage]) -> None:
        """Each message through ``send_task``, its signals and its confirm, one at a time."""
        producer = link.connection.Producer(channel=link.channel)
        for message in messages_:
            if message.queue == COMPENSATION_DEAD_LETTER_QUEUE:
                self._send(link, message)
                link.wait_confirmed(CONFIRM_TIMEOUT)
                continue
            self.app.send_task(
                message.destination,
                kwargs=message.body,
                task_id=message.id,
                queue=message.queue,
                headers=dict(message.headers),
                kwargsrepr=task_kwargsrepr(message.body, message.headers),
                producer=producer,
                # A reconnection inside kombu would leave confirm mode behind.
                retry=False,
            )
            link.sent()
            link.wait_confirmed(CONFIRM_TIMEOUT)


def _publish_hooked(app: Celery) -> bool:
    """Whether anything expects to see each publish (Celery's signals, task-sent events)."""
    return bool(
        signals.before_task_publish.receivers
        or signals.after_task_publish.receivers
        or app.conf.task_send_sent_event
    )
