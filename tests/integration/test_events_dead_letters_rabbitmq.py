"""Dead-lettered events against a real RabbitMQ and PostgreSQL: list, replay, discard.

The module works in a database of its own (``orchestrator_events_dlq_it`` on
the server of ``ORCHESTRATOR_TEST_DATABASE_URL``, recreated and migrated) and
on an event exchange of its own, deleted at the end, so it shares neither
with the rest of the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
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
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.orm import Session

import events
from events import (
    DEAD_LETTER_REASON_HEADER,
    DeadLetterError,
    DomainEvent,
    EventEnvelope,
    SubscriberRegistry,
    SubscriberRuntime,
    Topology,
    discard_dead_letters,
    event_type,
    inbox,
    list_dead_letters,
    replay_dead_letters,
)
from events.cli import add_commands, run_command
from events.dead_letters import REFRESH_AFTER
from events.topology import QueueType, declare_group
from orchestrator import migrate
from orchestrator.schema import audit_log

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = harness.BROKER_URL
DATABASE_URL = harness.database_url("orchestrator_events_dlq_it")
EXCHANGE = f"it-dlq-{uuid.uuid4().hex[:8]}"
TOPOLOGY = Topology(EXCHANGE)
# An exchange's unroutable queue has one type: classic queues get an exchange of their own.
CLASSIC = Topology(f"{EXCHANGE}-classic")
# Every group a test uses, so their queues can be deleted at the end.
GROUPS = (
    "dlq-poison",
    "dlq-race",
    "dlq-processes",
    "dlq-discard",
    "dlq-order-quorum",
    "dlq-order-classic",
    "dlq-no-queue",
)


@event_type("it.dlq.parcel")
class Parcel(DomainEvent):
    n: int


seen_metadata = MetaData()
seen = Table(
    "it_dlq_seen",
    seen_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("n", Integer, nullable=False),
)


# ------------------------------------------------------------------------------ helpers
def ready_count(queue: str) -> int | None:
    """Messages ready in ``queue``, ``None`` if it does not exist."""
    with harness.broker_connection() as conn:
        channel = conn.channel()
        try:
            _, ready, _ = channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return None
        finally:
            with contextlib.suppress(Exception):
                channel.close()
    return int(ready)


def drain(queue: str, expected: int, timeout: float = 10) -> list[Any]:
    """Consume ``queue`` until ``expected`` messages came or ``timeout``, then a moment longer.

    Group queues have single active consumer, where ``basic.get`` is refused.
    """
    taken: list[Any] = []
    with harness.broker_connection() as conn:
        channel = conn.channel()
        channel.basic_consume(queue=queue, callback=taken.append, no_ack=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(taken) < expected:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
        # Anything beyond what was expected (a duplicate) would show up now.
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)
    return taken


def envelope_bytes(event: DomainEvent, **fields: Any) -> tuple[str, bytes]:
    envelope = EventEnvelope.wrap(event, producer="it", **fields)
    return envelope.event_id, json.dumps(envelope.to_json()).encode()


def publish_event(event: DomainEvent, correlation_id: str) -> str:
    """Publish ``event`` to the exchange as the relay would; return its id."""
    event_id, body = envelope_bytes(event, correlation_id=correlation_id)
    with harness.broker_connection(confirm=True) as conn:
        producer = kombu.Producer(conn.channel(), auto_declare=False)
        producer.publish(
            body,
            exchange=EXCHANGE,
            routing_key=Parcel.EVENT_TYPE,
            content_type="application/json",
            content_encoding="utf-8",
            message_id=event_id,
            delivery_mode=2,
        )
    return event_id


def declare(group: str, queue_type: QueueType = "auto", topology: Topology = TOPOLOGY) -> None:
    with harness.broker_connection() as conn:
        declare_group(conn.channel(), topology, group, ["it.dlq.#"], queue_type=queue_type)


def put_dead_letters(
    group: str,
    count: int,
    reason: str = "dlq.record failed 5 time(s)",
    body: bytes | None = None,
    topology: Topology = TOPOLOGY,
) -> list[str]:
    """``count`` dead letters in ``group``'s dead-letter queue, as the runtime writes them.

    Each a new event, or copies of the event ``body``.
    """
    ids = []
    dead_queue = topology.dead_letter_queue(group)
    before = ready_count(dead_queue) or 0
    with harness.broker_connection(confirm=True) as conn:
        producer = kombu.Producer(conn.channel(), auto_declare=False)
        for n in range(count):
            if body is None:
                event_id, content = envelope_bytes(Parcel(n=n), correlation_id=f"parcel-{n}")
            else:
                event_id, content = json.loads(body)["event_id"], body
            producer.publish(
                content,
                exchange=topology.dead_letter_exchange(group),
                routing_key=Parcel.EVENT_TYPE,
                content_type="application/json",
                content_encoding="utf-8",
                message_id=event_id,
                delivery_mode=2,
                headers={
                    DEAD_LETTER_REASON_HEADER: f"{reason} (#{n})",
                    "x-dead-letter-group": group,
                    "x-dead-lettered-at": "2026-01-02T03:04:05+00:00",
                    "x-original-exchange": topology.exchange,
                    "x-original-routing-key": Parcel.EVENT_TYPE,
                },
            )
            ids.append(event_id)
    try:
        harness.wait_until(
            lambda: ready_count(dead_queue) == before + count, 30, "the dead letters"
        )
    except AssertionError as exc:
        # What the queue held says whether messages went missing or came twice.
        raise AssertionError(
            f"{exc}: {ready_count(dead_queue)} ready in {dead_queue}, {before + count} expected"
        ) from None
    return ids


def listed_ids(group: str, exchange: str = EXCHANGE) -> list[str]:
    return [
        event.event_id for event in list_dead_letters(BROKER_URL, group=group, exchange=exchange)
    ]


def list_command(group: str) -> list[str]:
    """The lines ``subscribers dead-letters list --group G`` prints."""
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    status = run_command(
        parser.parse_args(["subscribers", "dead-letters", "list", "--group", group]),
        settings_database_url=DATABASE_URL,
        broker_url=BROKER_URL,
        out=out,
        as_json=False,
    )
    assert status == 0
    return out.getvalue().splitlines()


@contextlib.contextmanager
def running(runtime: SubscriberRuntime) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert runtime.wait_ready(30), "the subscriber runtime did not start consuming"
        yield
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the subscriber runtime did not stop"


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
    """The module's exchanges and queues exist only while it runs."""
    yield
    with harness.broker_connection() as conn:
        for topology in (TOPOLOGY, CLASSIC):
            for group in GROUPS:
                for queue in (topology.group_queue(group), topology.dead_letter_queue(group)):
                    with contextlib.suppress(Exception):
                        conn.channel().queue_delete(queue)
                with contextlib.suppress(Exception):
                    conn.channel().exchange_delete(topology.dead_letter_exchange(group))
            with contextlib.suppress(Exception):
                conn.channel().queue_delete(topology.unroutable_queue)
            for exchange in (topology.exchange, topology.unroutable_exchange):
                with contextlib.suppress(Exception):
                    conn.channel().exchange_delete(exchange)


