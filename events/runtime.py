"""The subscriber runtime: consumes each group's queue and runs its handlers once per event.

For every delivery, in this order:

1. The body is parsed and validated as an :class:`EventEnvelope`, and the
   payload decoded for the handlers that want it. Anything that fails here can
   never succeed: the message goes to the group's dead-letter queue with the
   reason in its headers, is acknowledged, and the consumer moves on.
2. One database transaction inserts the inbox row ``(group, event_id)`` and
   runs every matching handler of the group with that transaction's session.
   If the row already exists, the event was handled before (a redelivery):
   nothing runs.
3. After the commit, and only then, the message is acknowledged. A crash
   between the two redelivers the message, and step 2 finds the row.

A handler that raises is retried in place, with exponential backoff, up to
``max_attempts`` times; then the message is dead-lettered with the last error.
Retrying in place keeps the group's events in order, at the price of holding
the group's later events back meanwhile. Database outages outside a handler
(the inbox insert, a lost connection) are retried without limit and do not
count as attempts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy import Engine, insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from events.domain import DomainEvent, EventRegistry, registry
from events.envelope import DEFAULT_EXCHANGE, EventEnvelope
from events.errors import (
    EventSchemaError,
    RejectEvent,
    SubscriberError,
    UnknownEventTypeError,
)
from events.schema import inbox
from events.subscribers import SubscriberRegistry, Subscription, subscriptions
from events.topology import QueueType, Topology, declare_group
from outbox.crashpoints import crash_point

__all__ = ["DEAD_LETTER_REASON_HEADER", "Outcome", "SubscriberRuntime"]

_log = logging.getLogger("events.subscribers")

DEAD_LETTER_REASON_HEADER = "x-dead-letter-reason"
"""Header of a dead-lettered event that says why it was dead-lettered."""

_MAX_REASON = 1000
# How long one wait for deliveries goes without looking at the stop event and heartbeats.
_DRAIN_TIMEOUT = 1.0
_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery.

    Attributes:
        action: ``"ack"`` (handled, a duplicate, or no handler applies),
            ``"dead_letter"`` (poison; ``reason`` says why) or ``"abandon"``
            (stopped before finishing; the message is left to be redelivered).
        reason: Why it was dead-lettered, or a note on an acknowledgement.
        handlers: Names of the handlers that ran and committed.
        duplicate: The inbox already had the event.
        event_id: The event's id, when the envelope could be read.
    """

    action: Literal["ack", "dead_letter", "abandon"]
    reason: str | None = None
    handlers: tuple[str, ...] = ()
    duplicate: bool = False
    event_id: str | None = None


class _HandlerFailed(Exception):
    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(f"{name}: {error!r}")
        self.name = name
        self.error = error


def _connection_lost(error: BaseException) -> bool:
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _short(exc: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(item) for item in error['loc']) or '(body)'}: {error['msg']}"
        for error in exc.errors()[:5]
    ]
    return "; ".join(parts)


