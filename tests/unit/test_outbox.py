"""Outbox writer and relay on SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import amqp.exceptions
import kombu.exceptions
import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, create_engine, func, select, update
from sqlalchemy.orm import Session

from outbox import (
    BrokerUnavailableError,
    OutboxMessage,
    OutboxWriter,
    PublishError,
    RecordingPublisher,
    Relay,
    metadata,
    outbox_messages,
)
from outbox.publisher import broker_unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def task(n: int, **extra: Any) -> OutboxMessage:
    return OutboxMessage(kind="task", destination="demo.task", body={"n": n}, **extra)


def rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(select(outbox_messages).order_by(outbox_messages.c.seq))
        return [dict(row._mapping) for row in result]


def age_rows(engine: Engine, seconds: float) -> None:
    """Backdate every row, as if it had been written ``seconds`` ago."""
    with engine.begin() as conn:
        conn.execute(
            update(outbox_messages).values(
                created_at=datetime.now(UTC) - timedelta(seconds=seconds)
            )
        )


def published_ids(publisher: RecordingPublisher) -> list[str]:
    return [message.id for message in publisher.published]


class FlakyPublisher(RecordingPublisher):
    """Raises something other than PublishError, as a buggy broker client might."""

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        raise ConnectionResetError("connection reset by peer")


# --- message -------------------------------------------------------------------------


def test_message_defaults_and_immutability() -> None:
    first, second = task(1), task(2)
    assert len(first.id) == 32
    assert first.id != second.id
    assert first.queue is None
    assert first.aggregate_id is None
    assert first.headers == {}
    with pytest.raises(ValidationError):
        first.destination = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        OutboxMessage(kind="command", destination="x", body={})


# --- writer --------------------------------------------------------------------------


def test_commit_publishes_once_and_marks_published(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher)
    message = task(1, queue="q1", aggregate_id="wf-1", headers={"trace": "abc"})

    with Session(engine) as session:
        writer.add(session, [message])
        assert publisher.published == [], "nothing may leave before commit"
        session.commit()

    assert publisher.published == [message]
    [row] = rows(engine)
    assert row["id"] == message.id
    assert row["kind"] == "task"
    assert row["destination"] == "demo.task"
    assert row["queue"] == "q1"
    assert row["aggregate_id"] == "wf-1"
    assert row["body"] == {"n": 1}
    assert row["headers"] == {"trace": "abc"}
    assert row["published_at"] is not None
    assert row["publish_attempts"] == 1
    assert row["last_error"] is None
    assert Relay(engine, publisher, grace=0).run_once() == 0
    assert len(publisher.published) == 1


def test_rollback_publishes_nothing_and_leaves_no_row(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher)

    with Session(engine) as session:
        writer.add(session, [task(1), task(2)])
        session.rollback()
        # A later commit on the same session must not carry the discarded messages.
        session.commit()

    assert publisher.published == []
    assert rows(engine) == []


def test_closing_without_commit_forgets_messages(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher)
    session = Session(engine)
    writer.add(session, [task(1)])
    session.close()

    kept = task(2)
    writer.add(session, [kept])
    session.commit()
    session.close()

    assert publisher.published == [kept]
    assert [row["id"] for row in rows(engine)] == [kept.id]


def test_two_commits_on_one_session_publish_each_batch_once(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher)
    first = [task(1), task(2)]
    second = [task(3)]

    with Session(engine) as session:
        writer.add(session, first)
        session.commit()
        assert publisher.published == first
        writer.add(session, second)
        session.commit()
        session.commit()

    assert publisher.published == first + second
    assert all(row["published_at"] is not None for row in rows(engine))


def test_savepoints_publish_on_outer_commit_and_forget_rolled_back_work(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher)
    outer, released, undone = task(1), task(2), task(3)

    with Session(engine) as session:
        writer.add(session, [outer])
        with session.begin_nested():
            writer.add(session, [released])
        assert publisher.published == [], "releasing a savepoint is not a commit"
        savepoint = session.begin_nested()
        writer.add(session, [undone])
        savepoint.rollback()
        session.commit()

    assert publisher.published == [outer, released]
    assert [row["id"] for row in rows(engine)] == [outer.id, released.id]


def test_publish_after_commit_disabled_leaves_rows_to_the_relay(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher, publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, [task(1)])
        session.commit()
    assert publisher.published == []
    assert Relay(engine, publisher, grace=0).run_once() == 1
    assert len(publisher.published) == 1


def test_failed_publish_after_commit_is_recovered_by_the_relay(engine: Engine) -> None:
    publisher = RecordingPublisher(fail=True)
    writer = OutboxWriter(engine, publisher)
    messages = [task(1), task(2)]

    with Session(engine) as session:
        writer.add(session, messages)
        session.commit()  # must not raise: the commit itself succeeded

    assert publisher.published == []
    assert [row["published_at"] for row in rows(engine)] == [None, None]

    relay = Relay(engine, publisher, grace=0)
    assert relay.run_once() == 0, "broker still down"
    assert [row["publish_attempts"] for row in rows(engine)] == [1, 1]
    assert all("refusing" in (row["last_error"] or "") for row in rows(engine))

    publisher.fail = False
    assert relay.run_once() == 2
    assert published_ids(publisher) == [message.id for message in messages]
    for row in rows(engine):
        assert row["published_at"] is not None
        assert row["publish_attempts"] == 2
        assert row["last_error"] is None
    assert relay.run_once() == 0


def test_unexpected_publisher_error_does_not_fail_the_commit(engine: Engine) -> None:
    writer = OutboxWriter(engine, FlakyPublisher())
    with Session(engine) as session:
        writer.add(session, [task(1)])
        session.commit()
    [row] = rows(engine)
    assert row["published_at"] is None


# --- relay ---------------------------------------------------------------------------


def test_relay_publishes_in_seq_order_in_batches(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher, publish_after_commit=False)
    expected: list[str] = []
    with Session(engine) as session:
        for start in range(0, 7, 3):
            batch = [task(n) for n in range(start, min(start + 3, 7))]
            writer.add(session, batch)
            expected += [message.id for message in batch]
            session.commit()

    relay = Relay(engine, publisher, batch_size=3, grace=0)
    assert [relay.run_once() for _ in range(4)] == [3, 3, 1, 0]
    assert published_ids(publisher) == expected


def test_relay_leaves_fresh_rows_to_the_post_commit_publisher(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher, publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, [task(1)])
        session.commit()

    relay = Relay(engine, publisher, grace=60)
    assert relay.run_once() == 0
    age_rows(engine, 61)
    assert relay.run_once() == 1


def test_backlog_counts_unpublished_rows_and_their_age(engine: Engine) -> None:
    publisher = RecordingPublisher()
    relay = Relay(engine, publisher, grace=0)
    assert relay.backlog() == (0, None)

    writer = OutboxWriter(engine, publisher, publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, [task(1), task(2)])
        session.commit()
    age_rows(engine, 30)

    count, age = relay.backlog()
    assert count == 2
    assert age is not None
    assert 29 < age < 40
    relay.run_once()
    assert relay.backlog() == (0, None)


def test_run_polls_until_stopped(engine: Engine) -> None:
    publisher = RecordingPublisher()
    relay = Relay(engine, publisher, grace=0, poll_interval=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        writer = OutboxWriter(engine, publisher, publish_after_commit=False)
        with Session(engine) as session:
            writer.add(session, [task(1), task(2)])
            session.commit()
        assert publisher.wait_for(2, timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert relay.backlog() == (0, None)


def test_run_waits_out_the_grace_period_instead_of_the_poll_interval(engine: Engine) -> None:
    publisher = RecordingPublisher()
    relay = Relay(engine, publisher, grace=0.3, poll_interval=30)
    writer = OutboxWriter(engine, publisher, publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, [task(1)])
        session.commit()
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert publisher.wait_for(1, timeout=5), "the relay slept through the grace period"
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_run_survives_a_broken_database_and_recovers(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    publisher = RecordingPublisher()
    relay = Relay(engine, publisher, grace=0, poll_interval=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    try:
        # The table does not exist yet: every read fails until it does.
        stop.wait(0.3)
        assert thread.is_alive()
        metadata.create_all(engine)
        writer = OutboxWriter(engine, publisher, publish_after_commit=False)
        with Session(engine) as session:
            writer.add(session, [task(1)])
            session.commit()
        assert publisher.wait_for(1, timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
        engine.dispose()
    assert not thread.is_alive()


def test_relay_rejects_nonsense_settings(engine: Engine) -> None:
    publisher = RecordingPublisher()
    with pytest.raises(ValueError):
        Relay(engine, publisher, batch_size=0)
    with pytest.raises(ValueError):
        Relay(engine, publisher, grace=-1)
    with pytest.raises(ValueError):
        Relay(engine, publisher, poll_interval=0)


def test_recording_publisher_failure_records_nothing() -> None:
    publisher = RecordingPublisher(fail=True)
    with pytest.raises(PublishError):
        publisher.publish([task(1)])
    assert publisher.published == []
    assert not publisher.wait_for(1, timeout=0.01)


# --- crash points --------------------------------------------------------------------

CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from outbox import OutboxMessage, OutboxWriter, RecordingPublisher, Relay

    engine = create_engine(sys.argv[1])
    if sys.argv[2] == "relay":
        Relay(engine, RecordingPublisher(), grace=0).run_once()
    else:
        writer = OutboxWriter(engine, RecordingPublisher())
        with Session(engine) as session:
            writer.add(session, [OutboxMessage(kind="event", destination="x.y", body={})])
            session.commit()
    sys.exit(3)
    """
)


