"""Command-line parts of the events side, for the ``orchestrator`` command to include.

::

    orchestrator events tail [--pattern P] [--count N] [--timeout S]
    orchestrator subscribers run [--group G ...] [--module M ...]
    orchestrator subscribers status [--group G ...]
    orchestrator subscribers dead-letters list --group G [--limit N]
    orchestrator subscribers dead-letters replay --group G (ID ... | --all) [--reason R]
    orchestrator subscribers dead-letters discard --group G ID ... --reason R

:func:`add_commands` adds them to the command's subparsers and
:func:`run_command` runs one. Output is readable by default and JSON (one
document, or one line per event for ``tail``) with ``as_json``; the progress
lines of a replay or discard go to stderr then. Mistakes raise an
:class:`~outbox.errors.OrchestratorError`.

Replays and discards are written to the ``audit_log`` table of the database,
when it has one (the orchestrator's migrations create it), one row per event
right after it moved: the broker and the database share no transaction.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from sqlalchemy import JSON, DateTime, Engine, String, Text, column, create_engine, inspect, table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from events.config import EventSettings
from events.dead_letters import (
    DeadEvent,
    discard_dead_letters,
    list_dead_letters,
    replay_dead_letters,
)
from events.errors import EventError
from events.monitor import EventsStatus, TailedMessage, dumps, status, tail
from events.runtime import SubscriberRuntime
from events.subscribers import load_subscriber_modules, subscriptions
from events.topology import validate_group_name

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
    _add_dead_letter_commands(subscriber_commands, parser_class)


def _add_dead_letter_commands(subscriber_commands: Any, parser_class: Any) -> None:
    dead_letters = subscriber_commands.add_parser(
        "dead-letters", help="list, replay or discard a group's dead-lettered events"
    )
    commands = dead_letters.add_subparsers(
        dest="dead_letters_command", required=True, parser_class=parser_class
    )
    list_parser = commands.add_parser(
        "list", help="the group's dead letters, oldest first (nothing is removed)"
    )
    list_parser.add_argument(
        "--limit", type=_positive_int, default=100, help="show at most N (default: 100)"
    )
    replay = commands.add_parser(
        "replay", help="move dead letters back to the group's queue, to be handled again"
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="event ids (from list)")
    replay.add_argument("--all", action="store_true", help="every dead letter of the group")
    replay.add_argument("--reason", help="why, for the audit trail")
    discard = commands.add_parser("discard", help="remove dead letters for good")
    discard.add_argument("ids", nargs="+", metavar="ID", help="event ids (from list)")
    discard.add_argument("--reason", required=True, help="why, for the log and the audit trail")
    for sub in (list_parser, replay, discard):
        sub.add_argument("--group", required=True, metavar="G", help="the subscriber group")


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
            subscriber module cannot be imported, a group has no dead-letter
            queue, the audit trail's database cannot be reached.
    """
    if broker_url.startswith(_NOT_A_BROKER):
        raise EventError("events need RabbitMQ: set ORCHESTRATOR_BROKER_URL to an amqp:// URL")
    settings = EventSettings()
    if args.command == "events":
        return _tail(args, settings, broker_url, out, as_json)
    if args.command != "subscribers":
        raise EventError(f"not an events command: {args.command!r}")
    if args.subscribers_command == "dead-letters":
        return _dead_letters(
            args,
            settings,
            database_url=settings_database_url,
            broker_url=broker_url,
            out=out,
            as_json=as_json,
        )
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


# ---------------------------------------------------------------------------- dead letters
_audit_log = table(
    "audit_log",
    column("at", DateTime(timezone=True)),
    column("actor", String),
    column("action", String),
    column("workflow_id", String),
    column("run_id", String),
    column("reason", Text),
    column("details", JSON),
)
"""The orchestrator's audit table, as far as these commands write to it."""


def _default_actor() -> str:
    actor = os.environ.get("ORCHESTRATOR_ACTOR")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


