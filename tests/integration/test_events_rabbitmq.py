"""Domain events against a real RabbitMQ and PostgreSQL.

The module works in a database of its own (``orchestrator_events_it`` on the
server of ``ORCHESTRATOR_TEST_DATABASE_URL``, recreated and migrated) and on
an event exchange of its own, deleted at the end, so it shares neither with
the rest of the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp.exceptions
import harness
import kombu
import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, func, select
from sqlalchemy.orm import Session

import events
from events import (
    DomainEvent,
    EventEnvelope,
    EventPublisher,
    SubscriberRegistry,
    SubscriberRuntime,
    Topology,
    event_type,
    inbox,
)
from events.cli import add_commands, run_command
from events.monitor import TailedMessage, tail
from examples.order_fulfillment import subscribers as example
from examples.order_fulfillment.events import OrderCompleted
from orchestrator import migrate
from outbox import OutboxMessage, OutboxWriter, PublishError, RecordingPublisher, Relay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = harness.BROKER_URL
DATABASE_URL = harness.database_url("orchestrator_events_it")
EXCHANGE = f"it-events-{uuid.uuid4().hex[:8]}"
TOPOLOGY = Topology(EXCHANGE)
# Every group a test consumes, so their queues can be deleted at the end.
GROUPS = ("analytics", "notifications", "early", "late", "poison", "ordered", "status")


@event_type("it.thing.happened")
class ThingHappened(DomainEvent):
    n: int


@event_type("unheard.thing.happened")
class Unheard(DomainEvent):
    """No group of this module binds a pattern that matches it."""

    n: int


seen_metadata = MetaData()
seen = Table(
    "it_seen",
    seen_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("group_name", String(64), nullable=False),
    Column("correlation_id", String(255), nullable=True),
    Column("n", Integer, nullable=False),
)


# ------------------------------------------------------------------------------ helpers
def queue_counts(name: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of queue ``name``, ``None`` if it does not exist."""
    with harness.broker_connection() as conn:
        channel = conn.channel()
        try:
            _, ready, consumers = channel.queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            return None
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    return ready, consumers


def take_all(name: str) -> list[Any]:
    """Every message now in queue ``name``, removed from it."""
    taken = []
    with harness.broker_connection() as conn:
        channel = conn.channel()
        while (message := channel.basic_get(name, no_ack=True)) is not None:
            taken.append(message)
    return taken


def publish_raw(body: bytes, routing_key: str, **properties: Any) -> None:
    with harness.broker_connection(confirm=True) as conn:
        producer = kombu.Producer(conn.channel(), auto_declare=False)
        producer.publish(
            body,
            exchange=EXCHANGE,
            routing_key=routing_key,
            content_type="application/json",
            content_encoding="utf-8",
            **properties,
        )


def envelope_bytes(event: DomainEvent, **fields: Any) -> bytes:
    fields.setdefault("producer", "it")
    return json.dumps(EventEnvelope.wrap(event, **fields).to_json()).encode()


class Outbox:
    """The application side: writes events in transactions, relays publish them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Events are left to the relay, which keeps each workflow's in order.
        self.writer = OutboxWriter(engine, RecordingPublisher(), relay_only_kinds={"event"})

    def write(self, event: DomainEvent, correlation_id: str | None = None) -> EventEnvelope:
        with Session(self.engine) as session:
            envelope = events.publish(
                session,
                self.writer,
                event,
                correlation_id=correlation_id,
                producer="it",
                exchange=EXCHANGE,
            )
            session.commit()
        return envelope

    def relay_all(self) -> None:
        with EventPublisher(BROKER_URL, exchange=EXCHANGE) as publisher:
            relay = Relay(self.engine, publisher, grace=0, relay_only_kinds={"event"})
            while relay.run_once():
                pass
            assert relay.backlog() == (0, None)

    def publish(self, event: DomainEvent, correlation_id: str | None = None) -> EventEnvelope:
        envelope = self.write(event, correlation_id)
        self.relay_all()
        return envelope


@contextlib.contextmanager
def running(runtime: SubscriberRuntime) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert runtime.wait_ready(30), "the subscriber runtime did not start consuming"
        yield thread
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the subscriber runtime did not stop"


def seen_rows(engine: Engine, group: str) -> list[tuple[str | None, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(seen.c.correlation_id, seen.c.n)
            .where(seen.c.group_name == group)
            .order_by(seen.c.id)
        )
        return [(row.correlation_id, row.n) for row in rows]


def recorder(group: str, registry: SubscriberRegistry, pattern: str = "it.#") -> None:
    """A handler in ``group`` that records each event it takes in ``it_seen``."""

    @events.subscriber(pattern, group=group, registry=registry, name=f"{group}.record")
    def record(event: ThingHappened, session: Session, envelope: EventEnvelope) -> None:
        session.execute(
            seen.insert().values(
                group_name=group, correlation_id=envelope.correlation_id, n=event.n
            )
        )


def runtime_for(engine: Engine, registry: SubscriberRegistry, **options: Any) -> SubscriberRuntime:
    return SubscriberRuntime(
        engine, BROKER_URL, subscriptions=registry, exchange=EXCHANGE, **options
    )


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    try:
        with harness.broker_connection() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        pytest.fail(f"RabbitMQ is unreachable at {BROKER_URL}: {exc!r}", pytrace=False)
    harness.recreate_database(DATABASE_URL)
    migrate.upgrade(DATABASE_URL)
    engine = create_engine(DATABASE_URL, pool_pre_ping=True)
    seen_metadata.create_all(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(scope="module", autouse=True)
def _own_topology() -> Iterator[None]:
    """The module's exchange and queues exist only while it runs."""
    yield
    _delete_topology()