def run_crashing(engine: Engine, crash_at: str, mode: str) -> int:
    env = dict(os.environ, ORCHESTRATOR_CRASH_AT=crash_at, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(engine.url), mode],
        env=env,
        timeout=60,
        check=False,
    )
    return completed.returncode


@pytest.mark.parametrize("point", ["outbox.after_commit", "outbox.after_publish"])
def test_crash_after_commit_leaves_the_row_for_the_relay(engine: Engine, point: str) -> None:
    assert run_crashing(engine, point, "writer") == -9
    [row] = rows(engine)
    assert row["published_at"] is None

    publisher = RecordingPublisher()
    assert Relay(engine, publisher, grace=0).run_once() == 1
    assert published_ids(publisher) == [row["id"]]


@pytest.mark.parametrize("point", ["relay.after_claim", "relay.after_publish"])
def test_relay_crash_leaves_the_row_unpublished(engine: Engine, point: str) -> None:
    writer = OutboxWriter(engine, RecordingPublisher(), publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, [task(1)])
        session.commit()

    assert run_crashing(engine, point, "relay") == -9
    with engine.connect() as conn:
        unpublished = conn.execute(
            select(func.count()).where(outbox_messages.c.published_at.is_(None))
        ).scalar_one()
    assert unpublished == 1
    publisher = RecordingPublisher()
    assert Relay(engine, publisher, grace=0).run_once() == 1


