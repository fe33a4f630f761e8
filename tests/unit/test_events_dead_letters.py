"""Dead-lettered events: reading them, moving them, and the commands, on an in-memory broker.

The broker here keeps what the functions rely on: ``basic.get`` holds a
message until it is acknowledged, closing the channel gives held messages
back to the head of the queue in order (counting a delivery each), a
mandatory publish to no queue is returned, and a passive declare of a missing
queue fails. The real broker's behaviour is in the integration tests.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import amqp.exceptions
import pytest
from sqlalchemy import Engine, create_engine, select

import events._broker
from events import (
    DEAD_LETTER_REASON_HEADER,
    DeadEvent,
    DeadLetterError,
    EventError,
    SubscriberError,
    Topology,
    discard_dead_letters,
    list_dead_letters,
    replay_dead_letters,
)
from events import dead_letters as module
from events.cli import _print_dead_letters, add_commands, run_command
from events.dead_letters import REFRESH_AFTER, _read_dead_letter, _republished_properties
from orchestrator.schema import audit_log

URL = "amqp://fake//"
EXCHANGE = "shop.events"
TOPOLOGY = Topology(EXCHANGE)
DEAD = TOPOLOGY.dead_letter_queue("mail")
QUEUE = TOPOLOGY.group_queue("mail")


# ------------------------------------------------------------------------ an in-memory broker
class FakeMessage:
    def __init__(self, body: bytes | str, properties: dict[str, Any]) -> None:
        self.body = body
        self.properties = properties
        self.delivery_info: dict[str, Any] = {}
        self.returns = 0

    @property
    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = self.properties.setdefault("application_headers", {})
        return headers


class FakeBroker:
    def __init__(self) -> None:
        self.queues: dict[str, list[FakeMessage]] = {}
        self.publishes = 0
        self.fail_publish_at: int | None = None
        self.down = False

    def ids(self, queue: str) -> list[str]:
        return [str(message.properties.get("message_id")) for message in self.queues[queue]]


class FakeChannel:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.held: dict[int, tuple[str, FakeMessage]] = {}
        self.events: defaultdict[str, set[Callable[..., None]]] = defaultdict(set)
        self._tags = 0
        self.is_open = True

    def queue_declare(self, queue: str, passive: bool = False) -> None:
        assert passive
        if queue not in self.broker.queues:
            raise amqp.exceptions.NotFound(f"no queue {queue!r}")

    def basic_get(self, queue: str, no_ack: bool = False) -> FakeMessage | None:
        assert not no_ack
        if not self.broker.queues[queue]:
            return None
        message = self.broker.queues[queue].pop(0)
        self._tags += 1
        message.delivery_info = {"delivery_tag": self._tags}
        if message.returns:
            message.headers["x-delivery-count"] = message.returns
        self.held[self._tags] = (queue, message)
        return message

    def basic_ack(self, delivery_tag: int) -> None:
        del self.held[delivery_tag]

    def basic_publish_confirm(
        self,
        message: Any,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        confirm_timeout: float,
    ) -> None:
        assert exchange == ""
        assert mandatory
        self.broker.publishes += 1
        if self.broker.fail_publish_at == self.broker.publishes:
            raise ConnectionError("connection lost")
        if routing_key not in self.broker.queues:
            for callback in self.events["basic_return"]:
                callback(amqp.exceptions.ChannelError("NO_ROUTE"), exchange, routing_key, message)
            return
        self.broker.queues[routing_key].append(FakeMessage(message.body, dict(message.properties)))

    def close(self) -> None:
        self.is_open = False
        returned: dict[str, list[FakeMessage]] = defaultdict(list)
        for _, (queue, message) in sorted(self.held.items()):
            message.returns += 1
            returned[queue].append(message)
        for queue, messages in returned.items():
            self.broker.queues[queue][:0] = messages
        self.held.clear()


class FakeConnection:
    broker: FakeBroker

    def __init__(self, url: str) -> None:
        assert url == URL

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def ensure_connection(self, max_retries: int) -> None:
        if self.broker.down:
            raise ConnectionRefusedError("connection refused")

    def channel(self) -> FakeChannel:
        return FakeChannel(self.broker)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    fake = FakeBroker()
    fake.queues = {QUEUE: [], DEAD: []}

    class Client:
        class Connection(FakeConnection):
            broker = fake

    monkeypatch.setattr(events._broker, "kombu", Client)
    return fake


def envelope(event_id: str, **fields: Any) -> bytes:
    data = {
        "event_id": event_id,
        "type": "order.completed",
        "schema_version": 1,
        "occurred_at": "2026-01-02T03:04:05+00:00",
        "correlation_id": f"order-{event_id}",
        "producer": "p",
        "payload": {"n": 1},
    }
    data.update(fields)
    return json.dumps(data).encode()


def dead_letter(event_id: str, reason: str = "mail.send failed 5 time(s): OSError") -> FakeMessage:
    return FakeMessage(
        envelope(event_id),
        {
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "message_id": event_id,
            "type": "order.completed",
            "delivery_mode": 2,
            "application_headers": {
                DEAD_LETTER_REASON_HEADER: reason,
                "x-dead-letter-group": "mail",
                "x-dead-lettered-at": "2026-01-02T03:04:06+00:00",
                "x-original-exchange": EXCHANGE,
                "x-original-routing-key": "order.completed",
            },
        },
    )


def fill(broker: FakeBroker, *event_ids: str) -> None:
    broker.queues[DEAD].extend(dead_letter(event_id) for event_id in event_ids)


# ------------------------------------------------------------------------- reading messages
def test_a_dead_letter_is_described_from_its_envelope_and_headers() -> None:
    message = dead_letter("e1")
    message.headers["x-delivery-count"] = 3
    event = _read_dead_letter("mail", message.body, message.properties)
    assert event == DeadEvent(
        event_id="e1",
        type="order.completed",
        reason="mail.send failed 5 time(s): OSError",
        group="mail",
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        dead_lettered_at=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
        correlation_id="order-e1",
        routing_key="order.completed",
        deliveries=3,
        replays=0,
        preview=event.preview,
        body=envelope("e1"),
    )
    assert event.preview.startswith('{"event_id": "e1", "type": "order.completed"')
    assert event.preview.endswith("...")
    assert len(event.preview) == 60
    document = event.to_json()
    assert document["occurred_at"] == "2026-01-02T03:04:05+00:00"
    assert json.loads(document["body"])["event_id"] == "e1"


def test_a_decoded_body_is_read_as_its_bytes() -> None:
    message = dead_letter("e1")
    text = envelope("e1", payload={"name": "Zoë"}).decode()
    assert _read_dead_letter("mail", text, message.properties).body == text.encode("utf-8")


def test_an_unreadable_body_gets_a_stable_id_from_its_content() -> None:
    headers = {DEAD_LETTER_REASON_HEADER: "undecodable: not JSON", "x-dead-lettered-at": "t1"}
    first = _read_dead_letter("mail", b"{not json", {"application_headers": headers})
    again = _read_dead_letter("mail", b"{not json", {"application_headers": dict(headers)})
    later = _read_dead_letter(
        "mail", b"{not json", {"application_headers": {**headers, "x-dead-lettered-at": "t2"}}
    )
    assert first.event_id == again.event_id
    assert first.event_id.startswith("body-")
    assert later.event_id != first.event_id
    assert (first.type, first.occurred_at, first.correlation_id) == (None, None, None)
    assert first.preview == "{not json"
    assert first.reason == "undecodable: not JSON"

    by_message_id = _read_dead_letter(
        "mail", b"\xff\xfe", {"message_id": "m-7", "type": "x.y", "timestamp": 1767322800}
    )
    assert (by_message_id.event_id, by_message_id.type) == ("m-7", "x.y")
    assert by_message_id.occurred_at == datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    assert by_message_id.reason == "unknown"
    assert by_message_id.preview == "\ufffd\ufffd"


def test_a_message_the_broker_dead_lettered_gives_the_brokers_reason() -> None:
    when = datetime(2026, 1, 2, 3, 4, 7)
    properties = {
        "message_id": "e9",
        "application_headers": {
            "x-death": [
                {"reason": "delivery_limit", "queue": "shop.events.mail", "time": when, "count": 1}
            ],
            "x-first-death-reason": "delivery_limit",
        },
    }
    event = _read_dead_letter("mail", envelope("e9"), properties)
    assert event.reason == "delivery_limit (dead-lettered by the broker from shop.events.mail)"
    assert event.dead_lettered_at == when.replace(tzinfo=UTC)


def test_copies_drop_the_brokers_headers_and_a_replayed_copy_drops_the_dead_letter_ones() -> None:
    message = dead_letter("e1")
    message.properties["user_id"] = "someone"
    message.headers.update({"x-delivery-count": 4, "x-death": [], "trace": "abc"})
    fresh = _republished_properties(message.properties)
    assert fresh["message_id"] == "e1"
    assert "user_id" not in fresh
    assert fresh["delivery_mode"] == 2
    assert fresh["application_headers"][DEAD_LETTER_REASON_HEADER].startswith("mail.send")
    assert "x-delivery-count" not in fresh["application_headers"]
    assert "x-death" not in fresh["application_headers"]

    at = datetime(2026, 2, 1, tzinfo=UTC)
    replayed = _republished_properties(message.properties, replayed_at=at)
    assert replayed["application_headers"] == {
        "trace": "abc",
        "x-replayed-at": "2026-02-01T00:00:00+00:00",
        "x-replay-count": 1,
    }
    again = _republished_properties(replayed, replayed_at=at)
    assert again["application_headers"]["x-replay-count"] == 2
    assert _read_dead_letter("mail", b"{}", again).replays == 2


# --------------------------------------------------------------------------------- listing
def test_listing_leaves_every_message_in_its_place(broker: FakeBroker) -> None:
    fill(broker, "a", "b", "c", "d")
    listed = list_dead_letters(URL, group="mail", exchange=EXCHANGE)
    assert [event.event_id for event in listed] == ["a", "b", "c", "d"]
    assert [event.deliveries for event in listed] == [0, 0, 0, 0]
    assert broker.ids(DEAD) == ["a", "b", "c", "d"]

    first_two = list_dead_letters(URL, group="mail", exchange=EXCHANGE, limit=2)
    assert [(event.event_id, event.deliveries) for event in first_two] == [("a", 1), ("b", 1)]
    assert broker.ids(DEAD) == ["a", "b", "c", "d"]
    assert broker.publishes == 0


def test_listing_checks_its_arguments_and_the_queue(broker: FakeBroker) -> None:
    with pytest.raises(ValueError, match="limit"):
        list_dead_letters(URL, group="mail", exchange=EXCHANGE, limit=0)
    with pytest.raises(SubscriberError, match="invalid subscriber group"):
        list_dead_letters(URL, group="no such group", exchange=EXCHANGE)
    with pytest.raises(DeadLetterError, match="'other' has no dead-letter queue"):
        list_dead_letters(URL, group="other", exchange=EXCHANGE)


def test_an_unreachable_broker_is_a_dead_letter_error(broker: FakeBroker) -> None:
    broker.down = True
    with pytest.raises(DeadLetterError, match="cannot reach the broker: connection refused"):
        list_dead_letters(URL, group="mail", exchange=EXCHANGE)


def test_messages_read_often_are_replaced_by_fresh_copies_in_order(broker: FakeBroker) -> None:
    fill(broker, "a", "b", "c")
    for _ in range(REFRESH_AFTER):
        list_dead_letters(URL, group="mail", exchange=EXCHANGE)
    assert [message.returns for message in broker.queues[DEAD]] == [REFRESH_AFTER] * 3

    listed = list_dead_letters(URL, group="mail", exchange=EXCHANGE)
    assert [event.deliveries for event in listed] == [REFRESH_AFTER] * 3
    assert broker.ids(DEAD) == ["a", "b", "c"]
    assert [message.returns for message in broker.queues[DEAD]] == [0, 0, 0]
    assert broker.queues[DEAD][0].headers[DEAD_LETTER_REASON_HEADER].startswith("mail.send")
    assert "x-delivery-count" not in broker.queues[DEAD][0].headers
    assert [
        event.deliveries for event in list_dead_letters(URL, group="mail", exchange=EXCHANGE)
    ] == [
        0,
        0,
        0,
    ]


# ------------------------------------------------------------------------------- replaying
def test_replay_moves_the_chosen_events_in_order_and_leaves_the_rest(broker: FakeBroker) -> None:
    fill(broker, "a", "b", "c", "d", "e")
    calls: list[tuple[int, int, str]] = []
    results = replay_dead_letters(
        URL,
        group="mail",
        exchange=EXCHANGE,
        event_ids=["d", "b", "zz", "b"],
        progress=lambda number, total, event: calls.append((number, total, event.event_id)),
    )
    assert results == [("d", True), ("b", True), ("zz", False)]
    assert calls == [(1, 2, "b"), (2, 2, "d")]
    assert broker.ids(QUEUE) == ["b", "d"]
    assert broker.ids(DEAD) == ["a", "c", "e"]
    moved = broker.queues[QUEUE][0]
    assert moved.body == envelope("b")
    assert moved.properties["message_id"] == "b"
    assert moved.headers["x-replay-count"] == 1
    assert DEAD_LETTER_REASON_HEADER not in moved.headers

    assert replay_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=["b"]) == [
        ("b", False)
    ]
    assert replay_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=[]) == []
    assert broker.ids(QUEUE) == ["b", "d"]


def test_replay_of_all_moves_every_event(broker: FakeBroker) -> None:
    fill(broker, "a", "b", "c")
    assert replay_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=None) == [
        ("a", True),
        ("b", True),
        ("c", True),
    ]
    assert broker.ids(QUEUE) == ["a", "b", "c"]
    assert broker.queues[DEAD] == []
    assert replay_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=None) == []


def test_replay_needs_the_groups_queue_and_moves_nothing_without_it(broker: FakeBroker) -> None:
    fill(broker, "a")
    del broker.queues[QUEUE]
    with pytest.raises(DeadLetterError, match=r"has no queue 'shop\.events\.mail'"):
        replay_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=None)
    assert broker.ids(DEAD) == ["a"]


def test_a_copy_the_broker_routes_nowhere_stops_the_replay_and_stays(
    broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(broker, "a", "b")
    # The queue goes away between the check and the publish.
    original = FakeChannel.queue_declare

    def declare_then_delete(self: FakeChannel, queue: str, passive: bool = False) -> None:
        original(self, queue, passive)
        if queue == QUEUE:
            del broker.queues[QUEUE]

    monkeypatch.setattr(FakeChannel, "queue_declare", declare_then_delete)
    with pytest.raises(DeadLetterError, match=r"stopped after 0 of 2 events.*routed the event"):
        replay_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=None)
    assert broker.ids(DEAD) == ["a", "b"]


def test_a_failed_publish_stops_the_replay_and_keeps_what_moved(broker: FakeBroker) -> None:
    fill(broker, "a", "b", "c", "d")
    broker.fail_publish_at = 2
    calls: list[str] = []
    with pytest.raises(DeadLetterError, match="stopped after 1 of 3 events: moving c failed"):
        replay_dead_letters(
            URL,
            group="mail",
            exchange=EXCHANGE,
            event_ids=["a", "c", "d"],
            progress=lambda number, total, event: calls.append(event.event_id),
        )
    assert calls == ["a"]
    assert broker.ids(QUEUE) == ["a"]
    assert broker.ids(DEAD) == ["b", "c", "d"]


# ------------------------------------------------------------------------------ discarding
def test_discard_removes_the_chosen_events_and_logs_why(
    broker: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    fill(broker, "a", "b", "c")
    with caplog.at_level(logging.WARNING, logger="events.dead_letters"):
        discarded = discard_dead_letters(
            URL, group="mail", exchange=EXCHANGE, event_ids=["b", "nope"], reason="bad address"
        )
    assert [event.event_id for event in discarded] == ["b"]
    assert broker.ids(DEAD) == ["a", "c"]
    assert broker.queues[QUEUE] == []
    assert "dead letter b (order.completed) of group mail discarded: bad address" in caplog.text
    assert (
        discard_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=["b"], reason="again")
        == []
    )


def test_discard_needs_a_reason(broker: FakeBroker) -> None:
    fill(broker, "a")
    with pytest.raises(DeadLetterError, match="needs a reason"):
        discard_dead_letters(URL, group="mail", exchange=EXCHANGE, event_ids=["a"], reason=" ")
    assert broker.ids(DEAD) == ["a"]


# -------------------------------------------------------------------------------- commands
def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orchestrator")
    parser.add_argument("--actor")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_dead_letter_commands_parse() -> None:
    listed = parse("subscribers", "dead-letters", "list", "--group", "mail", "--limit", "5")
    assert (listed.subscribers_command, listed.dead_letters_command) == ("dead-letters", "list")
    assert (listed.group, listed.limit) == ("mail", 5)
    assert parse("subscribers", "dead-letters", "list", "--group", "mail").limit == 100
    replay = parse("subscribers", "dead-letters", "replay", "--group", "mail", "a", "b")
    assert (replay.ids, replay.all, replay.reason) == (["a", "b"], False, None)
    everything = parse("subscribers", "dead-letters", "replay", "--group", "mail", "--all")
    assert (everything.ids, everything.all) == ([], True)
    discard = parse(
        "subscribers", "dead-letters", "discard", "--group", "mail", "a", "--reason", "spam"
    )
    assert (discard.ids, discard.reason) == (["a"], "spam")


@pytest.mark.parametrize(
    "argv",
    [
        ("subscribers", "dead-letters"),
        ("subscribers", "dead-letters", "list"),
        ("subscribers", "dead-letters", "list", "--group", "mail", "--limit", "0"),
        ("subscribers", "dead-letters", "replay", "a"),
        ("subscribers", "dead-letters", "discard", "--group", "mail", "a"),
        ("subscribers", "dead-letters", "discard", "--group", "mail", "--reason", "r"),
    ],
)
def test_bad_dead_letter_command_lines_are_usage_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2


@pytest.fixture
def database(tmp_path: Any) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = create_engine(url)
    audit_log.create(engine)
    yield url, engine
    engine.dispose()


@pytest.fixture
def exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_EVENTS_EXCHANGE", EXCHANGE)


def command(database_url: str, *argv: str, as_json: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    status = run_command(
        parse(*argv),
        settings_database_url=database_url,
        broker_url=URL,
        out=out,
        as_json=as_json,
    )
    return status, out.getvalue()


def progress_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    # Only the command's own lines: log handlers other tests left may write there too.
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]


def audit_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(select(audit_log)).mappings()]


@pytest.mark.usefixtures("exchange")
def test_the_list_command_prints_a_table_or_json(
    broker: FakeBroker, database: tuple[str, Engine]
) -> None:
    url, _ = database
    fill(broker, "a", "b")
    status, text = command(url, "subscribers", "dead-letters", "list", "--group", "mail")
    assert status == 0
    lines = text.splitlines()
    assert lines[0] == "group mail: 2 dead letter(s), oldest first"
    assert lines[1].split()[:4] == ["event", "id", "type", "occurred"]
    assert lines[2].split()[:6] == [
        "a",
        "order.completed",
        "2026-01-02",
        "03:04:05",
        "2026-01-02",
        "03:04:06",
    ]
    assert "mail.send failed 5 time(s): OSError" in lines[2]
    assert len(lines) == 4

    status, text = command(
        url, "subscribers", "dead-letters", "list", "--group", "mail", "--limit", "1"
    )
    assert text.splitlines()[-1] == "(the first 1; there may be more: --limit)"

    status, text = command(
        url, "subscribers", "dead-letters", "list", "--group", "mail", as_json=True
    )
    assert [event["event_id"] for event in json.loads(text)] == ["a", "b"]
    assert broker.ids(DEAD) == ["a", "b"]


def test_an_empty_list() -> None:
    out = io.StringIO()
    _print_dead_letters(out, "mail", [], 100, as_json=False)
    assert out.getvalue() == "no dead letters in group mail\n"
    out = io.StringIO()
    _print_dead_letters(out, "mail", [], 100, as_json=True)
    assert json.loads(out.getvalue()) == []


@pytest.mark.usefixtures("exchange")
def test_the_replay_command_shows_progress_and_writes_the_audit_trail(
    broker: FakeBroker, database: tuple[str, Engine]
) -> None:
    url, engine = database
    fill(broker, "a", "b", "c")
    status, text = command(
        url,
        "--actor",
        "ops",
        "subscribers",
        "dead-letters",
        "replay",
        "--group",
        "mail",
        "c",
        "a",
        "zz",
        "--reason",
        "mail server fixed",
    )
    assert status == 0
    assert text.splitlines() == [
        "[1/2] a  order.completed: replayed",
        "[2/2] c  order.completed: replayed",
        "zz: not in the dead-letter queue (already replayed or discarded, "
        "or another command holds it right now)",
        "replayed 2 of 3 dead letters of group mail",
    ]
    assert broker.ids(QUEUE) == ["a", "c"]
    rows = audit_rows(engine)
    assert [(row["action"], row["actor"], row["workflow_id"], row["reason"]) for row in rows] == [
        ("events.dlq.replay", "ops", "order-a", "mail server fixed"),
        ("events.dlq.replay", "ops", "order-c", "mail server fixed"),
    ]
    assert rows[0]["details"] == {
        "group": "mail",
        "event_id": "a",
        "event_type": "order.completed",
        "exchange": EXCHANGE,
        "dead_letter_reason": "mail.send failed 5 time(s): OSError",
    }


@pytest.mark.usefixtures("exchange")
def test_replay_all_in_json_mode_puts_progress_on_stderr(
    broker: FakeBroker, database: tuple[str, Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = database
    fill(broker, "a", "b")
    status, text = command(
        url, "subscribers", "dead-letters", "replay", "--group", "mail", "--all", as_json=True
    )
    assert status == 0
    assert json.loads(text) == [
        {"event_id": "a", "replayed": True},
        {"event_id": "b", "replayed": True},
    ]
    assert progress_lines(capsys) == [
        "[1/2] a  order.completed: replayed",
        "[2/2] b  order.completed: replayed",
    ]
    assert len(audit_rows(engine)) == 2

    status, text = command(url, "subscribers", "dead-letters", "replay", "--group", "mail", "--all")
    assert text == "no dead letters in group mail\n"


@pytest.mark.usefixtures("exchange")
def test_the_discard_command(
    broker: FakeBroker, database: tuple[str, Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    url, engine = database
    fill(broker, "a", "b")
    status, text = command(
        url,
        "subscribers",
        "dead-letters",
        "discard",
        "--group",
        "mail",
        "b",
        "--reason",
        "customer gone",
        as_json=True,
    )
    assert status == 0
    assert json.loads(text) == [{"event_id": "b", "discarded": True}]
    assert progress_lines(capsys) == ["[1/1] b  order.completed: discarded"]
    assert broker.ids(DEAD) == ["a"]
    [row] = audit_rows(engine)
    assert (row["action"], row["reason"]) == ("events.dlq.discard", "customer gone")


@pytest.mark.usefixtures("exchange")
@pytest.mark.parametrize(
    ("ids", "message"),
    [((), "name dead letters to replay, or use --all"), (("a", "--all"), "not both")],
)
def test_replay_needs_ids_or_all_but_not_both(
    broker: FakeBroker, database: tuple[str, Engine], ids: tuple[str, ...], message: str
) -> None:
    url, _ = database
    fill(broker, "a")
    with pytest.raises(EventError, match=message):
        command(url, "subscribers", "dead-letters", "replay", "--group", "mail", *ids)
    assert broker.ids(DEAD) == ["a"]


@pytest.mark.usefixtures("exchange")
def test_without_an_audit_table_the_command_says_so_and_acts(
    broker: FakeBroker, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(broker, "a")
    url = f"sqlite:///{tmp_path / 'events-only.db'}"
    status, text = command(url, "subscribers", "dead-letters", "replay", "--group", "mail", "a")
    assert status == 0
    assert text.splitlines()[-1] == "replayed 1 of 1 dead letters of group mail"
    assert "no audit_log table" in capsys.readouterr().err
    assert broker.ids(QUEUE) == ["a"]


@pytest.mark.usefixtures("exchange")
def test_an_unreachable_audit_database_stops_the_command_before_it_acts(
    broker: FakeBroker, tmp_path: Any
) -> None:
    fill(broker, "a")
    url = f"sqlite:///{tmp_path / 'missing-directory' / 'x.db'}"
    with pytest.raises(EventError, match="cannot reach the database"):
        command(
            url, "subscribers", "dead-letters", "discard", "--group", "mail", "a", "--reason", "r"
        )
    assert broker.ids(DEAD) == ["a"]


def test_the_module_is_public_through_the_package() -> None:
    assert module.__all__ == [
        "REFRESH_AFTER",
        "DeadEvent",
        "DeadLetterError",
        "Progress",
        "discard_dead_letters",
        "list_dead_letters",
        "replay_dead_letters",
    ]
    assert issubclass(DeadLetterError, EventError)
