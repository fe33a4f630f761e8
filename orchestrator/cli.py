"""The ``orchestrator`` command: database, processes, and runs.

Output is readable by default and JSON with ``--json``. A user's mistake (a bad
flag, unknown workflow type, invalid input, a missing run) prints one line on
stderr and exits 2; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from events import cli as events_cli
from orchestrator.app import Orchestrator
from orchestrator.cli_operations import HANDLERS as OPERATIONS_HANDLERS
from orchestrator.cli_operations import add_operations_commands
from orchestrator.cli_output import CliError, emit, print_description, print_history
from orchestrator.client import WorkflowHandle
from orchestrator.errors import ConfigurationError, ResultTimeoutError, WorkflowFailedError
from orchestrator.logs import configure_logging
from orchestrator.policies import IdConflictPolicy, IdReusePolicy
from orchestrator.settings import Settings
from outbox.errors import OrchestratorError

EXIT_USAGE = 2


def load_app(ref: str | None, settings: Settings) -> Orchestrator:
    """The Orchestrator (or a factory of one) named by ``module:attribute``.

    With no reference, an Orchestrator with no workflows, for read-only commands.
    """
    if not ref:
        return Orchestrator(settings=settings)
    module_name, _, attribute = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import application module {module_name!r}: {exc}"
        ) from exc
    target = getattr(module, attribute or "orchestrator", None)
    if callable(target) and not isinstance(target, Orchestrator):
        # A factory (``module:build``): it reads the settings as they are now.
        target = target()
    if not isinstance(target, Orchestrator):
        raise ConfigurationError(f"{ref!r} is not an Orchestrator")
    return target


# ----------------------------------------------------------------------------- output
# ---------------------------------------------------------------------------- commands
def _db(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from orchestrator import migrate

    url = settings.database_url
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
        revision = migrate.current_revision(url)
        emit(out, args, {"revision": revision}, f"database at revision {revision}\n")
    else:
        revision = migrate.current_revision(url)
        head = migrate.head_revision()
        emit(
            out,
            args,
            {"revision": revision, "head": head, "up_to_date": revision == head},
            f"database at revision {revision or 'none'} (newest {head})\n",
        )
    return 0


def _worker(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    from orchestrator.celery_app import queue_names

    if orchestrator.settings.embedded:
        raise ConfigurationError("a worker needs a broker: set ORCHESTRATOR_BROKER_URL")
    queues = args.queues or ",".join(queue_names(orchestrator))
    argv = ["worker", "-Q", queues, "--loglevel", args.loglevel]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.pool:
        argv += ["--pool", args.pool]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    orchestrator.celery.worker_main(argv)
    return 0


def _serve_metrics(args: argparse.Namespace, orchestrator: Orchestrator) -> None:
    port = args.metrics_port
    if port is None:
        port = orchestrator.settings.metrics_port
    if port is None:
        return
    from orchestrator.metrics import start_metrics_server

    # A prefork worker's children write their durations to files its main process serves.
    start_metrics_server(
        orchestrator,
        port,
        addr=orchestrator.settings.metrics_address,
        multiprocess=args.command == "worker",
        system=orchestrator.settings.metrics_system,
        token=_metrics_token(orchestrator.settings),
    )


def _serve_subscriber_metrics(args: argparse.Namespace, settings: Settings) -> None:
    if settings.metrics_port is None:
        return
    from orchestrator.metrics import start_metrics_server

    start_metrics_server(
        load_app(args.app or settings.app, settings),
        settings.metrics_port,
        addr=settings.metrics_address,
        system=settings.metrics_system,
        events=True,
        token=_metrics_token(settings),
    )


def _metrics_token(settings: Settings) -> str | None:
    token = settings.metrics_token
    return token.get_secret_value() if token is not None else None


def _until_signalled(run: Callable[[threading.Event], None]) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(stop)
    return 0


def _start(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    try:
        value = json.loads(args.input) if args.input is not None else None
    except json.JSONDecodeError as exc:
        raise CliError(f"--input is not valid JSON: {exc}") from exc
    client = orchestrator.client()
    handle = client.start_workflow(
        args.type,
        value if args.input is not None else _no_input(),
        workflow_id=args.id,
        id_reuse_policy=IdReusePolicy(args.id_reuse_policy),
        id_conflict_policy=IdConflictPolicy(args.id_conflict_policy),
    )
    if args.wait is not None:
        return _wait(args, handle, out)
    emit(
        out,
        args,
        {"workflow_id": handle.workflow_id, "run_id": handle.run_id},
        f"started {handle.workflow_id} (run {handle.run_id})\n",
    )
    return 0


def _no_input() -> Any:
    from orchestrator.workflow import NO_ARG

    return NO_ARG


def _wait(args: argparse.Namespace, handle: WorkflowHandle, out: TextIO) -> int:
    # The outcome is printed below either way; a timeout leaves the run RUNNING.
    with contextlib.suppress(WorkflowFailedError, ResultTimeoutError):
        handle.result(timeout=args.wait)
    run = handle.describe()
    if args.json:
        out.write(json.dumps(run.to_json(), indent=2) + "\n")
    else:
        print_description(out, run)
    return 0 if run.status.value == "COMPLETED" else 1


def _show(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    run = handle.describe()
    if args.json:
        out.write(json.dumps(run.to_json(), indent=2) + "\n")
    else:
        print_description(out, run)
    return 0


def _history(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    history = handle.history()
    if args.json:
        document = {
            "workflow_id": handle.workflow_id,
            "run_id": handle.run_id,
            "events": [event.to_json() for event in history],
        }
        out.write(json.dumps(document, indent=2) + "\n")
    else:
        print_history(out, history)
    return 0


def _cancel(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    asked = handle.cancel(args.reason or "", actor=args.actor)
    text = "cancellation requested" if asked else "cancellation was already requested"
    emit(
        out,
        args,
        {"workflow_id": handle.workflow_id, "run_id": handle.run_id, "requested": asked},
        f"{text} for {handle.workflow_id} (run {handle.run_id})\n",
    )
    return 0


def _terminate(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    handle.terminate(args.reason or "", actor=args.actor)
    emit(
        out,
        args,
        {"workflow_id": handle.workflow_id, "run_id": handle.run_id, "terminated": True},
        f"terminated {handle.workflow_id} (run {handle.run_id})\n",
    )
    return 0


def _json_arg(text: str | None) -> Any:
    if text is None:
        return _no_input()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--arg is not valid JSON: {exc}") from exc


def _signal(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    handle.signal(args.name, _json_arg(args.arg), actor=args.actor)
    emit(
        out,
        args,
        {"workflow_id": handle.workflow_id, "signal": args.name},
        f"signal {args.name} sent to {handle.workflow_id}\n",
    )
    return 0


def _query(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    from activities.payload import to_payload

    handle = orchestrator.client().get_handle(args.workflow_id, args.run)
    answer = to_payload(handle.query(args.name, _json_arg(args.arg)))
    out.write(json.dumps(answer, indent=None if args.json else 2) + "\n")
    return 0


def _replay(args: argparse.Namespace, orchestrator: Orchestrator, out: TextIO) -> int:
    from pathlib import Path

    from orchestrator.replayer import Replayer

    replayer = Replayer(
        workflows=[defn.cls for defn in orchestrator.registry.workflows.values()],
        settings=orchestrator.settings,
    )
    results = []
    for name in args.files:
        results.extend(replayer.replay_file(Path(name)))
    if args.json:
        out.write(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    else:
        for result in results:
            verdict = "ok" if result.ok else f"NONDETERMINISM: {result.error}"
            out.write(
                f"{result.workflow_id} ({result.workflow_type}, {result.events} events): "
                f"{verdict}\n"
            )
    return 0 if all(r.ok for r in results) else 1


# ------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orchestrator", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--app",
        help="module:attribute of your Orchestrator (default: $ORCHESTRATOR_APP)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--actor", help="who is acting, for the audit trail (default: $ORCHESTRATOR_ACTOR or user)"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    db = commands.add_parser("db", help="manage the database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    upgrade = db_commands.add_parser("upgrade", help="migrate the schema to the newest revision")
    upgrade.add_argument("--revision", default="head")
    db_commands.add_parser("current", help="show the schema revision")

    worker = commands.add_parser("worker", help="run a Celery worker for workflows and activities")
    worker.add_argument("--queues", "-Q", help="comma-separated queues (default: all)")
    worker.add_argument("--concurrency", "-c", type=int)
    worker.add_argument("--pool", choices=["prefork", "solo", "threads"])
    worker.add_argument("--hostname", "-n")
    worker.add_argument("--loglevel", "-l", default="INFO")

    relay = commands.add_parser("relay", help="publish outbox messages a crash left behind")
    scheduler = commands.add_parser("scheduler", help="fire durable timers and activity deadlines")
    for process in (worker, relay, scheduler):
        process.add_argument(
            "--metrics-port",
            type=int,
            metavar="PORT",
            help="serve Prometheus metrics on PORT (default: $ORCHESTRATOR_METRICS_PORT)",
        )

    flower = commands.add_parser(
        "flower", help="run Flower, the task monitor, behind basic auth ($FLOWER_BASIC_AUTH)"
    )
    flower.add_argument("--port", type=int, default=5555)
    flower.add_argument("--address", help="address to listen on (default: all)")
    flower.add_argument(
        "--broker-api",
        help="RabbitMQ management API URL (default: derived from the broker URL)",
    )

    start = commands.add_parser("start", help="start a workflow")
    start.add_argument("type", help="workflow type name")
    start.add_argument("--input", help="input as JSON")
    start.add_argument("--id", help="workflow id (default: a random UUID)")
    start.add_argument(
        "--id-reuse-policy",
        choices=[p.value for p in IdReusePolicy],
        default=IdReusePolicy.ALLOW_DUPLICATE.value,
    )
    start.add_argument(
        "--id-conflict-policy",
        choices=[p.value for p in IdConflictPolicy],
        default=IdConflictPolicy.FAIL.value,
    )
    start.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait for the result this long"
    )

    for name, text in (
        ("show", "describe a run"),
        ("history", "print a run's event history (--json exports it for replay)"),
        ("cancel", "ask a run to cancel (it compensates)"),
        ("terminate", "stop a run at once, running none of its code"),
        ("pause", "stop a run dispatching anything new"),
        ("resume", "let a paused run go on"),
        ("signal", "send a signal to a run"),
        ("query", "ask a run's query handler"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("workflow_id")
        if name in ("signal", "query"):
            sub.add_argument("name", help=f"{name} name")
            sub.add_argument("--arg", help="argument as JSON")
        sub.add_argument("--run", help="run id (default: the open or latest run)")
        if name in ("cancel", "terminate", "pause", "resume"):
            sub.add_argument("--reason")

    add_operations_commands(commands)
    events_cli.add_commands(commands)

    replay = commands.add_parser(
        "replay", help="replay exported histories against the current code (before a deploy)"
    )
    replay.add_argument("files", nargs="+", metavar="FILE")

    demo = commands.add_parser(
        "demo", help="run the order saga twice (completed, compensated); no services needed"
    )
    demo.add_argument("--database-url", help="default: a temporary SQLite file")
    _accept_json_anywhere(parser)
    return parser


def _accept_json_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--json`` also come after the command (``orchestrator demo --json``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--json" in a.option_strings for a in sub._actions):
                    # SUPPRESS: when absent here, the global flag's value stands.
                    sub.add_argument(
                        "--json",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS,
                    )
                _accept_json_anywhere(sub)


# Commands a person runs in a terminal: only warnings and errors on stderr.
_QUIET_COMMANDS = {
    "start",
    "show",
    "history",
    "cancel",
    "terminate",
    "signal",
    "query",
    "replay",
    "demo",
    "db",
    "pause",
    "resume",
    "ls",
    "dlq",
    "audit",
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        return _fail(f"invalid ORCHESTRATOR_* setting: {exc.errors()[0]['loc']} {exc}")
    configure_logging(
        "WARNING" if args.command in _QUIET_COMMANDS else settings.log_level,
        as_json=settings.log_json,
    )
    try:
        if args.command == "demo":
            from examples.order_fulfillment.demo import run_demo

            demo_status: int = run_demo(out, database_url=args.database_url, as_json=args.json)
            return demo_status
        if args.command == "db":
            return _db(args, settings, out)
        if args.command in events_cli.COMMANDS:
            if args.command == "subscribers" and args.subscribers_command == "run":
                _serve_subscriber_metrics(args, settings)
            events_status: int = events_cli.run_command(
                args,
                settings_database_url=settings.database_url,
                broker_url=settings.broker_url,
                out=out,
                as_json=args.json,
            )
            return events_status
        orchestrator = load_app(args.app or settings.app, settings)
        if args.command in ("worker", "relay", "scheduler"):
            _serve_metrics(args, orchestrator)
        if args.command == "worker":
            return _worker(args, orchestrator, out)
        if args.command == "flower":
            from orchestrator.flower import run_flower

            return run_flower(
                orchestrator, port=args.port, address=args.address, broker_api=args.broker_api
            )
        if args.command == "relay":
            return _until_signalled(orchestrator.relay().run)
        if args.command == "scheduler":
            return _until_signalled(orchestrator.run_scheduler)
        handlers = {
            "start": _start,
            "show": _show,
            "history": _history,
            "cancel": _cancel,
            "terminate": _terminate,
            **OPERATIONS_HANDLERS,
            "signal": _signal,
            "query": _query,
            "replay": _replay,
        }
        try:
            return handlers[args.command](args, orchestrator, out)
        finally:
            orchestrator.close()
    except OrchestratorError as exc:
        return _fail(str(exc))
    except (TypeError, ValueError) as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        # The first line names the problem (no such table, connection refused...).
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return _fail(
            f"database {settings.database_url.split('@')[-1]}: {reason} "
            "(is it reachable, and migrated with 'orchestrator db upgrade'?)"
        )
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