def _delete_topology() -> None:
    with harness.broker_connection() as conn:
        for group in GROUPS:
            for queue in (TOPOLOGY.group_queue(group), TOPOLOGY.dead_letter_queue(group)):
                with contextlib.suppress(Exception):
                    conn.channel().queue_delete(queue)
            with contextlib.suppress(Exception):
                conn.channel().exchange_delete(TOPOLOGY.dead_letter_exchange(group))
        with contextlib.suppress(Exception):
            conn.channel().queue_delete(TOPOLOGY.unroutable_queue)
        for exchange in (EXCHANGE, TOPOLOGY.unroutable_exchange):
            with contextlib.suppress(Exception):
                conn.channel().exchange_delete(exchange)


@pytest.fixture
def outbox(engine: Engine) -> Outbox:
    return Outbox(engine)


# -------------------------------------------------------------------------------- tests
class Subscriber:
    """``python -m events subscribers run`` in a process of its own."""

    def __init__(self, log_path: Path, *groups: str, crash_at: str | None = None) -> None:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith("ORCHESTRATOR_")
        }
        env.update(
            ORCHESTRATOR_DATABASE_URL=DATABASE_URL,
            ORCHESTRATOR_BROKER_URL=BROKER_URL,
            ORCHESTRATOR_EVENTS_EXCHANGE=EXCHANGE,
            ORCHESTRATOR_SUBSCRIBER_MODULES="examples.order_fulfillment.subscribers",
            ORCHESTRATOR_LOG_LEVEL="INFO",
            PYTHONPATH=str(ROOT),
        )
        if crash_at:
            env["ORCHESTRATOR_CRASH_AT"] = crash_at
        arguments = [arg for group in groups for arg in ("--group", group)]
        self.log_path = log_path
        self._log = log_path.open("w")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "events", "subscribers", "run", *arguments],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        harness.wait_until(
            lambda: self.log().count(text) >= count,
            timeout,
            f"{text!r} in the subscriber's log:\n{self.log()}",
        )

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(30)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
            self._log.close()


def test_a_subscriber_killed_between_commit_and_ack_changes_nothing_on_redelivery(
    engine: Engine, outbox: Outbox, tmp_path: Path
) -> None:
    first = Subscriber(
        tmp_path / "first.log", "analytics", "notifications", crash_at="subscriber.after_commit"
    )
    try:
        for group in ("analytics", "notifications"):
            first.wait_for_log(f"subscriber group {group} consuming")
        envelope = outbox.publish(
            OrderCompleted(
                order_id="crash-1",
                customer_email="crash@example.com",
                total_cents=1000,
                charge_id="ch",
                shipment_id="sh",
                tracking_number="TRK",
            ),
            correlation_id="order-crash-1",
        )
        # The first group to commit its handler's transaction kills the process.
        assert first.popen.wait(30) == -signal.SIGKILL
    finally:
        first.stop()

    def handled_by() -> set[str]:
        with engine.connect() as conn:
            return set(
                conn.execute(
                    select(inbox.c.group_name).where(inbox.c.event_id == envelope.event_id)
                ).scalars()
            )

    crashed = handled_by()
    assert crashed, "no handler committed before the crash"
    for group in crashed:
        # Committed, never acknowledged: the broker holds it for redelivery.
        assert queue_counts(TOPOLOGY.group_queue(group)) == (1, 0)

    second = Subscriber(tmp_path / "second.log", "analytics", "notifications")
    try:
        for group in crashed:
            second.wait_for_log(f"group {group} already handled event {envelope.event_id}")
        harness.wait_until(
            lambda: handled_by() == {"analytics", "notifications"}, 30, "both groups"
        )
        for group in ("analytics", "notifications"):
            harness.wait_until(
                lambda group=group: queue_counts(TOPOLOGY.group_queue(group)) == (0, 1),
                30,
                f"{group}'s queue to be empty",
            )
    finally:
        assert second.stop() == 0, second.log()

    with engine.connect() as conn:
        emails = conn.execute(
            select(example.order_emails.c.recipient).where(
                example.order_emails.c.order_id == "crash-1"
            )
        ).all()
        outcomes = conn.execute(
            select(func.sum(example.order_outcomes_daily.c.completed))
        ).scalar_one()
    assert [row.recipient for row in emails] == ["crash@example.com"]
    assert outcomes == 1
    for group in ("analytics", "notifications"):
        assert queue_counts(TOPOLOGY.dead_letter_queue(group)) == (0, 0)


