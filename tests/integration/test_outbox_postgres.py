"""Outbox writer and relay against a real PostgreSQL.

Each module run works in a schema of its own, so it can share the database
with other tests running at the same time.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import harness
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from outbox import (
    NOTIFY_CHANNEL,
    OutboxMessage,
    OutboxWriter,
    RecordingPublisher,
    Relay,
    metadata,
    outbox_messages,
)

pytestmark = pytest.mark.integration

DATABASE_URL = os.environ.get(
    "ORCHESTRATOR_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SUFFIX = uuid.uuid4().hex[:12]
SCHEMA = f"outbox_test_{SUFFIX}"
# Lets a test find (and kill) exactly the relay's own server connections.
RELAY_APPLICATION = f"outbox_relay_{SUFFIX}"
MARKER_APPLICATION = f"outbox_marker_{SUFFIX}"


def schema_engine(application_name: str) -> Engine:
    return create_engine(
        DATABASE_URL,
        connect_args={
            "options": f"-csearch_path={SCHEMA}",
            "application_name": application_name,
        },
    )


@pytest.fixture(scope="module")
def admin() -> Iterator[Engine]:
    engine = create_engine(DATABASE_URL)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
    try:
        yield engine
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'))
        engine.dispose()


@pytest.fixture(scope="module")
def engine(admin: Engine) -> Iterator[Engine]:
    engine = schema_engine(f"outbox_test_{SUFFIX}")
    metadata.create_all(engine, tables=[outbox_messages])
    yield engine
    engine.dispose()


@pytest.fixture
def relay_engine(engine: Engine) -> Iterator[Engine]:
    relay_engine = schema_engine(RELAY_APPLICATION)
    yield relay_engine
    relay_engine.dispose()


@pytest.fixture(autouse=True)
def empty_outbox(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(outbox_messages.delete())


def task(n: int) -> OutboxMessage:
    return OutboxMessage(kind="task", destination="demo.task", body={"n": n})


def write(engine: Engine, messages: Sequence[OutboxMessage]) -> None:
    """Commit ``messages`` without the post-commit publisher: only a relay sends them."""
    writer = OutboxWriter(engine, RecordingPublisher(), publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, messages)
        session.commit()


def published_at(engine: Engine, message_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(outbox_messages.c.published_at).where(outbox_messages.c.id == message_id)
        ).scalar_one()


class SlowPublisher(RecordingPublisher):
    """Holds each batch a moment, as a broker round trip would, to make relays overlap."""

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        time.sleep(0.005)
        super().publish(messages)


class RelayThread:
    def __init__(self, relay: Relay) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=relay.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> RelayThread:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the relay did not stop"


def test_commit_publishes_once_and_marks_published(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher)
    message = OutboxMessage(
        kind="event",
        destination="order.created",
        queue="events",
        aggregate_id="wf-1",
        body={"amount": 12.5, "items": ["a", "b"]},
        headers={"trace": "t-1"},
    )
    with Session(engine) as session:
        writer.add(session, [message])
        session.commit()

    assert publisher.published == [message]
    assert published_at(engine, message.id) is not None
    relay = Relay(engine, publisher, grace=0)
    assert relay.run_once() == 0
    assert relay.backlog() == (0, None)


def marked(engine: Engine, messages: Sequence[OutboxMessage]) -> bool:
    return all(published_at(engine, message.id) is not None for message in messages)


def test_batched_marks_go_in_one_statement_on_a_connection_of_their_own(
    engine: Engine, admin: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks: list[tuple[str, bool]] = []
    execute = psycopg.Cursor.execute

    def spied(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if str(query).startswith("UPDATE") and "published_at" in str(query):
            marks.append((str(query), cursor.connection.autocommit))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", spied)
    writer_engine = schema_engine(MARKER_APPLICATION)
    writer = OutboxWriter(writer_engine, RecordingPublisher(), batch_marks=True)
    try:
        first = [task(n) for n in range(3)]
        with Session(writer_engine) as session:
            writer.add(session, first)
            session.commit()
        harness.wait_until(lambda: marked(engine, first), 10, "the first batch's marks")
        # All three in one statement, on an autocommitting connection (not a
        # pooled one in a transaction): a round trip, not four.
        assert len(marks) == 1
        assert "ANY" in marks[0][0] and marks[0][1] is True

        # The database drops the marker's connection (a restart): the next
        # batch finds it gone and is marked on a new one.
        with admin.begin() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": MARKER_APPLICATION},
            )
        writer_engine.dispose()
        after = task(10)
        with Session(writer_engine) as session:
            writer.add(session, [after])
            session.commit()
        harness.wait_until(lambda: marked(engine, [after]), 10, "the marks after the restart")
        assert len(marks) == 3  # the first batch, the one the lost connection failed, its rerun
    finally:
        writer.close()
        writer_engine.dispose()


def test_concurrent_run_once_claims_disjoint_batches(engine: Engine) -> None:
    messages = [task(n) for n in range(500)]
    for start in range(0, 500, 100):
        write(engine, messages[start : start + 100])

    publishers = [SlowPublisher(), SlowPublisher()]
    relays = [Relay(engine, publisher, batch_size=20, grace=0) for publisher in publishers]
    barrier = threading.Barrier(len(relays))
    errors: list[BaseException] = []

    def drain(relay: Relay) -> None:
        try:
            barrier.wait()
            misses = 0
            # A relay may find nothing while the other holds the last rows.
            while misses < 3:
                misses = misses + 1 if relay.run_once() == 0 else 0
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(relay,)) for relay in relays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []

    counts = collections.Counter(m.id for p in publishers for m in p.published)
    assert set(counts) == {message.id for message in messages}
    assert max(counts.values()) == 1, "a row was published twice"
    assert all(publisher.published for publisher in publishers), "the relays did not overlap"
    assert relays[0].backlog() == (0, None)


def test_two_running_relays_publish_each_row_exactly_once(
    engine: Engine, relay_engine: Engine
) -> None:
    messages = [task(n) for n in range(500)]
    publishers = [SlowPublisher(), SlowPublisher()]
    relays = [
        Relay(relay_engine, publisher, batch_size=25, grace=0, poll_interval=1.0)
        for publisher in publishers
    ]
    with RelayThread(relays[0]), RelayThread(relays[1]):
        for start in range(0, 500, 10):
            write(engine, messages[start : start + 10])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and relays[0].backlog()[0]:
            time.sleep(0.05)
        # Leave time for a duplicate to show up before counting.
        time.sleep(0.5)

    counts = collections.Counter(m.id for p in publishers for m in p.published)
    assert set(counts) == {message.id for message in messages}
    assert max(counts.values()) == 1, "a row was published twice"
    assert relays[0].backlog() == (0, None)


def test_notification_wakes_a_waiting_relay(engine: Engine, relay_engine: Engine) -> None:
    publisher = RecordingPublisher()
    relay = Relay(relay_engine, publisher, grace=0, poll_interval=30)
    with RelayThread(relay):
        first = task(1)
        write(engine, [first])
        # Once the first row is out, the relay has listened, read the table and
        # gone to sleep for up to poll_interval: only a notification can wake it.
        assert publisher.wait_for(1, timeout=10)

        second = task(2)
        started = time.monotonic()
        write(engine, [second])
        assert publisher.wait_for(2, timeout=5), "the insert did not wake the relay"
        assert time.monotonic() - started < 5

    assert [message.id for message in publisher.published] == [first.id, second.id]


def test_a_relay_only_row_does_not_wait_for_the_grace_of_others(
    engine: Engine, relay_engine: Engine
) -> None:
    publisher = RecordingPublisher()
    grace = 30.0
    relay = Relay(
        relay_engine, publisher, grace=grace, poll_interval=60, relay_only_kinds={"event"}
    )
    waiting_out_grace = threading.Event()
    until_next_eligible = relay._until_next_eligible

    def watched() -> float | None:
        delay = until_next_eligible()
        if delay is not None:
            waiting_out_grace.set()
        return delay

    relay._until_next_eligible = watched  # type: ignore[method-assign]
    with RelayThread(relay):
        # A task row in its grace period (left to the post-commit publisher) is
        # what the relay sleeps towards; it must still wake for an event row.
        write(engine, [task(1)])
        assert waiting_out_grace.wait(10), "the relay never saw the task row's grace"
        event = OutboxMessage(kind="event", destination="demo.happened", body={"n": 2})
        started = time.monotonic()
        write(engine, [event])
        assert publisher.wait_for(1, timeout=grace / 2), "the event waited for the grace"
        assert time.monotonic() - started < grace / 2
    assert [message.id for message in publisher.published] == [event.id]


def test_relay_survives_losing_its_connections(
    engine: Engine, relay_engine: Engine, admin: Engine
) -> None:
    publisher = RecordingPublisher()
    relay = Relay(relay_engine, publisher, grace=0, poll_interval=30)
    with RelayThread(relay):
        write(engine, [task(1)])
        assert publisher.wait_for(1, timeout=10)

        # What a database restart looks like from the relay's side.
        with admin.begin() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": RELAY_APPLICATION},
            ).scalar_one()
        assert killed >= 1

        write(engine, [task(2)])
        assert publisher.wait_for(2, timeout=20), "the relay did not reconnect"


@pytest.fixture
def listener(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        yield conn


def commit_through(writer: OutboxWriter, messages: Sequence[OutboxMessage]) -> int:
    """Commit ``messages`` through ``writer``; return the committing backend's pid."""
    with Session(writer.engine) as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        writer.add(session, messages)
        session.commit()
    assert writer.doorbell is not None
    assert writer.doorbell.wait_idle(10), "the doorbell never rang"
    return int(pid)