# -------------------------------------------------------------------------------- tests
def test_a_poison_event_is_listed_replayed_after_the_fix_and_handled_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    group = "dlq-poison"
    broken = threading.Event()
    broken.set()
    registry = SubscriberRegistry()

    @events.subscriber("it.dlq.#", group=group, registry=registry, name="dlq.record")
    def record(event: Parcel, session: Session, envelope: EventEnvelope) -> None:
        if broken.is_set() and event.n == 13:
            raise RuntimeError("the parcel service is down")
        session.execute(seen.insert().values(event_id=envelope.event_id, n=event.n))

    def handled(event_id: str) -> int:
        with engine.connect() as conn:
            return len(conn.execute(select(seen.c.id).where(seen.c.event_id == event_id)).all())

    runtime = SubscriberRuntime(
        engine,
        BROKER_URL,
        subscriptions=registry,
        exchange=EXCHANGE,
        max_attempts=2,
        retry_delay=0.01,
    )
    dead_queue = TOPOLOGY.dead_letter_queue(group)
    with running(runtime):
        poison = publish_event(Parcel(n=13), "parcel-13")
        good = publish_event(Parcel(n=1), "parcel-1")
        harness.wait_until(lambda: handled(good) == 1, 30, "the good event")
        harness.wait_until(
            lambda: ready_count(dead_queue) == 1, 30, "the poison event's dead letter"
        )

        # Listed with its reason, and left where it is.
        [dead] = list_dead_letters(BROKER_URL, group=group, exchange=EXCHANGE)
        assert dead.event_id == poison
        assert (
            dead.reason == "dlq.record failed 2 time(s): RuntimeError: the parcel service is down"
        )
        assert (dead.type, dead.correlation_id, dead.group) == ("it.dlq.parcel", "parcel-13", group)
        assert dead.occurred_at is not None
        assert dead.dead_lettered_at is not None
        assert json.loads(dead.body)["payload"] == {"n": 13}
        assert listed_ids(group) == [poison]
        assert ready_count(dead_queue) == 1

        # The command shows it the same way.
        monkeypatch.setenv("ORCHESTRATOR_EVENTS_EXCHANGE", EXCHANGE)
        lines = list_command(group)
        assert lines[0] == f"group {group}: 1 dead letter(s), oldest first"
        assert lines[2].startswith(f"{poison}  it.dlq.parcel  ")
        assert "dlq.record failed 2 time(s): RuntimeError: the parcel service is down" in lines[2]
        assert handled(poison) == 0

        # Fixed: the replay moves it back, and the running subscriber handles it.
        broken.clear()
        calls: list[tuple[int, int, str]] = []
        assert replay_dead_letters(
            BROKER_URL,
            group=group,
            exchange=EXCHANGE,
            event_ids=[poison],
            progress=lambda number, total, event: calls.append((number, total, event.event_id)),
        ) == [(poison, True)]
        assert calls == [(1, 1, poison)]
        harness.wait_until(lambda: handled(poison) == 1, 30, "the replayed event to be handled")
        assert ready_count(dead_queue) == 0

        # A second replay finds nothing to move.
        assert replay_dead_letters(
            BROKER_URL, group=group, exchange=EXCHANGE, event_ids=[poison]
        ) == [(poison, False)]
        assert replay_dead_letters(BROKER_URL, group=group, exchange=EXCHANGE, event_ids=None) == []

        # A copy that a replay cut short left behind is delivered again: the inbox drops it.
        with caplog.at_level("INFO", logger="events.subscribers"):
            put_dead_letters(group, 1, body=dead.body)
            assert replay_dead_letters(
                BROKER_URL, group=group, exchange=EXCHANGE, event_ids=[poison]
            ) == [(poison, True)]
            harness.wait_until(
                lambda: f"group {group} already handled event {poison}" in caplog.text,
                30,
                "the duplicate to be dropped",
            )
    assert handled(poison) == 1
    with engine.connect() as conn:
        rows = conn.execute(
            select(inbox.c.event_id).where(inbox.c.group_name == group, inbox.c.event_id == poison)
        ).all()
    assert len(rows) == 1
    assert ready_count(TOPOLOGY.group_queue(group)) == 0


