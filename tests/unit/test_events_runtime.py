"""What the subscriber runtime does with one delivery, on SQLite and without a broker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, select
from sqlalchemy.orm import Session

import events
from events import (
    DomainEvent,
    EventEnvelope,
    RejectEvent,
    SubscriberError,
    SubscriberRegistry,
    SubscriberRuntime,
    event_type,
    inbox,
)
from examples.order_fulfillment import subscribers as example
from examples.order_fulfillment.events import (
    InventoryReserved,
    OrderCompensated,
    OrderCompleted,
    PaymentCharged,
    ShipmentCreated,
)
from outbox import metadata

UNIT = "unit-runtime"
BROKER = "amqp://guest:guest@127.0.0.1:1//"  # never contacted by these tests


@event_type(f"{UNIT}.thing.happened")
class Happened(DomainEvent):
    n: int


@event_type(f"{UNIT}.thing.vanished")
class Vanished(DomainEvent):
    n: int


effects_metadata = MetaData()
effects = Table(
    "effects",
    effects_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("handler", String(64), nullable=False),
    Column("n", Integer, nullable=False),
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'runtime.db'}")
    metadata.create_all(engine)
    effects_metadata.create_all(engine)
    yield engine
    engine.dispose()


def body(event: DomainEvent, **envelope: Any) -> bytes:
    envelope.setdefault("producer", "test")
    return json.dumps(EventEnvelope.wrap(event, **envelope).to_json()).encode()


def effect_rows(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(select(effects.c.handler, effects.c.n).order_by(effects.c.id))
        return [(row.handler, row.n) for row in rows]


def inbox_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(select(inbox))]


def record(session: Session, handler: str, n: int) -> None:
    session.execute(effects.insert().values(handler=handler, n=n))


def runtime(engine: Engine, local: SubscriberRegistry, **options: Any) -> SubscriberRuntime:
    options.setdefault("retry_delay", 0)
    return SubscriberRuntime(engine, BROKER, subscriptions=local, **options)


def test_an_event_takes_effect_once_however_often_it_is_delivered(engine: Engine) -> None:
    local = SubscriberRegistry()

    @events.subscriber(f"{UNIT}.thing.*", group="g", registry=local, name="first")
    def first(event: Happened, session: Session) -> None:
        record(session, "first", event.n)

    @events.subscriber(f"{UNIT}.#", group="g", registry=local, name="second")
    def second(event: EventEnvelope, session: Session) -> None:
        record(session, "second", event.payload["n"])

    subject = runtime(engine, local)
    delivery = body(Happened(n=7), correlation_id="wf-1")
    outcome = subject.process("g", delivery)
    assert outcome.action == "ack"
    assert outcome.handlers == ("first", "second")
    assert not outcome.duplicate

    again = subject.process("g", delivery)
    assert again.action == "ack"
    assert again.duplicate
    assert again.handlers == ()
    assert effect_rows(engine) == [("first", 7), ("second", 7)]
    [row] = inbox_rows(engine)
    envelope = EventEnvelope.model_validate_json(delivery)
    assert row["group_name"] == "g"
    assert row["event_id"] == envelope.event_id
    assert row["event_type"] == envelope.type
    assert row["correlation_id"] == "wf-1"


def test_groups_have_separate_inboxes(engine: Engine) -> None:
    local = SubscriberRegistry()
    for group in ("one", "two"):

        @events.subscriber(f"{UNIT}.#", group=group, registry=local, name=group)
        def handler(event: Happened, session: Session, _group: str = group) -> None:
            record(session, _group, event.n)

    subject = runtime(engine, local)
    delivery = body(Happened(n=1))
    assert subject.process("one", delivery).handlers == ("one",)
    assert subject.process("two", delivery).handlers == ("two",)
    assert subject.process("one", delivery).duplicate
    assert effect_rows(engine) == [("one", 1), ("two", 1)]


def test_a_narrowing_annotation_skips_other_types(engine: Engine) -> None:
    local = SubscriberRegistry()

    @events.subscriber(f"{UNIT}.thing.*", group="g", registry=local, name="only-happened")
    def only_happened(event: Happened, session: Session) -> None:
        record(session, "only", event.n)

    subject = runtime(engine, local)
    outcome = subject.process("g", body(Vanished(n=1)))
    assert outcome.action == "ack"
    assert outcome.reason == "no handler applies"
    assert inbox_rows(engine) == []


@pytest.mark.parametrize(
    ("delivery", "reason"),
    [
        (b"\xff\xfe not json", "undecodable"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"type": "x.y"}', "invalid envelope"),
        (
            json.dumps(
                {
                    "type": f"{UNIT}.thing.unheard",
                    "schema_version": 1,
                    "producer": "p",
                    "payload": {},
                }
            ).encode(),
            "unknown event type",
        ),
        (
            json.dumps(
                {
                    "type": f"{UNIT}.thing.happened",
                    "schema_version": 1,
                    "producer": "p",
                    "payload": {"n": "not a number"},
                }
            ).encode(),
            "schema mismatch",
        ),
        (
            json.dumps(
                {
                    "type": f"{UNIT}.thing.happened",
                    "schema_version": 2,
                    "producer": "p",
                    "payload": {"n": 1},
                }
            ).encode(),
            "unknown version 2",
        ),
    ],
)
def test_poison_messages_are_dead_lettered_with_their_reason(
    engine: Engine, delivery: bytes, reason: str
) -> None:
    local = SubscriberRegistry()

    @events.subscriber(f"{UNIT}.thing.*", group="g", registry=local, name="any")
    def anything(event: DomainEvent, session: Session) -> None:
        record(session, "any", 0)

    @events.subscriber(f"{UNIT}.thing.*", group="g", registry=local, name="typed")
    def typed(event: Happened, session: Session) -> None:
        record(session, "typed", event.n)

    outcome = runtime(engine, local).process("g", delivery)
    assert outcome.action == "dead_letter"
    assert outcome.reason is not None
    assert reason in outcome.reason
    assert effect_rows(engine) == []
    assert inbox_rows(engine) == []


def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered(engine: Engine) -> None:
    local = SubscriberRegistry()
    calls: list[int] = []

    @events.subscriber(f"{UNIT}.#", group="g", registry=local, name="flaky")
    def flaky(event: Happened, session: Session) -> None:
        record(session, "flaky", len(calls))
        calls.append(event.n)
        if len(calls) < 3:
            raise ConnectionError("service unavailable")

    pauses: list[float] = []

    def pause(seconds: float) -> bool:
        pauses.append(seconds)
        return True

    subject = runtime(engine, local, max_attempts=5, retry_delay=0.1, max_retry_delay=0.15)
    outcome = subject.process("g", body(Happened(n=1)), pause=pause)
    assert outcome.action == "ack"
    assert calls == [1, 1, 1]
    assert pauses == [0.1, 0.15]
    # The failed attempts rolled back with their inbox rows.
    assert effect_rows(engine) == [("flaky", 2)]

    calls.clear()
    always = runtime(engine, local, max_attempts=2)

    @events.subscriber(f"{UNIT}.#", group="g", registry=local, name="flaky")
    def broken(event: Happened, session: Session) -> None:
        calls.append(event.n)
        raise ValueError("bad data\nwith a traceback-like second line")

    always = runtime(engine, local, max_attempts=2)
    outcome = always.process("g", body(Happened(n=2)), pause=pause)
    assert outcome.action == "dead_letter"
    assert outcome.reason == "flaky failed 2 time(s): ValueError: bad data"
    assert calls == [2, 2]


def test_reject_event_dead_letters_at_once(engine: Engine) -> None:
    local = SubscriberRegistry()
    calls: list[int] = []

    @events.subscriber(f"{UNIT}.#", group="g", registry=local, name="picky")
    def picky(event: Happened, session: Session) -> None:
        calls.append(event.n)
        raise RejectEvent("n must be even")

    outcome = runtime(engine, local).process("g", body(Happened(n=1)))
    assert outcome.action == "dead_letter"
    assert outcome.reason == "rejected by picky: n must be even"
    assert calls == [1]


def test_stopping_between_retries_abandons_the_delivery(engine: Engine) -> None:
    local = SubscriberRegistry()

    @events.subscriber(f"{UNIT}.#", group="g", registry=local, name="down")
    def down(event: Happened, session: Session) -> None:
        raise ConnectionError("down")

    outcome = runtime(engine, local).process("g", body(Happened(n=1)), pause=lambda _: False)
    assert outcome.action == "abandon"
    assert inbox_rows(engine) == []


def test_database_outages_do_not_count_as_attempts(tmp_path: Path) -> None:
    local = SubscriberRegistry()
    calls: list[int] = []

    @events.subscriber(f"{UNIT}.#", group="g", registry=local, name="h")
    def handler(event: Happened, session: Session) -> None:
        calls.append(event.n)

    # No inbox table yet: the runtime's own insert fails, as with a database down.
    engine = create_engine(f"sqlite:///{tmp_path / 'late.db'}")
    pauses: list[float] = []

    def pause(seconds: float) -> bool:
        pauses.append(seconds)
        if len(pauses) == 3:
            metadata.create_all(engine)
        return True

    outcome = runtime(engine, local, max_attempts=1).process("g", body(Happened(n=5)), pause=pause)
    engine.dispose()
    assert outcome.action == "ack"
    assert calls == [5]
    assert pauses == [0.5, 1.0, 2.0]


def test_runtime_configuration_errors() -> None:
    local = SubscriberRegistry()
    engine = create_engine("sqlite://")
    with pytest.raises(SubscriberError, match="no subscribers"):
        SubscriberRuntime(engine, BROKER, subscriptions=local)

    @events.subscriber("x.y", group="g", registry=local)
    def handler(event: EventEnvelope, session: Session) -> None: ...

    with pytest.raises(SubscriberError, match="registered groups: g"):
        SubscriberRuntime(engine, BROKER, subscriptions=local, groups=["other"])
    subject = SubscriberRuntime(engine, BROKER, subscriptions=local)
    assert list(subject.groups) == ["g"]
    assert subject.patterns("g") == ["x.y"]
    with pytest.raises(SubscriberError, match="unknown subscriber group"):
        subject.process("other", b"{}")
    with pytest.raises(ValueError, match="max_attempts"):
        SubscriberRuntime(engine, BROKER, subscriptions=local, max_attempts=0)


# --- the example's subscribers --------------------------------------------------------------

DAY = datetime(2026, 3, 4, 10, 0, tzinfo=UTC)


def example_runtime(engine: Engine) -> SubscriberRuntime:
    return SubscriberRuntime(
        engine, BROKER, subscriptions=events.subscriptions, groups=["notifications", "analytics"]
    )


def completed(order_id: str) -> OrderCompleted:
    return OrderCompleted(
        order_id=order_id,
        customer_email=f"{order_id}@example.com",
        total_cents=2599,
        charge_id="ch-1",
        shipment_id="sh-1",
        tracking_number="TRK-1",
    )


def compensated(order_id: str) -> OrderCompensated:
    return OrderCompensated(
        order_id=order_id,
        customer_email=f"{order_id}@example.com",
        total_cents=100,
        failed_step="create_shipment",
        reason="UnshippableAddress",
    )


def test_example_notifications_send_one_email_per_outcome(engine: Engine) -> None:
    subject = example_runtime(engine)
    deliveries = [
        body(completed("o-1"), correlation_id="order-o-1", occurred_at=DAY),
        body(compensated("o-2"), correlation_id="order-o-2", occurred_at=DAY),
    ]
    for delivery in deliveries * 2:
        assert subject.process("notifications", delivery).action == "ack"
    with engine.connect() as conn:
        emails = conn.execute(
            select(example.order_emails).order_by(example.order_emails.c.order_id)
        ).all()
    assert [(row.order_id, row.recipient) for row in emails] == [
        ("o-1", "o-1@example.com"),
        ("o-2", "o-2@example.com"),
    ]
    assert "on its way" in emails[0].subject
    assert "TRK-1" in emails[0].body
    assert "could not be completed" in emails[1].subject


def test_example_file_sender_appends_json_lines(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "emails.jsonl"
    example.set_email_sender(example.FileEmailSender(path))
    try:
        delivery = body(completed("o-9"), correlation_id="order-o-9")
        example_runtime(engine).process("notifications", delivery)
    finally:
        example.set_email_sender(None)
    [line] = path.read_text().splitlines()
    email = json.loads(line)
    assert email["to"] == "o-9@example.com"
    assert email["event_id"] == EventEnvelope.model_validate_json(delivery).event_id


def test_example_analytics_counts_outcomes_and_step_latency(engine: Engine) -> None:
    subject = example_runtime(engine)
    start = DAY
    steps = [
        InventoryReserved(
            order_id="o-1",
            started_at=start,
            finished_at=start + timedelta(milliseconds=120),
            reservation_id="r",
        ),
        PaymentCharged(
            order_id="o-1",
            started_at=start,
            finished_at=start + timedelta(milliseconds=300),
            charge_id="c",
            amount_cents=5,
        ),
        PaymentCharged(
            order_id="o-2",
            started_at=start,
            finished_at=start + timedelta(milliseconds=100),
            charge_id="c2",
            amount_cents=5,
        ),
        ShipmentCreated(
            order_id="o-1",
            started_at=start,
            finished_at=start + timedelta(milliseconds=50),
            shipment_id="s",
            tracking_number="t",
        ),
    ]
    deliveries = [body(step, occurred_at=DAY) for step in steps]
    deliveries += [
        body(completed("o-1"), occurred_at=DAY),
        body(completed("o-3"), occurred_at=DAY),
        body(compensated("o-2"), occurred_at=DAY),
        body(completed("o-4"), occurred_at=DAY + timedelta(days=1)),
    ]
    for delivery in deliveries + deliveries[:3]:
        assert subject.process("analytics", delivery).action == "ack"
    with engine.connect() as conn:
        outcomes = conn.execute(
            select(example.order_outcomes_daily).order_by(example.order_outcomes_daily.c.day)
        ).all()
        latency = conn.execute(
            select(example.order_step_latency).order_by(example.order_step_latency.c.step)
        ).all()
    assert [(row.day, row.completed, row.compensated) for row in outcomes] == [
        (date(2026, 3, 4), 2, 1),
        (date(2026, 3, 5), 1, 0),
    ]
    assert [(row.step, row.count, row.total_ms, row.max_ms) for row in latency] == [
        ("charge_payment", 2, 400, 300),
        ("create_shipment", 1, 50, 50),
        ("reserve_inventory", 1, 120, 120),
    ]
