"""Flower, the Celery task monitor, on the orchestrator's Celery app, behind basic auth.

Flower follows the workers' task events: each activity is a task named after
the activity (``reserve_inventory``...), each workflow step an
``orchestrator.workflow_task``, and the ``kwargs`` column carries the workflow
id. It keeps what it sees in memory, from the moment it starts; the durable
record of every run is in the orchestrator's tables (``orchestrator show``,
``orchestrator history``).

Flower refuses nobody by default, so :func:`run_flower` refuses to start
without credentials (``FLOWER_BASIC_AUTH=user:password``, the variable Flower
itself reads), and points Flower's broker page at RabbitMQ's management API so
that it shows queue lengths. It runs read-only: sending, revoking or aborting a
task from Flower would go around the engine, whose ``cancel`` and ``terminate``
commands are the way to act on a run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from orchestrator.errors import ConfigurationError

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator

__all__ = [
    "BASIC_AUTH_ENV",
    "DEFAULT_PORT",
    "TASK_COLUMNS",
    "broker_api_url",
    "flower_argv",
    "parse_basic_auth",
    "run_flower",
    "task_kwargsrepr",
]

BASIC_AUTH_ENV = "FLOWER_BASIC_AUTH"
DEFAULT_PORT = 5555
# Columns of Flower's task list: kwargs shows the workflow id (see task_kwargsrepr).
TASK_COLUMNS = "name,state,kwargs,received,runtime,worker,uuid"

# RabbitMQ's management API, by AMQP scheme: (HTTP scheme, default port).
_MANAGEMENT_API = {
    "amqp": ("http", 15672),
    "pyamqp": ("http", 15672),
    "amqps": ("https", 15671),
}
_KWARGS_REPR_MAX = 1024
_FLAT = (str, int, float, bool, type(None))


def parse_basic_auth(value: str | None) -> list[str]:
    """The ``user:password`` pairs of ``value`` (comma-separated); an error if there are none.

    Raises:
        ConfigurationError: no credentials, or a pair without a user or a password.
    """
    if not value or not value.strip():
        raise ConfigurationError(
            f"Flower needs basic auth: set {BASIC_AUTH_ENV}=user:password "
            "(several pairs separated by commas)"
        )
    pairs = [pair.strip() for pair in value.split(",") if pair.strip()]
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise ConfigurationError(
                f"{BASIC_AUTH_ENV} must be user:password (several separated by commas); "
                f"one entry has no {'user' if sep and not user else 'password'}"
            )
    if not pairs:
        raise ConfigurationError(f"Flower needs basic auth: set {BASIC_AUTH_ENV}=user:password")
    return pairs


def broker_api_url(broker_url: str) -> str:
    """RabbitMQ's management API for ``broker_url``: ``http://user:pass@host:15672/api/``.

    The credentials are the broker's own (the management plugin accepts them if
    the user has a management tag); the virtual host is taken by Flower from
    the broker URL.

    Raises:
        ConfigurationError: the broker is not RabbitMQ over AMQP.
    """
    first = broker_url.split(";", maxsplit=1)[0].strip()
    parts = urlsplit(first)
    scheme = parts.scheme.split("+")[0]
    if scheme not in _MANAGEMENT_API:
        raise ConfigurationError(
            f"cannot derive RabbitMQ's management API from a {parts.scheme or 'schemeless'} "
            "broker URL: pass --broker-api http://user:password@host:15672/api/"
        )
    http, port = _MANAGEMENT_API[scheme]
    userinfo, _, _ = parts.netloc.rpartition("@")
    if not userinfo:
        userinfo = "guest:guest"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{http}://{userinfo}@{host}:{port}/api/"


def flower_argv(
    orchestrator: Orchestrator,
    *,
    port: int = DEFAULT_PORT,
    basic_auth: str | None,
    broker_api: str | None = None,
    address: str | None = None,
    read_only: bool = True,
) -> list[str]:
    """The ``celery flower`` arguments that run Flower on ``orchestrator``'s Celery app.

    ``broker_api`` defaults to :func:`broker_api_url` of the orchestrator's broker.
    ``read_only`` turns off Flower's task and worker controls.

    Raises:
        ConfigurationError: embedded broker, no or malformed credentials, or a
            broker whose management API cannot be derived.
    """
    settings = orchestrator.settings
    if settings.embedded:
        raise ConfigurationError("Flower needs a broker: set ORCHESTRATOR_BROKER_URL")
    credentials = ",".join(parse_basic_auth(basic_auth))
    argv = [
        "flower",
        f"--port={port}",
        f"--basic-auth={credentials}",
        f"--broker-api={broker_api or broker_api_url(settings.broker_url)}",
        f"--tasks-columns={TASK_COLUMNS}",
    ]
    if address is not None:
        argv.append(f"--address={address}")
    if read_only:
        argv.append("--read-only")
    return argv


def run_flower(
    orchestrator: Orchestrator,
    *,
    port: int = DEFAULT_PORT,
    basic_auth: str | None = None,
    broker_api: str | None = None,
    address: str | None = None,
) -> int:
    """Run Flower on ``orchestrator``'s Celery app until it is stopped; its exit status.

    ``basic_auth`` defaults to ``$FLOWER_BASIC_AUTH``. The arguments stay inside
    this process (the credentials do not show in the process list).

    Raises:
        ConfigurationError: see :func:`flower_argv`.
    """
    credentials = basic_auth if basic_auth is not None else os.environ.get(BASIC_AUTH_ENV)
    argv = flower_argv(
        orchestrator,
        port=port,
        basic_auth=credentials,
        broker_api=broker_api,
        address=address,
    )
    status = orchestrator.celery.start(argv)
    return int(status or 0)


def task_kwargsrepr(body: Mapping[str, Any], headers: Mapping[str, Any]) -> str | None:
    """How a task message's kwargs are shown in task events (and so in Flower).

    The message body carries ids only; this adds the run's workflow id from the
    message's ``workflow_id`` header, without changing what the task receives.
    None (Celery's own rendering) for messages without one.
    """
    workflow_id = headers.get("workflow_id")
    if not workflow_id:
        return None
    shown = {"workflow_id": workflow_id, **body}
    if all(type(value) in _FLAT for value in shown.values()):
        # Ids and numbers (every message the hot path sends): plain repr reads
        # the same as Celery's saferepr there, at a fraction of its cost.
        text = repr(shown)
        if len(text) <= _KWARGS_REPR_MAX:
            return text
    from celery.utils.saferepr import saferepr

    rendered: str = saferepr(shown, _KWARGS_REPR_MAX)
    return rendered