def test_a_group_added_later_receives_new_events_without_changing_the_publisher(
    engine: Engine, outbox: Outbox
) -> None:
    early = SubscriberRegistry()
    recorder("early", early)
    with running(runtime_for(engine, early)):
        outbox.publish(ThingHappened(n=1), correlation_id="later-1")
        harness.wait_until(
            lambda: seen_rows(engine, "early") == [("later-1", 1)], 30, "early's event 1"
        )

        # A new group: its own module, its own queue; publishers stay as they are.
        late = SubscriberRegistry()
        recorder("late", late)
        with running(runtime_for(engine, late)):
            outbox.publish(ThingHappened(n=2), correlation_id="later-1")
            harness.wait_until(
                lambda: seen_rows(engine, "late") == [("later-1", 2)], 30, "late's event"
            )
            harness.wait_until(
                lambda: seen_rows(engine, "early") == [("later-1", 1), ("later-1", 2)],
                30,
                "early's event 2",
            )
    assert seen_rows(engine, "late") == [("later-1", 2)]


def test_poison_messages_are_dead_lettered_with_their_reason_and_consuming_goes_on(
    engine: Engine,
) -> None:
    registry = SubscriberRegistry()

    @events.subscriber("it.#", group="poison", registry=registry, name="poison.record")
    def record(event: DomainEvent, session: Session, envelope: EventEnvelope) -> None:
        assert isinstance(event, ThingHappened)
        if event.n == 13:
            raise RuntimeError("thirteen is unlucky")
        session.execute(
            seen.insert().values(
                group_name="poison", correlation_id=envelope.correlation_id, n=event.n
            )
        )

    runtime = runtime_for(engine, registry, max_attempts=3, retry_delay=0.05)
    with running(runtime) as thread:
        publish_raw(b"{not json", "it.thing.happened", message_id="bad-json")
        publish_raw(
            json.dumps(
                {"type": "it.thing.unheard", "schema_version": 1, "producer": "x", "payload": {}}
            ).encode(),
            "it.thing.unheard",
            message_id="unknown-type",
        )
        publish_raw(
            json.dumps(
                {
                    "type": "it.thing.happened",
                    "schema_version": 1,
                    "producer": "x",
                    "payload": {"n": "many"},
                }
            ).encode(),
            "it.thing.happened",
            message_id="bad-schema",
        )
        publish_raw(envelope_bytes(ThingHappened(n=13)), "it.thing.happened", message_id="failing")
        publish_raw(envelope_bytes(ThingHappened(n=1), correlation_id="p"), "it.thing.happened")
        harness.wait_until(lambda: seen_rows(engine, "poison") == [("p", 1)], 30, "the good event")

        dead_queue = TOPOLOGY.dead_letter_queue("poison")
        harness.wait_until(
            lambda: (queue_counts(dead_queue) or (0, 0))[0] == 4, 30, "4 dead letters"
        )
        dead = {message.properties["message_id"]: message for message in take_all(dead_queue)}
        reasons = {
            message_id: message.headers[events.DEAD_LETTER_REASON_HEADER]
            for message_id, message in dead.items()
        }
        assert reasons["bad-json"].startswith("undecodable: not JSON")
        assert reasons["unknown-type"].startswith("unknown event type")
        assert reasons["bad-schema"].startswith("schema mismatch")
        assert reasons["failing"] == (
            "poison.record failed 3 time(s): RuntimeError: thirteen is unlucky"
        )
        assert dead["bad-json"].body in (b"{not json", "{not json")
        assert dead["failing"].headers["x-dead-letter-group"] == "poison"
        assert dead["failing"].headers["x-original-routing-key"] == "it.thing.happened"

        # Still consuming.
        assert thread.is_alive()
        publish_raw(envelope_bytes(ThingHappened(n=2), correlation_id="p"), "it.thing.happened")
        harness.wait_until(
            lambda: seen_rows(engine, "poison") == [("p", 1), ("p", 2)], 30, "event 2"
        )
    assert queue_counts(TOPOLOGY.group_queue("poison")) == (0, 0)