def test_concurrent_replays_move_each_event_once(engine: Engine) -> None:
    group = "dlq-race"
    declare(group)
    ids = put_dead_letters(group, 60)
    barrier = threading.Barrier(2)
    results: list[list[tuple[str, bool]]] = []
    errors: list[BaseException] = []

    def replay() -> None:
        try:
            barrier.wait(10)
            results.append(
                replay_dead_letters(BROKER_URL, group=group, exchange=EXCHANGE, event_ids=ids)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replay, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    first, second = ({event_id for event_id, moved in result if moved} for result in results)
    assert first | second == set(ids)
    assert not first & second
    assert ready_count(TOPOLOGY.dead_letter_queue(group)) == 0
    arrived = [
        message.properties["message_id"] for message in drain(TOPOLOGY.group_queue(group), 60)
    ]
    assert sorted(arrived) == sorted(ids)


def test_replays_from_two_processes_move_each_event_once_and_are_audited(engine: Engine) -> None:
    group = "dlq-processes"
    declare(group)
    ids = put_dead_letters(group, 100)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ORCHESTRATOR_")}
    env.update(
        ORCHESTRATOR_DATABASE_URL=DATABASE_URL,
        ORCHESTRATOR_BROKER_URL=BROKER_URL,
        ORCHESTRATOR_EVENTS_EXCHANGE=EXCHANGE,
        ORCHESTRATOR_ACTOR="it-operator",
        ORCHESTRATOR_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    argv = [
        sys.executable,
        "-m",
        "events",
        "--json",
        "subscribers",
        "dead-letters",
        "replay",
        "--group",
        group,
        "--all",
    ]
    processes = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    moved = [
        item["event_id"] for stdout, _ in outputs for item in json.loads(stdout) if item["replayed"]
    ]
    assert sorted(moved) == sorted(ids)
    # One progress line per event, on stderr.
    progress = [
        line for _, stderr in outputs for line in stderr.splitlines() if line.startswith("[")
    ]
    assert len(progress) == len(ids)
    assert ready_count(TOPOLOGY.dead_letter_queue(group)) == 0
    assert ready_count(TOPOLOGY.group_queue(group)) == len(ids)
    with engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.actor, audit_log.c.details).where(
                audit_log.c.action == "events.dlq.replay"
            )
        ).all()
    audited = [row.details["event_id"] for row in rows if row.details["group"] == group]
    assert sorted(audited) == sorted(ids)
    assert {row.actor for row in rows} == {"it-operator"}


