"""Command-line parts of the events side, for the ``orchestrator`` command to include.

::

    orchestrator events tail [--pattern P] [--count N] [--timeout S]
    orchestrator subscribers run [--group G ...] [--module M ...]
    orchestrator subscribers status [--group G ...]

:func:`add_commands` adds them to the command's subparsers and
:func:`run_command` runs one. Output is readable by default and JSON (one
document, or one line per event for ``tail``) with ``as_json``. Mistakes raise
an :class:`~outbox.errors.OrchestratorError`.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from events.config import EventSettings
from events.errors import EventError
from events.monitor import EventsStatus, TailedMessage, dumps, status, tail
from events.runtime import SubscriberRuntime
from events.subscribers import load_subscriber_modules, subscriptions

__all__ = ["COMMANDS", "add_commands", "run_command"]

COMMANDS = frozenset({"events", "subscribers"})
"""Top-level command names :func:`add_commands` adds and :func:`run_command` runs."""

_NOT_A_BROKER = ("embedded://", "memory://")


def add_commands(subparsers: Any) -> None:
    """Add ``events`` and ``subscribers`` to ``subparsers`` (from ``add_subparsers``)."""
    parser_class = getattr(subparsers, "_parser_class", argparse.ArgumentParser)

    events = subparsers.add_parser("events", help="look at domain events on the broker")
    events_commands = events.add_subparsers(
        dest="events_command", required=True, parser_class=parser_class
    )
    tail_parser = events_commands.add_parser(
        "tail", help="print events as they are published (from now on)"
    )
    tail_parser.add_argument(
        "--pattern", default="#", help="topic pattern of event types (default: '#', all)"
    )
    tail_parser.add_argument("--count", type=_positive_int, help="stop after N events")
    tail_parser.add_argument("--timeout", type=_positive_float, help="stop after S seconds")

    subscribers = subparsers.add_parser("subscribers", help="run and inspect event subscribers")
    subscriber_commands = subscribers.add_subparsers(
        dest="subscribers_command", required=True, parser_class=parser_class
    )
    run = subscriber_commands.add_parser("run", help="consume events and run the handlers")
    status_parser = subscriber_commands.add_parser(
        "status", help="queue depth, dead letters and lag of each group"
    )
    for sub in (run, status_parser):
        sub.add_argument(
            "--group",
            action="append",
            default=None,
            metavar="G",
            help="a subscriber group (repeat, or comma-separate; default: all)",
        )
        sub.add_argument(
            "--module",
            action="append",
            default=None,
            metavar="M",
            help="a module declaring subscribers (adds to $ORCHESTRATOR_SUBSCRIBER_MODULES)",
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def run_command(
    args: argparse.Namespace,
    *,
    settings_database_url: str,
    broker_url: str,
    out: TextIO,
    as_json: bool,
) -> int:
    """Run the ``events`` or ``subscribers`` command parsed into ``args``; return the exit status.

    Raises:
        EventError: the broker is the embedded one, a group is unknown, a
            subscriber module cannot be imported.
    """
    if broker_url.startswith(_NOT_A_BROKER):
        raise EventError("events need RabbitMQ: set ORCHESTRATOR_BROKER_URL to an amqp:// URL")
    settings = EventSettings()
    if args.command == "events":
        return _tail(args, settings, broker_url, out, as_json)
    if args.command != "subscribers":
        raise EventError(f"not an events command: {args.command!r}")
    load_subscriber_modules([*settings.modules, *(args.module or [])])
    groups = _groups(args.group)
    engine = _engine(settings_database_url)
    try:
        if args.subscribers_command == "run":
            return _run(settings, engine, broker_url, groups)
        result = status(
            engine,
            broker_url,
            exchange=settings.events_exchange,
            groups=groups if groups is not None else list(subscriptions.groups()),
        )
        _print_status(out, result, as_json)
        return 0
    finally:
        engine.dispose()


def _groups(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _engine(url: str) -> Engine:
    if make_url(url).get_backend_name() == "sqlite":
        return create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    return create_engine(url, pool_pre_ping=True)


def _run(settings: EventSettings, engine: Engine, broker_url: str, groups: list[str] | None) -> int:
    runtime = SubscriberRuntime(
        engine,
        broker_url,
        groups=groups,
        exchange=settings.events_exchange,
        prefetch_count=settings.subscriber_prefetch,
        max_attempts=settings.subscriber_max_attempts,
        retry_delay=settings.subscriber_retry_seconds,
        max_retry_delay=settings.subscriber_max_retry_seconds,
        queue_type=settings.events_queue_type,
        single_active_consumer=settings.subscriber_single_active,
        delivery_limit=settings.subscriber_delivery_limit or None,
    )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    runtime.run(stop)
    return 0


def _tail(
    args: argparse.Namespace,
    settings: EventSettings,
    broker_url: str,
    out: TextIO,
    as_json: bool,
) -> int:
    def show(message: TailedMessage) -> None:
        out.write(_format_tailed(message, as_json) + "\n")
        out.flush()

    tail(
        broker_url,
        show,
        exchange=settings.events_exchange,
        pattern=args.pattern,
        count=args.count,
        timeout=args.timeout,
        queue_type=settings.events_queue_type,
    )
    return 0


def _format_tailed(message: TailedMessage, as_json: bool) -> str:
    envelope = message.envelope
    if envelope is None:
        if as_json:
            return dumps({"routing_key": message.routing_key, "error": message.error})
        return f"(unreadable message on {message.routing_key}: {message.error})"
    if as_json:
        return dumps(envelope.to_json())
    when = envelope.occurred_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return (
        f"{when}  {envelope.type} v{envelope.schema_version}  "
        f"{envelope.correlation_id or '-'}  {dumps(envelope.payload)}"
    )


def _print_status(out: TextIO, result: EventsStatus, as_json: bool) -> None:
    if as_json:
        out.write(dumps(result.to_json()) + "\n")
        return
    unroutable = "-" if result.unroutable is None else str(result.unroutable)
    out.write(f"exchange {result.exchange}  (unroutable events: {unroutable})\n")
    if not result.groups:
        out.write("no subscriber groups\n")
        return
    header = ("group", "waiting", "consumers", "dead letters", "handled", "last handled", "lag")
    rows = [header]
    for group in result.groups:
        rows.append(
            (
                group.group,
                str(group.ready) if group.exists else "(no queue)",
                _count(group.consumers),
                _count(group.dead_letters),
                str(group.handled),
                group.last_handled_at.strftime("%Y-%m-%d %H:%M:%S")
                if group.last_handled_at
                else "-",
                f"{group.lag_seconds:.1f}s" if group.lag_seconds is not None else "-",
            )
        )
    widths = [max(len(row[index]) for row in rows) for index in range(len(header))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            + "\n"
        )


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)
