"""Domain events without a broker: types, envelopes, the outbox path, subscribers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, create_engine, select, update
from sqlalchemy.orm import Session

import events
from events import (
    DomainEvent,
    EventEnvelope,
    EventRegistry,
    EventSchemaError,
    EventTypeError,
    SubscriberError,
    SubscriberRegistry,
    UnknownEventTypeError,
    event_message,
    event_type,
    publish,
    topic_matches,
)
from events.subscribers import validate_pattern
from events.topology import Topology, resolve_queue_type, validate_group_name
from outbox import (
    OrchestratorError,
    OutboxWriter,
    PublishError,
    RecordingPublisher,
    Relay,
    metadata,
)
from outbox.schema import outbox_messages

# Declared once, in the default registry, under names no other test uses.
UNIT = "unit-events"


@event_type(f"{UNIT}.order.completed", version=1)
class Completed(DomainEvent):
    order_id: str
    total_cents: int = 0


@event_type(f"{UNIT}.order.completed", version=2)
class CompletedV2(DomainEvent):
    order_id: str
    total: dict[str, Any]


@events.registry.upcaster(f"{UNIT}.order.completed", from_version=1)
def _completed_1_to_2(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "order_id": payload["order_id"],
        "total": {"cents": payload.get("total_cents", 0), "currency": "EUR"},
    }


@event_type(f"{UNIT}.order.compensated")
class Compensated(DomainEvent):
    order_id: str
    reason: str


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'events.db'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def outbox_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(select(outbox_messages).order_by(outbox_messages.c.seq))
        return [dict(row._mapping) for row in result]


# --- event types ---------------------------------------------------------------------


def test_event_type_sets_class_vars_and_registers() -> None:
    assert f"{UNIT}.order.completed" == Completed.EVENT_TYPE
    assert Completed.EVENT_VERSION == 1
    assert Compensated.EVENT_VERSION == 1
    assert events.registry.get(f"{UNIT}.order.completed", 2) is CompletedV2
    assert events.registry.latest(f"{UNIT}.order.completed") is CompletedV2
    assert events.registry.versions(f"{UNIT}.order.completed") == [1, 2]
    assert f"{UNIT}.order.compensated" in events.registry


def test_event_payloads_are_frozen_and_tolerate_unknown_fields() -> None:
    event = Completed.model_validate({"order_id": "o-1", "added_later": True})
    assert event == Completed(order_id="o-1")
    with pytest.raises(ValidationError):
        event.order_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "name", ["", "Order.completed", "order..completed", "order.*", "order.#", "1order", "a b"]
)
def test_invalid_type_names_are_refused(name: str) -> None:
    with pytest.raises(EventTypeError):
        event_type(name)


def test_registry_refuses_a_second_class_under_one_name_and_version() -> None:
    local = EventRegistry()
    local.register(Completed, f"{UNIT}.order.completed", version=1)

    class Impostor(DomainEvent):
        order_id: str

    with pytest.raises(EventTypeError, match="already"):
        local.register(Impostor, f"{UNIT}.order.completed", version=1)
    # The same class again is harmless (a module imported twice).
    assert local.register(Completed, f"{UNIT}.order.completed", version=1) is Completed
    with pytest.raises(EventTypeError, match="already event type"):
        local.register(Completed, "something.else")
    with pytest.raises(EventTypeError, match="positive"):
        local.register(Impostor, "x.y", version=0)
    with pytest.raises(EventTypeError, match="DomainEvent"):
        local.register(dict, "x.y")  # type: ignore[type-var]


def test_errors_share_the_project_root() -> None:
    for error in (EventTypeError, UnknownEventTypeError, EventSchemaError, SubscriberError):
        assert issubclass(error, events.EventError)
        assert issubclass(error, OrchestratorError)


# --- envelopes -----------------------------------------------------------------------


def test_wrap_fills_the_envelope() -> None:
    before = datetime.now(UTC)
    envelope = EventEnvelope.wrap(
        Completed(order_id="o-1", total_cents=1200),
        correlation_id="order-o-1",
        causation_id="msg-9",
        producer="OrderSaga",
    )
    assert len(envelope.event_id) == 32
    assert envelope.type == f"{UNIT}.order.completed"
    assert envelope.schema_version == 1
    assert before <= envelope.occurred_at <= datetime.now(UTC)
    assert envelope.occurred_at.tzinfo is not None
    assert envelope.payload == {"order_id": "o-1", "total_cents": 1200}
    assert (envelope.correlation_id, envelope.causation_id) == ("order-o-1", "msg-9")
    assert envelope.producer == "OrderSaga"
    with pytest.raises(ValidationError):
        envelope.type = "x"  # type: ignore[misc]


def test_wrap_is_deterministic_given_id_and_time() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    first, second = (
        EventEnvelope.wrap(
            Completed(order_id="o-1"), producer="p", event_id="evt-1", occurred_at=moment
        )
        for _ in range(2)
    )
    assert first == second
    assert first.occurred_at == moment
    assert first.occurred_at.utcoffset() == timedelta(0)


def test_naive_times_are_taken_as_utc() -> None:
    envelope = EventEnvelope.wrap(
        Completed(order_id="o"), producer="p", occurred_at=datetime(2026, 1, 1, 12)
    )
    assert envelope.occurred_at == datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_wrap_refuses_undeclared_events() -> None:
    class Loose(DomainEvent):
        x: int

    class Inherited(Completed):
        pass

    for event in (Loose(x=1), Inherited(order_id="o")):
        with pytest.raises(EventTypeError, match="not a declared event type"):
            EventEnvelope.wrap(event, producer="p")


def test_envelope_round_trips_through_json() -> None:
    envelope = EventEnvelope.wrap(Completed(order_id="o-1"), correlation_id="wf", producer="p")
    again = EventEnvelope.model_validate_json(json.dumps(envelope.to_json()))
    assert again == envelope
    assert again.decode() == Completed(order_id="o-1")


def test_decode_upcasts_to_a_newer_version_and_never_down() -> None:
    old = EventEnvelope.wrap(Completed(order_id="o-1", total_cents=5), producer="p")
    assert old.decode(as_version=2) == CompletedV2(
        order_id="o-1", total={"cents": 5, "currency": "EUR"}
    )
    new = EventEnvelope.wrap(CompletedV2(order_id="o-2", total={"cents": 1}), producer="p")
    with pytest.raises(EventSchemaError, match="never downcast"):
        new.decode(as_version=1)


def test_decode_reports_unknown_types_and_bad_payloads() -> None:
    unknown = EventEnvelope(type=f"{UNIT}.nobody.knows", schema_version=1, producer="p", payload={})
    with pytest.raises(UnknownEventTypeError, match="unknown event type"):
        unknown.decode()
    future = EventEnvelope(
        type=f"{UNIT}.order.compensated", schema_version=7, producer="p", payload={}
    )
    with pytest.raises(UnknownEventTypeError, match="unknown version 7"):
        future.decode()
    broken = EventEnvelope(
        type=f"{UNIT}.order.compensated", schema_version=1, producer="p", payload={"x": 1}
    )
    with pytest.raises(EventSchemaError, match="order_id"):
        broken.decode()


def test_event_message_is_an_outbox_row_keyed_for_ordering() -> None:
    envelope = EventEnvelope.wrap(
        Completed(order_id="o-1"), correlation_id="order-o-1", producer="app"
    )
    message = event_message(envelope)
    assert message.kind == "event"
    assert message.id == envelope.event_id
    assert message.destination == envelope.type
    assert message.queue == "orchestrator.events"
    assert message.aggregate_id == "order-o-1"
    assert message.body == envelope.to_json()
    assert event_message(envelope, exchange="other").queue == "other"


# --- publishing through the outbox -----------------------------------------------------


def test_publish_joins_the_callers_transaction(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher)
    with Session(engine) as session:
        envelope = publish(session, writer, Completed(order_id="o-1"), correlation_id="wf-1")
        session.rollback()
    assert outbox_rows(engine) == []
    assert publisher.published == []

    with Session(engine) as session:
        envelope = publish(
            session, writer, Completed(order_id="o-1"), correlation_id="wf-1", producer="shop"
        )
        session.commit()
    [row] = outbox_rows(engine)
    assert row["id"] == envelope.event_id
    assert row["kind"] == "event"
    assert row["aggregate_id"] == "wf-1"
    assert EventEnvelope.model_validate(row["body"]) == envelope
    assert [message.id for message in publisher.published] == [envelope.event_id]


def test_writer_leaves_relay_only_kinds_to_the_relay(engine: Engine) -> None:
    publisher = RecordingPublisher()
    writer = OutboxWriter(engine, publisher, relay_only_kinds={"event"})
    task = events.event_message(
        EventEnvelope.wrap(Completed(order_id="o"), producer="p")
    ).model_copy(update={"kind": "task", "id": "task-1"})
    with Session(engine) as session:
        envelope = publish(session, writer, Completed(order_id="o-1"), correlation_id="wf-1")
        writer.add(session, [task])
        session.commit()
    assert [message.id for message in publisher.published] == ["task-1"]

    relay_publisher = RecordingPublisher()
    # No grace for relay-only kinds: nothing else would ever publish them.
    relay = Relay(engine, relay_publisher, grace=60, relay_only_kinds={"event"})
    assert relay.run_once() == 1
    assert [message.id for message in relay_publisher.published] == [envelope.event_id]


def _write_events(engine: Engine, plan: list[str]) -> list[str]:
    """Commit one event per entry (its correlation id), each in its own transaction."""
    writer = OutboxWriter(engine, RecordingPublisher(), publish_after_commit=False)
    ids = []
    for number, correlation in enumerate(plan):
        with Session(engine) as session:
            envelope = publish(
                session,
                writer,
                Completed(order_id=correlation, total_cents=number),
                correlation_id=correlation,
            )
            session.commit()
        ids.append(envelope.event_id)
    return ids


def test_relay_holds_back_an_aggregates_rows_behind_an_earlier_unpublished_one(
    engine: Engine,
) -> None:
    ids = _write_events(engine, ["a", "b", "a", "a", "b"])
    # The first row of "a" is still in its grace period (its post-commit publish
    # could be under way), so no later row of "a" may overtake it.
    with engine.begin() as conn:
        conn.execute(
            update(outbox_messages)
            .where(outbox_messages.c.id != ids[0])
            .values(created_at=datetime.now(UTC) - timedelta(seconds=60))
        )
    publisher = RecordingPublisher()
    relay = Relay(engine, publisher, grace=30)
    assert relay.run_once() == 2
    assert [message.id for message in publisher.published] == [ids[1], ids[4]]

    with engine.begin() as conn:
        conn.execute(
            update(outbox_messages).values(created_at=datetime.now(UTC) - timedelta(seconds=60))
        )
    assert relay.run_once() == 3
    assert [message.id for message in publisher.published] == [
        ids[1],
        ids[4],
        ids[0],
        ids[2],
        ids[3],
    ]


def test_relay_keeps_order_across_batches_and_ignores_other_kinds(engine: Engine) -> None:
    ids = _write_events(engine, ["a"] * 5)
    publisher = RecordingPublisher()
    relay = Relay(engine, publisher, grace=0, batch_size=2)
    while relay.run_once():
        pass
    assert [message.id for message in publisher.published] == ids

    # Ordering is for the ordered kinds only: tasks are unaffected.
    unordered = Relay(engine, RecordingPublisher(), grace=0, ordered_kinds=())
    assert unordered.ordered_kinds == frozenset()


# --- topology names --------------------------------------------------------------------


def test_topology_names() -> None:
    topology = Topology("orchestrator.events")
    assert topology.unroutable_exchange == "orchestrator.events.unroutable"
    assert topology.unroutable_queue == "orchestrator.events.unroutable"
    assert topology.group_queue("notifications") == "orchestrator.events.notifications"
    assert topology.dead_letter_exchange("analytics") == "orchestrator.events.analytics.dead-letter"
    assert topology.dead_letter_queue("analytics") == "orchestrator.events.analytics.dead-letter"


@pytest.mark.parametrize("group", ["", "unroutable", "a.b", "-x", "x" * 101, "with space"])
def test_invalid_group_names_are_refused(group: str) -> None:
    with pytest.raises(SubscriberError):
        validate_group_name(group)


class _Channel:
    def __init__(self, properties: dict[str, Any]) -> None:
        self.connection = type("C", (), {"server_properties": properties})()


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"product": "RabbitMQ", "version": "3.10.8"}, "quorum"),
        ({"product": b"RabbitMQ", "version": b"3.8.0"}, "quorum"),
        ({"product": "RabbitMQ", "version": "3.7.28"}, "classic"),
        ({"product": "Other", "version": "9.0"}, "classic"),
        ({}, "classic"),
    ],
)
def test_auto_queue_type_follows_the_broker(properties: dict[str, Any], expected: str) -> None:
    assert resolve_queue_type(_Channel(properties), "auto") == expected
    assert resolve_queue_type(_Channel(properties), "classic") == "classic"


# --- patterns and subscribers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("order.*", "order.completed", True),
        ("order.*", "order.completed.late", False),
        ("order.*", "order", False),
        ("order.#", "order", True),
        ("order.#", "order.a.b", True),
        ("#", "anything.at.all", True),
        ("#.completed", "order.completed", True),
        ("#.completed", "completed", True),
        ("*.completed", "order.completed", True),
        ("*.completed", "a.order.completed", False),
        ("order.#.done", "order.done", True),
        ("order.#.done", "order.x.y.done", True),
        ("order.#.done", "order.x.y.undone", False),
        ("order.completed", "order.completed", True),
        ("order.completed", "order.compensated", False),
    ],
)
def test_topic_matching_follows_topic_exchange_rules(
    pattern: str, key: str, expected: bool
) -> None:
    assert topic_matches(pattern, key) is expected


@pytest.mark.parametrize("pattern", ["", "order.", "Order.*", "order.c*", "a..b"])
def test_invalid_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(SubscriberError):
        validate_pattern(pattern)


def test_subscriber_signatures() -> None:
    local = SubscriberRegistry()

    @events.subscriber(f"{UNIT}.#", group="audit", registry=local)
    def audit(event: EventEnvelope, session: Session) -> None: ...

    @events.subscriber(f"{UNIT}.#", group="audit", registry=local, name="any")
    def anything(event: DomainEvent, session: Session) -> None: ...

    @events.subscriber(f"{UNIT}.order.*", group="mail", registry=local)
    def typed(
        event: Completed | Compensated, session: Session, envelope: EventEnvelope
    ) -> None: ...

    names = [s.name for s in local.all()]
    assert names == [f"{__name__}.{audit.__qualname__}", "any", f"{__name__}.{typed.__qualname__}"]
    assert list(local.groups()) == ["audit", "mail"]
    [mail] = local.group("mail")
    assert mail.with_envelope
    assert not local.group("audit")[0].with_envelope

    with pytest.raises(SubscriberError, match=r"\(event, session\)"):

        @events.subscriber("x.y", group="g", registry=local)
        def one_argument(event: EventEnvelope) -> None: ...

    with pytest.raises(SubscriberError, match="annotated"):

        @events.subscriber("x.y", group="g", registry=local)
        def wrong_type(event: int, session: Session) -> None: ...

    with pytest.raises(SubscriberError, match="annotated"):

        @events.subscriber("x.y", group="g", registry=local)
        def optional(event: Completed | None, session: Session) -> None: ...

    with pytest.raises(SubscriberError, match="group"):
        events.subscriber("x.y", group="bad group", registry=local)


def test_subscription_arguments_follow_the_annotation() -> None:
    local = SubscriberRegistry()

    @events.subscriber(f"{UNIT}.order.*", group="g", registry=local, name="env")
    def env(event: EventEnvelope, session: Session) -> None: ...

    @events.subscriber(f"{UNIT}.order.*", group="g", registry=local, name="any")
    def anything(event: DomainEvent, session: Session) -> None: ...

    @events.subscriber(f"{UNIT}.order.*", group="g", registry=local, name="v2")
    def upcast(event: CompletedV2, session: Session) -> None: ...

    @events.subscriber(f"{UNIT}.order.*", group="g", registry=local, name="v1")
    def old_reader(event: Completed, session: Session) -> None: ...

    subs = {s.name: s for s in local.all()}
    v1 = EventEnvelope.wrap(Completed(order_id="o", total_cents=3), producer="p")
    v2 = EventEnvelope.wrap(CompletedV2(order_id="o", total={"cents": 3}), producer="p")
    other = EventEnvelope.wrap(Compensated(order_id="o", reason="r"), producer="p")
    registry = events.registry

    assert subs["env"].argument(v1, registry) is v1
    assert subs["any"].argument(v1, registry) == Completed(order_id="o", total_cents=3)
    assert subs["any"].argument(v2, registry) == CompletedV2(order_id="o", total={"cents": 3})
    assert subs["v2"].argument(v1, registry) == CompletedV2(
        order_id="o", total={"cents": 3, "currency": "EUR"}
    )
    # The annotation narrows the pattern.
    assert subs["v2"].argument(other, registry) is None
    with pytest.raises(EventSchemaError, match="up to version 1"):
        subs["v1"].argument(v2, registry)


class Shared(DomainEvent):
    """A base of event classes, not an event type itself."""

    order_id: str


@event_type(f"{UNIT}.order.shipped")
class Shipped(Shared):
    carrier: str


@event_type(f"{UNIT}.order.returned")
class Returned(Shared):
    pass


def test_a_base_class_annotation_takes_every_event_deriving_from_it() -> None:
    local = SubscriberRegistry()

    @events.subscriber(f"{UNIT}.order.*", group="g", registry=local, name="base")
    def by_base(event: Shared, session: Session) -> None: ...

    [subscription] = local.all()
    shipped = EventEnvelope.wrap(Shipped(order_id="o", carrier="c"), producer="p")
    returned = EventEnvelope.wrap(Returned(order_id="o"), producer="p")
    completed = EventEnvelope.wrap(Completed(order_id="o"), producer="p")
    unknown = EventEnvelope(type=f"{UNIT}.order.lost", schema_version=1, producer="p", payload={})
    assert subscription.argument(shipped, events.registry) == Shipped(order_id="o", carrier="c")
    assert subscription.argument(returned, events.registry) == Returned(order_id="o")
    assert subscription.argument(completed, events.registry) is None
    assert subscription.argument(unknown, events.registry) is None
    broken = EventEnvelope(
        type=f"{UNIT}.order.shipped", schema_version=1, producer="p", payload={"order_id": "o"}
    )
    with pytest.raises(EventSchemaError, match="carrier"):
        subscription.argument(broken, events.registry)


def test_unresolvable_annotations_are_reported_when_resolved() -> None:
    local = SubscriberRegistry()
    namespace: dict[str, Any] = {}
    exec(
        "from __future__ import annotations\ndef handler(event: Missing, session) -> None: ...\n",
        namespace,
    )
    local.subscriber("x.y", group="g")(namespace["handler"])
    [subscription] = local.all()
    with pytest.raises(SubscriberError, match="cannot resolve"):
        subscription.resolve()


def test_load_subscriber_modules_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(events.MODULES_ENV_VAR, " json , examples.order_fulfillment.subscribers,")
    assert events.load_subscriber_modules() == ["json", "examples.order_fulfillment.subscribers"]
    assert {"notifications", "analytics"} <= set(events.subscriptions.groups())
    with pytest.raises(SubscriberError, match="cannot import"):
        events.load_subscriber_modules(["no_such_module_here"])


# --- the event publisher, without a broker ------------------------------------------------


def test_event_publisher_refuses_tasks_and_reports_an_unreachable_broker() -> None:
    publisher = events.EventPublisher("amqp://guest:guest@127.0.0.1:1//")
    envelope = EventEnvelope.wrap(Completed(order_id="o"), producer="p")
    task = event_message(envelope).model_copy(update={"kind": "task"})
    with pytest.raises(PublishError, match="as an event"):
        publisher.publish([task])
    with pytest.raises(PublishError, match="publishing events failed"):
        publisher.publish([event_message(envelope)])
    publisher.publish([])
    publisher.close()