def test_discard_removes_a_dead_letter_and_leaves_the_others_in_order(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    group = "dlq-discard"
    declare(group)
    first, second, third = put_dead_letters(group, 3)
    with caplog.at_level("WARNING", logger="events.dead_letters"):
        [discarded] = discard_dead_letters(
            BROKER_URL,
            group=group,
            exchange=EXCHANGE,
            event_ids=[second],
            reason="the parcel was cancelled",
        )
    assert discarded.event_id == second
    assert f"dead letter {second} (it.dlq.parcel) of group {group} discarded: " in caplog.text
    assert "the parcel was cancelled" in caplog.text
    assert listed_ids(group) == [first, third]
    assert (
        discard_dead_letters(
            BROKER_URL, group=group, exchange=EXCHANGE, event_ids=[second], reason="again"
        )
        == []
    )
    assert ready_count(TOPOLOGY.group_queue(group)) == 0


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_reading_keeps_the_order_and_refreshes_often_read_messages(
    engine: Engine, queue_type: QueueType
) -> None:
    group = f"dlq-order-{queue_type}"
    topology = TOPOLOGY if queue_type == "quorum" else CLASSIC
    exchange = topology.exchange
    declare(group, queue_type, topology)
    ids = put_dead_letters(group, 6, topology=topology)
    deliveries = []
    for _ in range(REFRESH_AFTER + 2):
        listed = list_dead_letters(BROKER_URL, group=group, exchange=exchange)
        assert [event.event_id for event in listed] == ids
        deliveries.append(max(event.deliveries for event in listed))
    # Each read counts on a quorum queue, until the copies are replaced.
    assert max(deliveries) <= REFRESH_AFTER
    assert deliveries[-1] < REFRESH_AFTER
    assert ready_count(topology.dead_letter_queue(group)) == len(ids)
    first_two = list_dead_letters(BROKER_URL, group=group, exchange=exchange, limit=2)
    assert [event.event_id for event in first_two] == ids[:2]
    assert listed_ids(group, exchange) == ids

    # Replaying some leaves the others in their order.
    assert replay_dead_letters(
        BROKER_URL, group=group, exchange=exchange, event_ids=[ids[4], ids[1]]
    ) == [(ids[4], True), (ids[1], True)]
    assert listed_ids(group, exchange) == [ids[0], ids[2], ids[3], ids[5]]
    arrived = drain(topology.group_queue(group), 2)
    assert [message.properties["message_id"] for message in arrived] == [ids[1], ids[4]]
    assert arrived[0].headers["x-replay-count"] == 1
    assert DEAD_LETTER_REASON_HEADER not in arrived[0].headers


def test_without_the_groups_queue_nothing_is_moved(engine: Engine) -> None:
    group = "dlq-no-queue"
    declare(group)
    ids = put_dead_letters(group, 1)
    with harness.broker_connection() as conn:
        conn.channel().queue_delete(TOPOLOGY.group_queue(group))
    with pytest.raises(DeadLetterError, match="has no queue"):
        replay_dead_letters(BROKER_URL, group=group, exchange=EXCHANGE, event_ids=None)
    assert listed_ids(group) == ids
    with pytest.raises(DeadLetterError, match="has no dead-letter queue"):
        list_dead_letters(BROKER_URL, group="dlq-never-ran", exchange=EXCHANGE)
