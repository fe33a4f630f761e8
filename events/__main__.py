"""``python -m events``: the events commands on their own.

The same commands as ``orchestrator events ...`` and ``orchestrator
subscribers ...``, for processes that need no orchestrator application.
The database and broker come from ``ORCHESTRATOR_DATABASE_URL`` (default
``sqlite:///orchestrator.db``) and ``ORCHESTRATOR_BROKER_URL`` (no usable
default: events need RabbitMQ).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from events.cli import add_commands, run_command
from outbox.errors import OrchestratorError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Parse ``argv`` and run the command; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m events", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("ORCHESTRATOR_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run_command(
            args,
            settings_database_url=os.environ.get(
                "ORCHESTRATOR_DATABASE_URL", "sqlite:///orchestrator.db"
            ),
            broker_url=os.environ.get("ORCHESTRATOR_BROKER_URL", "embedded://"),
            out=out or sys.stdout,
            as_json=args.json,
        )
    except OrchestratorError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