def test_an_unroutable_event_is_kept_by_the_alternate_exchange(outbox: Outbox) -> None:
    envelope = outbox.publish(Unheard(n=99), correlation_id="nobody-listens")
    messages = harness.wait_until(
        lambda: [
            message
            for message in take_all(TOPOLOGY.unroutable_queue)
            if message.properties.get("message_id") == envelope.event_id
        ],
        10,
        "the event in the unroutable queue",
    )
    [message] = messages
    assert message.delivery_info["routing_key"] == "unheard.thing.happened"
    assert EventEnvelope.model_validate_json(message.body) == envelope


def test_an_exchange_declared_otherwise_is_a_publish_error_and_the_publisher_recovers() -> None:
    clashing = f"{EXCHANGE}-clash"
    with harness.broker_connection() as conn:
        conn.channel().exchange_declare(clashing, "direct", durable=False, auto_delete=True)
    envelope = EventEnvelope.wrap(Unheard(n=1), producer="it")
    publisher = EventPublisher(BROKER_URL, exchange=EXCHANGE)
    try:
        with pytest.raises(PublishError, match="refused to declare exchange"):
            publisher.publish([events.event_message(envelope, exchange=clashing)])
        # The next batch starts on a fresh connection.
        publisher.publish([events.event_message(envelope, exchange=EXCHANGE)])
    finally:
        publisher.close()
        with harness.broker_connection() as conn, contextlib.suppress(Exception):
            conn.channel().exchange_delete(clashing)
        with harness.broker_connection() as conn, contextlib.suppress(Exception):
            conn.channel().exchange_delete(f"{clashing}.unroutable")
        with harness.broker_connection() as conn, contextlib.suppress(Exception):
            conn.channel().queue_delete(f"{clashing}.unroutable")
    # Routed nowhere: it went to the unroutable queue.
    assert any(
        message.properties.get("message_id") == envelope.event_id
        for message in take_all(TOPOLOGY.unroutable_queue)
    )