def test_without_crash_point_the_subprocess_finishes(engine: Engine) -> None:
    assert run_crashing(engine, "", "writer") == 3
    [row] = rows(engine)
    assert row["published_at"] is not None


@pytest.mark.parametrize(
    "failure",
    # Refused by the broker, or slow enough to confirm that it looks like an
    # unavailable broker: alone, it is that message's failure either way.
    [PublishError, BrokerUnavailableError],
)
def test_one_unpublishable_message_does_not_hold_up_the_others(
    tmp_path: Path, failure: type[PublishError]
) -> None:
    class Picky(RecordingPublisher):
        def publish(self, messages: Sequence[OutboxMessage]) -> None:
            if any(m.destination == "poison" for m in messages):
                raise failure("refused")
            super().publish(messages)

    engine = create_engine(f"sqlite:///{tmp_path}/picky.db")
    metadata.create_all(engine)
    picky = Picky()
    writer = OutboxWriter(engine, picky, publish_after_commit=False)
    with Session(engine) as session:
        writer.add(
            session,
            [
                OutboxMessage(kind="task", destination="poison", body={}),
                *(OutboxMessage(kind="task", destination=f"ok-{i}", body={}) for i in range(3)),
            ],
        )
        session.commit()
    relay = Relay(engine, picky, grace=0)
    assert relay.run_once() == 3
    assert [m.destination for m in picky.published] == ["ok-0", "ok-1", "ok-2"]
    assert relay.run_once() == 0
    assert relay.backlog()[0] == 1
    with engine.connect() as conn:
        attempts, error = conn.execute(
            select(outbox_messages.c.publish_attempts, outbox_messages.c.last_error).where(
                outbox_messages.c.destination == "poison"
            )
        ).one()
    assert attempts == 2 and error == "refused"