class _AuditTrail:
    """Writes one ``audit_log`` row per replayed or discarded event, if the table exists."""

    def __init__(self, engine: Engine, *, actor: str | None, exchange: str) -> None:
        self.engine = engine
        self.actor = actor or _default_actor()
        self.exchange = exchange
        try:
            self.enabled = inspect(engine).has_table(_audit_log.name)
        except SQLAlchemyError as exc:
            raise EventError(
                f"cannot reach the database for the audit trail, so nothing was done: {exc}"
            ) from exc

    def record(self, action: str, event: DeadEvent, reason: str | None) -> None:
        if not self.enabled:
            return
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    _audit_log.insert().values(
                        at=datetime.now(UTC),
                        actor=self.actor,
                        action=action,
                        workflow_id=event.correlation_id,
                        run_id=None,
                        reason=reason or None,
                        details={
                            "group": event.group,
                            "event_id": event.event_id,
                            "event_type": event.type,
                            "exchange": self.exchange,
                            "dead_letter_reason": event.reason,
                        },
                    )
                )
        except SQLAlchemyError as exc:
            raise EventError(
                f"event {event.event_id} was acted on, but its audit row could not be "
                f"written, so the command stopped: {exc}"
            ) from exc


def _dead_letters(
    args: argparse.Namespace,
    settings: EventSettings,
    *,
    database_url: str,
    broker_url: str,
    out: TextIO,
    as_json: bool,
) -> int:
    group = validate_group_name(args.group.strip())
    exchange = settings.events_exchange
    if args.dead_letters_command == "list":
        events = list_dead_letters(broker_url, group=group, exchange=exchange, limit=args.limit)
        _print_dead_letters(out, group, events, args.limit, as_json)
        return 0
    ids = [event_id for event_id in args.ids if event_id.strip()]
    replaying = args.dead_letters_command == "replay"
    if replaying and args.all and ids:
        raise EventError("name dead letters to replay, or use --all, not both")
    if replaying and not args.all and not ids:
        raise EventError("name dead letters to replay, or use --all")
    notes = sys.stderr if as_json else out
    verb = "replayed" if replaying else "discarded"
    engine = _engine(database_url)
    try:
        audit = _AuditTrail(engine, actor=getattr(args, "actor", None), exchange=exchange)
        if not audit.enabled:
            sys.stderr.write("note: the database has no audit_log table, so this is not audited\n")

        def progress(number: int, total: int, event: DeadEvent) -> None:
            audit.record(f"events.dlq.{'replay' if replaying else 'discard'}", event, args.reason)
            notes.write(f"[{number}/{total}] {event.event_id}  {event.type or '-'}: {verb}\n")
            notes.flush()

        if replaying:
            results = replay_dead_letters(
                broker_url,
                group=group,
                event_ids=None if args.all else ids,
                exchange=exchange,
                progress=progress,
            )
        else:
            discarded = {
                event.event_id
                for event in discard_dead_letters(
                    broker_url,
                    group=group,
                    event_ids=ids,
                    reason=args.reason,
                    exchange=exchange,
                    progress=progress,
                )
            }
            results = [(event_id, event_id in discarded) for event_id in dict.fromkeys(ids)]
    finally:
        engine.dispose()
    for event_id, done in results:
        if not done:
            notes.write(
                f"{event_id}: not in the dead-letter queue (already replayed or discarded, "
                "or another command holds it right now)\n"
            )
    done_count = sum(1 for _, done in results if done)
    if as_json:
        out.write(dumps([{"event_id": event_id, verb: done} for event_id, done in results]) + "\n")
    elif not results:
        out.write(f"no dead letters in group {group}\n")
    else:
        out.write(f"{verb} {done_count} of {len(results)} dead letters of group {group}\n")
    return 0


def _print_dead_letters(
    out: TextIO, group: str, events: list[DeadEvent], limit: int, as_json: bool
) -> None:
    if as_json:
        out.write(dumps([event.to_json() for event in events]) + "\n")
        return
    if not events:
        out.write(f"no dead letters in group {group}\n")
        return
    out.write(f"group {group}: {len(events)} dead letter(s), oldest first\n")
    header = ("event id", "type", "occurred at", "dead-lettered at", "reason", "body")
    rows = [header]
    for event in events:
        rows.append(
            (
                event.event_id,
                event.type or "-",
                _when(event.occurred_at),
                _when(event.dead_lettered_at),
                _clip(event.reason, 70),
                event.preview,
            )
        )
    widths = [max(len(row[index]) for row in rows) for index in range(len(header))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            + "\n"
        )
    if len(events) >= limit:
        out.write(f"(the first {limit}; there may be more: --limit)\n")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
