"""The events commands' parsing, output and mistakes, without services."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from events import EventEnvelope, EventError, SubscriberError
from events.cli import COMMANDS, _format_tailed, _print_status, add_commands, run_command
from events.config import EventSettings
from events.monitor import EventsStatus, GroupStatus, TailedMessage

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orchestrator")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_commands_parse() -> None:
    assert {"events", "subscribers"} == COMMANDS
    tail = parse("events", "tail", "--pattern", "order.*", "--count", "3", "--timeout", "2.5")
    assert (tail.command, tail.events_command) == ("events", "tail")
    assert (tail.pattern, tail.count, tail.timeout) == ("order.*", 3, 2.5)
    assert parse("events", "tail").pattern == "#"

    run = parse("subscribers", "run", "--group", "a,b", "--group", "c", "--module", "m")
    assert (run.subscribers_command, run.group, run.module) == ("run", ["a,b", "c"], ["m"])
    status = parse("subscribers", "status")
    assert (status.subscribers_command, status.group) == ("status", None)


@pytest.mark.parametrize(
    "argv",
    [
        ("events",),
        ("events", "tail", "--count", "0"),
        ("events", "tail", "--timeout", "-1"),
        ("subscribers",),
        ("subscribers", "dance"),
    ],
)
def test_bad_command_lines_are_usage_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2


def test_events_need_a_real_broker() -> None:
    with pytest.raises(EventError, match="RabbitMQ"):
        run_command(
            parse("subscribers", "status"),
            settings_database_url="sqlite://",
            broker_url="embedded://",
            out=io.StringIO(),
            as_json=False,
        )


def test_an_unknown_group_is_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(SubscriberError, match="no subscriber is registered in group 'nobody'"):
        run_command(
            parse("subscribers", "run", "--group", "nobody"),
            settings_database_url=f"sqlite:///{tmp_path / 'x.db'}",
            broker_url="amqp://guest:guest@127.0.0.1:1//",
            out=io.StringIO(),
            as_json=False,
        )


def test_module_entry_point_reports_mistakes_on_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(ORCHESTRATOR_BROKER_URL="embedded://", PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "events", "subscribers", "status"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: events need RabbitMQ")
    assert completed.stdout == ""


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EventSettings().events_exchange == "orchestrator.events"
    monkeypatch.setenv("ORCHESTRATOR_EVENTS_EXCHANGE", "shop.events")
    monkeypatch.setenv("ORCHESTRATOR_SUBSCRIBER_MODULES", "a.b, c ,")
    monkeypatch.setenv("ORCHESTRATOR_SUBSCRIBER_MAX_ATTEMPTS", "9")
    settings = EventSettings()
    assert settings.events_exchange == "shop.events"
    assert settings.modules == ["a.b", "c"]
    assert settings.subscriber_max_attempts == 9


def test_tail_output() -> None:
    envelope = EventEnvelope(
        type="order.completed",
        schema_version=1,
        occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        correlation_id="order-1",
        producer="p",
        payload={"order_id": "1"},
    )
    message = TailedMessage("order.completed", envelope, None, b"")
    assert _format_tailed(message, as_json=False) == (
        '2026-01-02 03:04:05.678  order.completed v1  order-1  {"order_id": "1"}'
    )
    assert EventEnvelope.model_validate_json(_format_tailed(message, as_json=True)) == envelope
    broken = TailedMessage("x.y", None, "not JSON", b"{")
    assert _format_tailed(broken, as_json=False) == "(unreadable message on x.y: not JSON)"
    assert json.loads(_format_tailed(broken, as_json=True)) == {
        "routing_key": "x.y",
        "error": "not JSON",
    }


def test_status_output() -> None:
    result = EventsStatus(
        "orchestrator.events",
        3,
        [
            GroupStatus(
                group="analytics",
                queue="orchestrator.events.analytics",
                exists=True,
                ready=12,
                consumers=1,
                dead_letters=2,
                handled=40,
                last_handled_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                lag_seconds=0.25,
            ),
            GroupStatus(
                group="new",
                queue="orchestrator.events.new",
                exists=False,
                ready=None,
                consumers=None,
                dead_letters=None,
                handled=0,
                last_handled_at=None,
                lag_seconds=None,
            ),
        ],
    )
    out = io.StringIO()
    _print_status(out, result, as_json=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "exchange orchestrator.events  (unroutable events: 3)"
    assert lines[1].split() == [
        "group",
        "waiting",
        "consumers",
        "dead",
        "letters",
        "handled",
        "last",
        "handled",
        "lag",
    ]
    assert lines[2].split() == ["analytics", "12", "1", "2", "40", "2026-01-02", "03:04:05", "0.2s"]
    assert lines[3].split() == ["new", "(no", "queue)", "-", "-", "0", "-", "-"]

    out = io.StringIO()
    _print_status(out, result, as_json=True)
    document = json.loads(out.getvalue())
    assert document["unroutable"] == 3
    assert document["groups"][0]["last_handled_at"] == "2026-01-02T03:04:05+00:00"
    assert document["groups"][1]["exists"] is False