def test_batched_marks_reach_the_table_without_a_transaction_per_commit(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/marks.db")
    metadata.create_all(engine)
    writer = OutboxWriter(engine, RecordingPublisher(), batch_marks=True)
    for number in range(5):
        with Session(engine) as session:
            writer.add(session, [OutboxMessage(kind="task", destination=f"t{number}", body={})])
            session.commit()
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while (
        Relay(engine, RecordingPublisher(), grace=0).backlog()[0] and datetime.now(UTC) < deadline
    ):
        threading.Event().wait(0.01)
    assert Relay(engine, RecordingPublisher(), grace=0).backlog() == (0, None)


class CountingPublisher(RecordingPublisher):
    """Fails with ``batch`` for batches and ``single`` for single messages (None: succeeds)."""

    def __init__(self, *, batch: PublishError | None, single: PublishError | None) -> None:
        super().__init__()
        self.batch, self.single = batch, single
        self.calls: list[int] = []

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        self.calls.append(len(messages))
        error = self.batch if len(messages) > 1 else self.single
        if error is not None:
            raise error
        super().publish(messages)


def relayed_rows(tmp_path: Path, publisher: RecordingPublisher, count: int) -> list[Any]:
    """Run a relay once over ``count`` task rows; the rows afterwards."""
    engine = create_engine(f"sqlite:///{tmp_path}/relay.db")
    metadata.create_all(engine)
    writer = OutboxWriter(engine, publisher, publish_after_commit=False)
    with Session(engine) as session:
        writer.add(session, [task(n) for n in range(count)])
        session.commit()
    Relay(engine, publisher, grace=0).run_once()
    with engine.connect() as conn:
        found = conn.execute(
            select(
                outbox_messages.c.published_at,
                outbox_messages.c.publish_attempts,
                outbox_messages.c.last_error,
            )
        ).all()
    engine.dispose()
    return list(found)


def test_an_unavailable_broker_costs_the_relay_two_single_retries_not_one_per_message(
    tmp_path: Path,
) -> None:
    down = BrokerUnavailableError("publish failed: TimeoutError()")
    publisher = CountingPublisher(batch=down, single=down)
    found = relayed_rows(tmp_path, publisher, 6)
    # Each single publish waits out the same timeout: the batch, two singles.
    assert publisher.calls == [6, 1, 1]
    assert [(row.published_at, row.publish_attempts, row.last_error) for row in found] == [
        (None, 1, str(down))
    ] * 6


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (TimeoutError("timed out"), True),
        (ConnectionRefusedError(111, "refused"), True),
        (amqp.exceptions.RecoverableConnectionError("basic_publish: timed out"), True),
        (kombu.exceptions.OperationalError("no route"), True),
        (amqp.exceptions.MessageNacked(), False),
        (amqp.exceptions.NotFound("no queue"), False),
        (KeyError("no-such-queue"), False),
    ],
)
def test_only_connection_level_errors_mean_the_broker_is_unavailable(
    error: BaseException, unavailable: bool
) -> None:
    assert broker_unavailable(error) is unavailable