def notifications(listener: psycopg.Connection[Any], timeout: float) -> list[Any]:
    return list(listener.notifies(timeout=timeout, stop_after=1))


def test_a_row_left_to_the_relay_rings_after_its_commit(
    engine: Engine, listener: psycopg.Connection[Any]
) -> None:
    writer = OutboxWriter(engine, RecordingPublisher(), relay_only_kinds={"event"})
    event = OutboxMessage(kind="event", destination="demo.happened", body={"n": 1})
    writer_pid = commit_through(writer, [event])
    notes = notifications(listener, timeout=5)
    assert [note.channel for note in notes] == [NOTIFY_CHANNEL]
    # From a transaction of its own: the writing one never takes PostgreSQL's
    # notification lock, which would serialize it with every other writer's flush.
    assert notes[0].pid != writer_pid


def test_rows_the_writer_published_itself_ring_nothing(
    engine: Engine, listener: psycopg.Connection[Any]
) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher, relay_only_kinds={"event"})
    message = task(1)
    commit_through(writer, [message])
    assert [m.id for m in publisher.published] == [message.id]
    # Nothing is left to send (wait_idle), so any notification is already on its way.
    assert notifications(listener, timeout=0.5) == []


def test_a_failed_publish_and_a_relay_only_writer_ring(
    engine: Engine, listener: psycopg.Connection[Any]
) -> None:
    failing = OutboxWriter(engine, RecordingPublisher(fail=True))
    commit_through(failing, [task(1)])
    assert [note.channel for note in notifications(listener, timeout=5)] == [NOTIFY_CHANNEL]

    relay_only = OutboxWriter(engine, RecordingPublisher(), publish_after_commit=False)
    commit_through(relay_only, [task(2)])
    assert [note.channel for note in notifications(listener, timeout=5)] == [NOTIFY_CHANNEL]


def test_a_rolled_back_row_rings_nothing(engine: Engine, listener: psycopg.Connection[Any]) -> None:
    writer = OutboxWriter(engine, RecordingPublisher(), publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, [task(1)])
        session.rollback()
    assert writer.doorbell is not None
    assert writer.doorbell.wait_idle(10)
    assert notifications(listener, timeout=0.5) == []


def test_rings_since_the_last_send_share_a_notification(
    engine: Engine, listener: psycopg.Connection[Any]
) -> None:
    writer = OutboxWriter(engine, RecordingPublisher(), relay_only_kinds={"event"})
    doorbell = writer.doorbell
    assert doorbell is not None
    # Holding the bell's lock keeps its thread from taking the rings meanwhile:
    # all of them are waiting when it sends.
    with doorbell._wake:
        for _ in range(100):
            doorbell.ring()
    assert doorbell.wait_idle(10)
    assert len(list(listener.notifies(timeout=0.5))) == 1
