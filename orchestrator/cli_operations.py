"""Operator commands: list runs and stuck ones, pause and resume, dead letters, audit."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TextIO

from orchestrator.app import Orchestrator
from orchestrator.cli_output import CliError, emit, parse_since, table


def add_operations_commands(commands: Any) -> None:
    """Add ``ls``, ``dlq`` and ``audit`` to the ``orchestrator`` parser's subcommands."""
    parser_class = commands._parser_class  # the same one-line-error parser as the rest
    ls = commands.add_parser("ls", help="list runs (--stuck: those making no progress)")
    ls.add_argument("--status", help="RUNNING, COMPLETED, FAILED, COMPENSATED, ...")
    ls.add_argument("--type", dest="workflow_type", help="workflow type")
    ls.add_argument("--since", help="an ISO time, or an age such as 30m, 2h, 7d")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--stuck", action="store_true", help="only runs that make no progress")
    ls.add_argument(
        "--stuck-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long an activity may wait before its run counts as stuck (300)",
    )

    dlq = commands.add_parser("dlq", help="dead-lettered compensations")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=parser_class)
    dlq_list = dlq_commands.add_parser("list", help="list dead letters (open ones by default)")
    dlq_list.add_argument("--workflow-type")
    dlq_list.add_argument("--since")
    dlq_list.add_argument("--status", default="OPEN", help="OPEN, REPLAYED, DISCARDED or ALL")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_show = dlq_commands.add_parser("show", help="one dead letter with every attempt's error")
    dlq_show.add_argument("id")
    dlq_replay = dlq_commands.add_parser(
        "replay", help="run dead-lettered compensations again with a fresh retry budget"
    )
    dlq_replay.add_argument("ids", nargs="*", metavar="ID")
    dlq_replay.add_argument("--all", action="store_true", help="every open dead letter")
    dlq_replay.add_argument("--workflow-type", help="with --all: only this workflow type")
    dlq_replay.add_argument("--reason")
    dlq_discard = dlq_commands.add_parser(
        "discard", help="give a compensation up; the saga goes on without it"
    )
    dlq_discard.add_argument("ids", nargs="+", metavar="ID")
    dlq_discard.add_argument("--reason", required=True)

    audit_parser = commands.add_parser("audit", help="who did what to which run")
    audit_parser.add_argument("--workflow-id")
    audit_parser.add_argument("--limit", type=int, default=50)


def pause(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    changed = handle.pause(args.reason or "", actor=args.actor)
    text = "paused" if changed else "was already paused:"
    data = {"workflow_id": handle.workflow_id, "paused": True, "changed": changed}
    emit(out, args, data, f"{text} {handle.workflow_id}\n")
    return 0


def resume(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    changed = handle.resume(args.reason or "", actor=args.actor)
    text = "resumed" if changed else "was not paused:"
    data = {"workflow_id": handle.workflow_id, "paused": False, "changed": changed}
    emit(out, args, data, f"{text} {handle.workflow_id}\n")
    return 0


def ls(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    from orchestrator.operations import list_runs, stuck_runs

    engine = orchestrator.engine
    if args.stuck:
        rows = stuck_runs(engine, after=timedelta(seconds=args.stuck_after), limit=args.limit)
        columns = ["workflow_id", "workflow_type", "status", "reason"]
    else:
        rows = list_runs(
            engine,
            status=args.status,
            workflow_type=args.workflow_type,
            since=parse_since(args.since),
            limit=args.limit,
        )
        columns = ["workflow_id", "workflow_type", "status", "events", "created_at"]
    if args.json:
        out.write(json.dumps(rows, indent=2) + "\n")
    else:
        table(out, rows, columns, "no runs")
    return 0


def dlq(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    letters = orchestrator.engine.dead_letters
    if args.dlq_command == "list":
        rows = letters.list(
            status=None if args.status.upper() == "ALL" else args.status.upper(),
            workflow_type=args.workflow_type,
            since=parse_since(args.since),
            limit=args.limit,
        )
        for row in rows:
            last = (row["attempts"] or [{}])[-1].get("failure", {})
            row["last_error"] = f"{last.get('type')}: {last.get('message')}"
        if args.json:
            out.write(json.dumps(rows, indent=2) + "\n")
        else:
            columns = ["id", "workflow_id", "activity_type", "status", "created_at", "last_error"]
            table(out, rows, columns, "no dead letters")
        return 0
    if args.dlq_command == "show":
        letter = letters.get(args.id)
        if args.json:
            out.write(json.dumps(letter, indent=2) + "\n")
            return 0
        for key in (
            "id",
            "status",
            "workflow_id",
            "run_id",
            "workflow_type",
            "activity_type",
            "created_at",
            "resolved_at",
            "resolved_by",
            "resolution",
        ):
            out.write(f"{key:<14} {'-' if letter[key] is None else letter[key]}\n")
        out.write(f"{'input':<14} {json.dumps(letter['input'])}\n")
        for attempt in letter["attempts"]:
            failure = attempt.get("failure", {})
            out.write(
                f"  attempt {attempt.get('attempt')} at {attempt.get('at')}: "
                f"{failure.get('type')}: {failure.get('message')}\n"
            )
        return 0
    if args.dlq_command == "replay":
        ids = list(args.ids)
        if args.all:
            ids += [
                row["id"] for row in letters.list(workflow_type=args.workflow_type, limit=100_000)
            ]
        elif args.workflow_type:
            raise CliError("--workflow-type goes with --all")
        if not ids:
            raise CliError("name dead letters to replay, or use --all")
        return _resolve_each(
            args,
            out,
            ids,
            "replayed",
            lambda i: letters.replay(i, actor=args.actor, reason=args.reason or ""),
        )
    return _resolve_each(
        args,
        out,
        list(args.ids),
        "discarded",
        lambda i: letters.discard(i, actor=args.actor, reason=args.reason),
    )


def _resolve_each(
    args: argparse.Namespace,
    out: TextIO,
    ids: list[str],
    verb: str,
    act: Callable[[str], bool],
) -> int:
    """Act on each id in turn, with a progress line each (stderr under --json)."""
    results = []
    for number, dead_letter_id in enumerate(ids, start=1):
        done = act(dead_letter_id)
        results.append({"id": dead_letter_id, verb: done})
        state = verb if done else "already resolved, left alone"
        line = f"[{number}/{len(ids)}] {dead_letter_id}: {state}\n"
        (sys.stderr if args.json else out).write(line)
    if args.json:
        out.write(json.dumps(results, indent=2) + "\n")
    return 0


def audit_log(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    from orchestrator import audit

    with orchestrator.engine.sessions() as session:
        rows = audit.entries(session, workflow_id=args.workflow_id, limit=args.limit)
    if args.json:
        out.write(json.dumps(rows, indent=2) + "\n")
    else:
        table(out, rows, ["at", "actor", "action", "workflow_id", "reason"], "no entries")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace, Orchestrator, TextIO], int]] = {
    "pause": pause,
    "resume": resume,
    "ls": ls,
    "dlq": dlq,
    "audit": audit_log,
}