def test_events_of_one_workflow_arrive_in_commit_order_with_two_relays(
    engine: Engine, outbox: Outbox
) -> None:
    registry = SubscriberRegistry()
    recorder("ordered", registry)
    orders = [f"order-{index}" for index in range(3)]
    per_order = 40
    with running(runtime_for(engine, registry)):
        # Interleaved commits of three workflows, each event in its own transaction.
        for n in range(per_order):
            for order in orders:
                outbox.write(ThingHappened(n=n), correlation_id=order)

        stop = threading.Event()
        publishers = [EventPublisher(BROKER_URL, exchange=EXCHANGE) for _ in range(2)]
        relays = [
            Relay(
                engine,
                publisher,
                batch_size=7,
                grace=0,
                poll_interval=0.2,
                relay_only_kinds={"event"},
            )
            for publisher in publishers
        ]
        threads = [
            threading.Thread(target=relay.run, args=(stop,), daemon=True) for relay in relays
        ]
        for thread in threads:
            thread.start()
        try:
            harness.wait_until(
                lambda: len(seen_rows(engine, "ordered")) >= per_order * len(orders),
                60,
                "every event at the subscriber",
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
            for publisher in publishers:
                publisher.close()
    arrivals = seen_rows(engine, "ordered")
    assert len(arrivals) == per_order * len(orders)
    for order in orders:
        assert [n for correlation, n in arrivals if correlation == order] == list(range(per_order))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def events_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_EVENTS_EXCHANGE", EXCHANGE)


def command(*argv: str, as_json: bool) -> tuple[int, str]:
    out = io.StringIO()
    status = run_command(
        parse(*argv),
        settings_database_url=DATABASE_URL,
        broker_url=BROKER_URL,
        out=out,
        as_json=as_json,
    )
    return status, out.getvalue()


@pytest.mark.usefixtures("events_exchange")
def test_events_tail_command_stops_after_count_or_timeout(outbox: Outbox) -> None:
    result: list[tuple[int, str]] = []
    thread = threading.Thread(
        target=lambda: result.append(
            command("events", "tail", "--pattern", "it.thing.*", "--count", "2", as_json=True)
        ),
        daemon=True,
    )
    thread.start()
    published = 0
    # The tail's queue exists only once it runs: publish until it has seen two.
    while thread.is_alive() and published < 100:
        outbox.publish(ThingHappened(n=published), correlation_id="tailed")
        published += 1
        thread.join(0.3)
    thread.join(10)
    [(status, output)] = result
    assert status == 0
    lines = output.splitlines()
    assert len(lines) == 2
    for line in lines:
        envelope = EventEnvelope.model_validate_json(line)
        assert envelope.type == "it.thing.happened"
        assert envelope.correlation_id == "tailed"

    started = time.monotonic()
    assert command("events", "tail", "--pattern", "nothing.*", "--timeout", "1", as_json=False) == (
        0,
        "",
    )
    assert 0.9 <= time.monotonic() - started < 10


@pytest.mark.usefixtures("events_exchange")
def test_subscribers_status_command_shows_backlog_dead_letters_and_lag(
    engine: Engine, outbox: Outbox
) -> None:
    registry = SubscriberRegistry()
    recorder("status", registry)
    with running(runtime_for(engine, registry)):
        outbox.publish(ThingHappened(n=1), correlation_id="status-1")
        harness.wait_until(lambda: seen_rows(engine, "status"), 30, "the first event")
    # Nobody consumes now: these wait in the group's queue.
    outbox.publish(ThingHappened(n=2), correlation_id="status-1")
    outbox.publish(ThingHappened(n=3), correlation_id="status-1")

    status, output = command("subscribers", "status", "--group", "status,never-ran", as_json=True)
    assert status == 0
    document = json.loads(output)
    assert document["exchange"] == EXCHANGE
    assert isinstance(document["unroutable"], int)
    groups = {group["group"]: group for group in document["groups"]}
    assert {"status", "never-ran"} <= set(groups)
    group = groups["status"]
    assert group["queue"] == TOPOLOGY.group_queue("status")
    assert group["exists"]
    assert (group["handled"], group["consumers"], group["ready"], group["dead_letters"]) == (
        1,
        0,
        2,
        0,
    )
    assert group["lag_seconds"] is not None
    assert 0 <= group["lag_seconds"] < 30
    assert group["last_handled_at"] is not None
    assert groups["never-ran"]["exists"] is False
    assert groups["never-ran"]["handled"] == 0

    status, text = command("subscribers", "status", "--group", "status", as_json=False)
    assert status == 0
    lines = text.splitlines()
    assert lines[0].startswith(f"exchange {EXCHANGE}")
    assert lines[1].split()[:3] == ["group", "waiting", "consumers"]
    [row] = [line for line in lines if line.startswith("status ")]
    assert row.split()[1:5] == ["2", "0", "0", "1"]


def test_tail_sees_events_from_when_it_is_bound(outbox: Outbox) -> None:
    seen_messages: list[TailedMessage] = []
    ready = threading.Event()
    thread = threading.Thread(
        target=tail,
        args=(BROKER_URL, seen_messages.append),
        kwargs={"exchange": EXCHANGE, "pattern": "it.#", "count": 1, "timeout": 30, "ready": ready},
        daemon=True,
    )
    thread.start()
    assert ready.wait(10)
    envelope = outbox.publish(ThingHappened(n=5), correlation_id="tail-1")
    thread.join(30)
    assert [message.envelope for message in seen_messages] == [envelope]


@pytest.mark.timeout(180)
def test_a_broker_that_blocks_publishers_fails_the_batch_in_bounded_time() -> None:
    # The relay must not hang on a broker alarm: the batch fails within its
    # confirm timeout, the connection is dropped without waiting for the
    # broker, and once the alarm clears the next batch goes out.
    def event(n: int) -> OutboxMessage:
        return OutboxMessage(
            kind="event", destination="it.blocked", body={"type": "it.blocked", "n": n}
        )

    before, during, after = event(1), event(2), event(3)
    with EventPublisher(BROKER_URL, exchange=EXCHANGE, confirm_timeout=3.0) as publisher:
        publisher.publish([before])  # the publisher's connection is up
        waited = harness.blocked_publish_seconds(lambda: publisher.publish([during]))
        assert waited < 3.0 + 5, f"the blocked publish held the relay {waited:.1f}s"
        publisher.publish([after])