class SubscriberRuntime:
    """Consumes the queues of subscriber groups and runs their handlers.

    Args:
        engine: Database of the inbox, and of the handlers' sessions.
        broker_url: AMQP URL of the broker.
        groups: Groups to consume. Defaults to every group that has a subscription.
        subscriptions: Where the handlers come from: a registry or a list.
            Defaults to the module-level registry filled by ``@subscriber``.
        registry: Event types for decoding payloads. Defaults to the module-level one.
        exchange: The event exchange. Defaults to ``orchestrator.events``.
        prefetch_count: Deliveries a group's consumer holds unacknowledged.
            Defaults to 10; they are handled one at a time, in order.
        max_attempts: Calls of a failing handler before its event is
            dead-lettered. Defaults to 5.
        retry_delay: Seconds before the first retry, doubled for each next one.
            Defaults to 0.5.
        max_retry_delay: Longest pause between retries. Defaults to 30.
        queue_type: ``"auto"`` (quorum where supported; the default),
            ``"quorum"`` or ``"classic"``.
        single_active_consumer: Let only one consumer of a group take messages
            at a time, others standing by, which keeps a group's events in
            order across processes. Defaults to ``True``.
        delivery_limit: On quorum queues, dead-letter a message delivered this
            often (one that kills its consumer every time). Defaults to 20.
        heartbeat: AMQP heartbeat in seconds; a handler running longer than
            about twice this loses its connection and its event is redelivered.
            Defaults to 60.

    Raises:
        SubscriberError: a group has no subscription, or a handler's signature is wrong.
    """

    def __init__(
        self,
        engine: Engine,
        broker_url: str,
        *,
        groups: Iterable[str] | None = None,
        subscriptions: SubscriberRegistry | Iterable[Subscription] | None = None,
        registry: EventRegistry | None = None,
        exchange: str = DEFAULT_EXCHANGE,
        prefetch_count: int = 10,
        max_attempts: int = 5,
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
        queue_type: QueueType = "auto",
        single_active_consumer: bool = True,
        delivery_limit: int | None = 20,
        heartbeat: float = 60.0,
    ) -> None:
        if prefetch_count < 1:
            raise ValueError("prefetch_count must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if retry_delay < 0 or max_retry_delay < 0:
            raise ValueError("retry delays must not be negative")
        self.engine = engine
        self.broker_url = broker_url
        self.registry = registry or _default_registry()
        self.topology = Topology(exchange)
        self.prefetch_count = prefetch_count
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.queue_type: QueueType = queue_type
        self.single_active_consumer = single_active_consumer
        self.delivery_limit = delivery_limit
        self.heartbeat = heartbeat
        self.groups = _select_groups(_subscription_list(subscriptions), groups)
        for members in self.groups.values():
            for subscription in members:
                subscription.resolve()
        self._ready = {group: threading.Event() for group in self.groups}

    # -- topology -------------------------------------------------------------------
    def patterns(self, group: str) -> list[str]:
        """The distinct patterns ``group``'s queue is bound with."""
        return list(dict.fromkeys(s.pattern for s in self.groups[group]))

    def declare(self) -> None:
        """Declare the exchange and every group's queues and bindings now.

        A group's queue receives the events published after it exists; declaring
        ahead of the first run lets a new group start collecting at once.
        """
        from events._broker import kombu

        with kombu.Connection(self.broker_url) as connection:
            channel = connection.channel()
            for group in self.groups:
                self._declare_group(channel, group)

    def _declare_group(self, channel: Any, group: str) -> None:
        declare_group(
            channel,
            self.topology,
            group,
            self.patterns(group),
            queue_type=self.queue_type,
            single_active_consumer=self.single_active_consumer,
            delivery_limit=self.delivery_limit,
        )

    # -- running --------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume every group until ``stop`` is set, one thread and connection per group.

        Broker and database failures are logged and retried with growing
        pauses, so the runtime outlives restarts of either. On stop, an event
        being handled finishes (or is abandoned between retries) and
        unacknowledged ones go back to their queue.
        """
        threads = [
            threading.Thread(
                target=self._consume_forever,
                args=(group, stop),
                name=f"subscribers-{group}",
                daemon=True,
            )
            for group in self.groups
        ]
        for thread in threads:
            thread.start()
        try:
            stop.wait()
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every group consumes (or ``timeout`` seconds); return whether they do."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._ready.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(remaining):
                return False
        return True

    def _consume_forever(self, group: str, stop: threading.Event) -> None:
        backoff = 0.0
        while not stop.is_set():
            try:
                self._consume(group, stop)
                backoff = 0.0
            except Exception as exc:
                self._ready[group].clear()
                backoff = min(_MAX_BACKOFF, max(_MIN_BACKOFF, backoff * 2))
                _log.warning(
                    "subscriber group %s stopped consuming, starting again in %.1fs: %s",
                    group,
                    backoff,
                    exc,
                    exc_info=_log.isEnabledFor(logging.DEBUG),
                )
                stop.wait(backoff)
        self._ready[group].clear()

    def _consume(self, group: str, stop: threading.Event) -> None:
        from events._broker import kombu

        queue_name = self.topology.group_queue(group)
        connection = kombu.Connection(
            self.broker_url,
            heartbeat=self.heartbeat,
            transport_options={"confirm_publish": True},
        )
        with connection:
            connection.ensure_connection(max_retries=1)
            channel = connection.channel()
            self._declare_group(channel, group)
            channel.basic_qos(prefetch_size=0, prefetch_count=self.prefetch_count, a_global=False)
            dead_letters = kombu.Producer(connection.channel(), auto_declare=False)

            def on_message(message: Any) -> None:
                self._deliver(group, message, dead_letters, connection, stop)

            consumer = kombu.Consumer(
                channel,
                queues=[kombu.Queue(queue_name, no_declare=True)],
                on_message=on_message,
                no_ack=False,
                auto_declare=False,
            )
            consumer.consume()
            _log.info(
                "subscriber group %s consuming %s (%s)",
                group,
                queue_name,
                ", ".join(self.patterns(group)),
            )
            self._ready[group].set()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=_DRAIN_TIMEOUT)
                connection.heartbeat_check()
            self._ready[group].clear()
            consumer.cancel()

    def _deliver(
        self,
        group: str,
        message: Any,
        dead_letters: Any,
        connection: Any,
        stop: threading.Event,
    ) -> None:
        def pause(seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                stop.wait(min(remaining, _DRAIN_TIMEOUT))
                connection.heartbeat_check()
            return False

        outcome = self.process(group, message.body, pause=pause)
        if outcome.action == "abandon":
            return
        if outcome.action == "dead_letter":
            self._dead_letter(group, message, dead_letters, outcome.reason or "rejected")
        crash_point("subscriber.after_commit")
        message.ack()

    def _dead_letter(self, group: str, message: Any, producer: Any, reason: str) -> None:
        info = message.delivery_info or {}
        properties = dict(message.properties or {})
        headers = dict(message.headers or {})
        headers.update(
            {
                DEAD_LETTER_REASON_HEADER: reason[:_MAX_REASON],
                "x-dead-letter-group": group,
                "x-dead-lettered-at": _now().isoformat(),
                "x-original-exchange": str(info.get("exchange") or ""),
                "x-original-routing-key": str(info.get("routing_key") or ""),
            }
        )
        extra = {
            key: properties[key]
            for key in ("message_id", "correlation_id", "type", "timestamp", "app_id")
            if properties.get(key) is not None
        }
        producer.publish(
            message.body,
            exchange=self.topology.dead_letter_exchange(group),
            routing_key=str(info.get("routing_key") or ""),
            content_type=message.content_type or "application/octet-stream",
            content_encoding=message.content_encoding or "binary",
            delivery_mode=2,
            headers=headers,
            retry=False,
            **extra,
        )
        _log.error(
            "event %s dead-lettered by group %s: %s",
            properties.get("message_id") or "(no id)",
            group,
            reason,
        )

    # -- one delivery -----------------------------------------------------------------
    def process(
        self,
        group: str,
        body: bytes | str,
        *,
        pause: Callable[[float], bool] | None = None,
    ) -> Outcome:
        """Handle one delivery of ``body`` to ``group``; say what to do with the message.

        Broker-free, so it can be called directly (tests, replaying a
        dead-lettered event). ``pause(seconds)`` waits between retries and
        returns ``False`` to give up; it defaults to ``time.sleep``.
        """
        wait = pause or _sleep
        members = self.groups.get(group)
        if members is None:
            raise SubscriberError(f"unknown subscriber group {group!r}")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return Outcome("dead_letter", f"undecodable: not JSON ({exc})")
        if not isinstance(data, dict):
            return Outcome("dead_letter", "undecodable: not a JSON object")
        try:
            envelope = EventEnvelope.model_validate(data)
        except ValidationError as exc:
            return Outcome("dead_letter", f"invalid envelope: {_short(exc)}")
        calls: list[tuple[Subscription, EventEnvelope | DomainEvent]] = []
        for subscription in members:
            if not subscription.matches(envelope.type):
                continue
            try:
                value = subscription.argument(envelope, self.registry)
            except UnknownEventTypeError as exc:
                return Outcome(
                    "dead_letter", f"unknown event type: {exc}", event_id=envelope.event_id
                )
            except EventSchemaError as exc:
                return Outcome("dead_letter", f"schema mismatch: {exc}", event_id=envelope.event_id)
            if value is not None:
                calls.append((subscription, value))
        if not calls:
            _log.debug("no handler of group %s takes %s", group, envelope.type)
            return Outcome("ack", "no handler applies", event_id=envelope.event_id)
        return self._handle(group, envelope, calls, wait)

    def _handle(
        self,
        group: str,
        envelope: EventEnvelope,
        calls: Sequence[tuple[Subscription, EventEnvelope | DomainEvent]],
        wait: Callable[[float], bool],
    ) -> Outcome:
        attempt = 0
        outage = 0.0
        while True:
            try:
                ran = self._transaction(group, envelope, calls)
            except _HandlerFailed as failure:
                error = failure.error
                if isinstance(error, RejectEvent):
                    return Outcome(
                        "dead_letter",
                        f"rejected by {failure.name}: {error.reason}",
                        event_id=envelope.event_id,
                    )
                if _connection_lost(error):
                    outage = self._outage_backoff(outage, group, envelope, error)
                    delay = outage
                else:
                    attempt += 1
                    if attempt >= self.max_attempts:
                        return Outcome(
                            "dead_letter",
                            f"{failure.name} failed {attempt} time(s): {_describe(error)}",
                            event_id=envelope.event_id,
                        )
                    delay = min(self.max_retry_delay, self.retry_delay * 2 ** (attempt - 1))
                    _log.warning(
                        "group %s: %s failed on event %s (%s), attempt %d of %d, "
                        "retrying in %.1fs: %s",
                        group,
                        failure.name,
                        envelope.event_id,
                        envelope.type,
                        attempt,
                        self.max_attempts,
                        delay,
                        _describe(error),
                        exc_info=error,
                    )
            except Exception as exc:
                outage = self._outage_backoff(outage, group, envelope, exc)
                delay = outage
            else:
                if ran is None:
                    _log.info(
                        "group %s already handled event %s (%s); acknowledging the redelivery",
                        group,
                        envelope.event_id,
                        envelope.type,
                    )
                    return Outcome(
                        "ack", "already handled", duplicate=True, event_id=envelope.event_id
                    )
                _log.debug(
                    "group %s handled event %s (%s)", group, envelope.event_id, envelope.type
                )
                return Outcome("ack", handlers=ran, event_id=envelope.event_id)
            if not wait(delay):
                return Outcome("abandon", "stopped", event_id=envelope.event_id)

    def _outage_backoff(
        self, current: float, group: str, envelope: EventEnvelope, error: BaseException
    ) -> float:
        delay = min(_MAX_BACKOFF, max(_MIN_BACKOFF, current * 2))
        _log.warning(
            "group %s: database unavailable while handling event %s, retrying in %.1fs: %s",
            group,
            envelope.event_id,
            delay,
            _describe(error),
        )
        return delay

    def _transaction(
        self,
        group: str,
        envelope: EventEnvelope,
        calls: Sequence[tuple[Subscription, EventEnvelope | DomainEvent]],
    ) -> tuple[str, ...] | None:
        """Run the handlers with the inbox row in one transaction; ``None`` for a duplicate."""
        with Session(self.engine) as session:
            session.begin()
            if not self._claim(session, group, envelope):
                session.rollback()
                return None
            for subscription, value in calls:
                try:
                    subscription.call(value, session, envelope)
                except Exception as exc:
                    raise _HandlerFailed(subscription.name, exc) from exc
            try:
                session.commit()
            except Exception as exc:
                names = ", ".join(subscription.name for subscription, _ in calls)
                raise _HandlerFailed(f"commit of {names}", exc) from exc
        return tuple(subscription.name for subscription, _ in calls)

    def _claim(self, session: Session, group: str, envelope: EventEnvelope) -> bool:
        """Insert the inbox row; ``False`` if the group already has it."""
        values = {
            "group_name": group,
            "event_id": envelope.event_id,
            "event_type": envelope.type,
            "schema_version": envelope.schema_version,
            "correlation_id": envelope.correlation_id,
            "occurred_at": envelope.occurred_at,
            "processed_at": _now(),
        }
        dialect = session.get_bind().dialect.name
        # A concurrent insert of the same row waits for the other transaction
        # and then skips, so two consumers never both handle one event.
        if dialect == "postgresql":
            from sqlalchemy.dialects import postgresql

            statement: Any = postgresql.insert(inbox).on_conflict_do_nothing(
                index_elements=[inbox.c.group_name, inbox.c.event_id]
            )
        elif dialect == "sqlite":
            from sqlalchemy.dialects import sqlite

            statement = sqlite.insert(inbox).on_conflict_do_nothing(
                index_elements=[inbox.c.group_name, inbox.c.event_id]
            )
        else:
            statement = None
        if statement is not None:
            # RETURNING rather than the row count, which not every driver reports.
            inserted = session.execute(
                statement.values(**values).returning(inbox.c.event_id)
            ).first()
            return inserted is not None
        try:
            with session.begin_nested():
                session.execute(insert(inbox).values(**values))
        except IntegrityError:
            return False
        return True


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def _default_registry() -> EventRegistry:
    return registry


def _subscription_list(
    source: SubscriberRegistry | Iterable[Subscription] | None,
) -> list[Subscription]:
    if source is None:
        return subscriptions.all()
    if isinstance(source, SubscriberRegistry):
        return source.all()
    return list(source)


def _select_groups(
    available: list[Subscription], wanted: Iterable[str] | None
) -> dict[str, list[Subscription]]:
    grouped: dict[str, list[Subscription]] = {}
    for subscription in available:
        grouped.setdefault(subscription.group, []).append(subscription)
    if wanted is None:
        if not grouped:
            raise SubscriberError(
                "no subscribers are registered: name their modules in "
                "ORCHESTRATOR_SUBSCRIBER_MODULES"
            )
        return dict(sorted(grouped.items()))
    selected: dict[str, list[Subscription]] = {}
    for group in wanted:
        if group not in grouped:
            known = ", ".join(sorted(grouped)) or "none"
            raise SubscriberError(
                f"no subscriber is registered in group {group!r} (registered groups: {known})"
            )
        selected[group] = grouped[group]
    if not selected:
        raise SubscriberError("no subscriber group to consume")
    return selected
