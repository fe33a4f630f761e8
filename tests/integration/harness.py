"""The parts the integration tests are built from: services, processes, probes.

Everything here talks to the real PostgreSQL and RabbitMQ and starts the real
``orchestrator`` command in subprocesses. Nothing is mocked: a test passes only
if the processes, the database and the broker do their job together.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import amqp.exceptions
import kombu
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.engine import make_url

from examples.order_fulfillment.models import Address, LineItem, Order, Simulation
from examples.order_fulfillment.schema import (
    inventory_reservations,
    inventory_stock,
    notifications,
    payments,
    shipments,
)
from orchestrator.history import ActivityScheduled, RecordedEvent
from orchestrator.schema import activity_tasks, outbox_messages, workflow_events, workflow_runs
from outbox.errors import PublishError
from outbox.message import OutboxMessage
from outbox.publisher import Publisher

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
APP = "examples.order_fulfillment.app:orchestrator"
DATABASE_URL = os.environ.get(
    "ORCHESTRATOR_TEST_DATABASE_URL",
    "postgresql+psycopg://postgres@127.0.0.1:5432/orchestrator_it",
)
BROKER_URL = os.environ.get("ORCHESTRATOR_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def database_url(name: str) -> str:
    """A database of its own on the test server, for a module that recreates it."""
    return make_url(DATABASE_URL).set(database=name).render_as_string(hide_password=False)


WORKFLOW_QUEUE = "workflows"
ACTIVITY_QUEUE = "activities"
DEAD_LETTER_QUEUE = "orchestrator.dead-letter"
PROJECT_QUEUES = (WORKFLOW_QUEUE, ACTIVITY_QUEUE, DEAD_LETTER_QUEUE)

# (event type, activity type, is compensation) of an undisturbed fulfilled order.
FULFILLED_TIMELINE: list[tuple[str, str | None, bool]] = [
    ("WorkflowStarted", None, False),
    ("ActivityScheduled", "reserve_inventory", False),
    ("ActivityCompleted", "reserve_inventory", False),
    ("EventEmitted", "order.inventory_reserved", False),
    ("ActivityScheduled", "charge_payment", False),
    ("ActivityCompleted", "charge_payment", False),
    ("EventEmitted", "order.payment_charged", False),
    ("ActivityScheduled", "create_shipment", False),
    ("ActivityCompleted", "create_shipment", False),
    ("EventEmitted", "order.shipment_created", False),
    ("ActivityScheduled", "send_confirmation", False),
    ("ActivityCompleted", "send_confirmation", False),
    ("EventEmitted", "order.completed", False),
    ("WorkflowCompleted", None, False),
]


# ----------------------------------------------------------------------------- database
def recreate_database(url: str) -> None:
    """Drop and create the database of ``url``; fail the test clearly if PostgreSQL is away."""
    parsed = make_url(url)
    name = parsed.database
    assert name, f"ORCHESTRATOR_TEST_DATABASE_URL names no database: {url}"
    try:
        admin = psycopg.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username or "postgres",
            password=parsed.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=5,
        )
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {parsed.render_as_string(hide_password=True)} "
            f"(set ORCHESTRATOR_TEST_DATABASE_URL): {exc}",
            pytrace=False,
        )
    with admin:
        # Connections left by an earlier, interrupted session would block the drop.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# ------------------------------------------------------------------------------ waiting
def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------ orders
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_order(order_id: str, *, country: str = "GB", **simulate: Any) -> Order:
    return Order(
        order_id=order_id,
        customer_email="it@example.com",
        items=[
            LineItem(sku="WIDGET", quantity=2, unit_price_cents=1250),
            LineItem(sku="GADGET", quantity=1, unit_price_cents=2499),
        ],
        card_number="4242424242424242",
        address=Address(name="Tess", street="1 Test Lane", city="Testville", country=country),
        simulate=Simulation(**simulate),
    )


# ---------------------------------------------------------------------------- processes
def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    Orphaned children of a killed worker may linger as zombies when nothing
    reaps them; they hold no sockets or locks, so they do not count.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class Proc:
    """One ``orchestrator`` command running as a real process group, logging to a file."""

    def __init__(
        self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        full_env.update(
            ORCHESTRATOR_DATABASE_URL=DATABASE_URL,
            ORCHESTRATOR_BROKER_URL=BROKER_URL,
            ORCHESTRATOR_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        full_env.update(env or {})
        self.env = full_env
        self._log: IO[bytes] = log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "--app", APP, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=ROOT,
            # Its own group, so that a kill takes a prefork worker's children too.
            start_new_session=True,
        )
        self.pgid = self.popen.pid
        self.started_at = time.monotonic()
        self.ended_at: float | None = None

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.popen.pid})"

    # -- observing ---------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count_in_log(self, needle: str) -> int:
        return self.log_text().count(needle)

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode} before logging "
                    f"{pattern!r}:\n{self.tail()}"
                )
            return regex.search(self.log_text())

        return wait_until(found, timeout, f"{self.name} to log {pattern!r}", interval=0.1)

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    # -- ending ------------------------------------------------------------------
    def kill9(self) -> None:
        """SIGKILL the whole process group: no cleanup, no acks, no goodbyes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.wait_dead()

    def ask_to_stop(self) -> None:
        """SIGTERM to the main process only: a worker then finishes its task and exits."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def terminate(self, grace: float = 15.0) -> None:
        """Ask the process to stop, then kill whatever of its group is left after ``grace``."""
        self.ask_to_stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.wait_dead()

    def wait_dead(self, timeout: float = 15.0) -> int:
        """Wait until the main process and every process of its group are gone."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{self.name} is still running after {timeout:g}s") from exc
        wait_until(
            lambda: not _group_members(self.pgid),
            timeout,
            f"the processes of {self.name}'s group to end",
        )
        if self.ended_at is None:
            self.ended_at = time.monotonic()
            self._log.close()
        return code


class ProcessGroup:
    """Starts project processes and guarantees they are all gone at the end."""

    def __init__(self, log_dir: Path, registry: list[Proc]) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._registry = registry

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        path = self.log_dir / f"{len(self._registry):03d}-{name}.log"
        proc = Proc(name, args, path, env)
        self.procs.append(proc)
        self._registry.append(proc)
        return proc

    def worker(
        self,
        name: str,
        *,
        queues: str = f"{WORKFLOW_QUEUE},{ACTIVITY_QUEUE}",
        pool: str = "prefork",
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        ready: bool = True,
    ) -> Proc:
        proc = self.start(
            name,
            "worker",
            "--queues",
            queues,
            "--pool",
            pool,
            "-c",
            str(concurrency),
            # Unique node names keep the workers apart on the broker's control channel.
            "--hostname",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
            env=env,
        )
        if ready:
            proc.wait_for_log(r" ready\.", timeout=60)
        return proc

    def relay(self, name: str = "relay", *, env: dict[str, str] | None = None) -> Proc:
        settings = {"ORCHESTRATOR_RELAY_POLL_SECONDS": "0.5"}
        settings.update(env or {})
        return self.start(name, "relay", env=settings)

    def scheduler(self, name: str = "scheduler", *, env: dict[str, str] | None = None) -> Proc:
        settings = {"ORCHESTRATOR_SCHEDULER_POLL_SECONDS": "0.2"}
        settings.update(env or {})
        return self.start(name, "scheduler", env=settings)

    def stop_all(self) -> None:
        # All asked at once, so that their shutdowns overlap.
        for proc in self.procs:
            proc.ask_to_stop()
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.terminate()
            except AssertionError as exc:
                errors.append(str(exc))
        if errors:
            raise AssertionError("; ".join(errors))


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one short ``orchestrator`` command to its end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(ORCHESTRATOR_DATABASE_URL=DATABASE_URL, ORCHESTRATOR_BROKER_URL=BROKER_URL)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--app", APP, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


# ------------------------------------------------------------------------------ broker
def broker_connection(confirm: bool = False) -> kombu.Connection:
    """A connection to the test broker; with ``confirm``, a publish waits for its confirm.

    A test that publishes and then counts a quorum queue confirms: an
    unconfirmed publish on a channel closed right after may not have reached
    the queue yet, or at all.
    """
    options = {"confirm_publish": True} if confirm else {}
    return kombu.Connection(BROKER_URL, connect_timeout=5, transport_options=options)


def queue_state(names: Iterable[str] = PROJECT_QUEUES) -> dict[str, tuple[int, int] | None]:
    """(ready messages, consumers) of each queue, None for a queue that does not exist."""
    state: dict[str, tuple[int, int] | None] = {}
    with broker_connection() as conn:
        for name in names:
            channel = conn.channel()
            try:
                _, messages, consumers = channel.queue_declare(name, passive=True)
                state[name] = (messages, consumers)
            except amqp.exceptions.NotFound:
                # The broker closes a channel whose passive declare fails.
                state[name] = None
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    return state


def consumers_of(names: Iterable[str] = PROJECT_QUEUES) -> int:
    return sum(found[1] for found in queue_state(names).values() if found)


def purge_queues(names: Iterable[str] = PROJECT_QUEUES) -> None:
    with broker_connection() as conn:
        for name in names:
            channel = conn.channel()
            try:
                channel.queue_purge(name)
            except amqp.exceptions.NotFound:
                pass
            finally:
                with contextlib.suppress(Exception):
                    channel.close()


class SpiedTask:
    """A task message as it sits on the broker."""

    def __init__(self, task: str, task_id: str, kwargs: dict[str, Any], headers: dict[str, Any]):
        self.task = task
        self.task_id = task_id
        self.kwargs = kwargs
        self.headers = headers

    def __repr__(self) -> str:
        return f"SpiedTask({self.task}, {self.task_id}, {self.kwargs})"


class PrivateQueue:
    """A workflow queue that no worker reads, so that what is published to it stays there.

    An orchestrator whose ``workflow_queue`` is this queue publishes its start
    messages here; the test reads exactly what was sent, then forwards it to
    the real queue for the workers.
    """

    def __init__(self) -> None:
        self.name = f"it-private-{uuid.uuid4().hex[:10]}"
        self._conn = broker_connection()
        # Declared as the project declares its queues, or the publisher's own
        # declaration of it would be refused as a mismatch.
        self._queue = kombu.Queue(
            self.name,
            kombu.Exchange(self.name, type="direct", durable=True),
            routing_key=self.name,
            durable=True,
            queue_arguments={"x-dead-letter-exchange": DEAD_LETTER_QUEUE},
        )
        self._bound = self._queue(self._conn.channel())
        self._bound.declare()

    def drain(self) -> list[SpiedTask]:
        """Take every message waiting in the queue."""
        taken = []
        while (message := self._bound.get(no_ack=True)) is not None:
            _args, kwargs, _embed = json.loads(message.body)
            headers = dict(message.headers)
            taken.append(SpiedTask(headers["task"], headers["id"], kwargs, headers))
        return taken

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._bound.delete()
            self._queue.exchange(self._conn.channel()).delete()
        self._conn.release()


def forward(publisher: Publisher, tasks: Iterable[SpiedTask], queue: str = WORKFLOW_QUEUE) -> None:
    """Send taken messages on to a project queue, unchanged but for the queue."""
    for task in tasks:
        publisher.publish(
            [
                OutboxMessage(
                    id=task.task_id,
                    kind="task",
                    destination=task.task,
                    queue=queue,
                    body=task.kwargs,
                    headers={"workflow_id": task.headers.get("workflow_id", "")},
                )
            ]
        )


# ---------------------------------------------------------------------------- database
def count(db: Engine, table: Any, *where: Any) -> int:
    with db.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def rows(db: Engine, table: Any, *where: Any) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(select(table).where(*where)).mappings().all())


def run_ids_of(db: Engine, workflow_id: str) -> list[str]:
    with db.connect() as conn:
        return list(
            conn.scalars(
                select(workflow_runs.c.run_id).where(workflow_runs.c.workflow_id == workflow_id)
            )
        )


def run_row(db: Engine, run_id: str) -> Any:
    found = rows(db, workflow_runs, workflow_runs.c.run_id == run_id)
    assert found, f"no run {run_id}"
    return found[0]


def stock(db: Engine) -> dict[str, int]:
    with db.connect() as conn:
        found = conn.execute(select(inventory_stock.c.sku, inventory_stock.c.available))
        return dict(found.all())


def order_rows(db: Engine, order_id: str) -> dict[str, list[Any]]:
    """The services' rows of one order, table by table."""
    return {
        table.name: rows(db, table, table.c.order_id == order_id)
        for table in (inventory_reservations, payments, shipments, notifications)
    }


def unpublished(db: Engine, workflow_id: str) -> list[OutboxMessage]:
    """The run's task messages that nothing has published yet, oldest first.

    Domain events (lifecycle, ``workflow.emit``) are left out: only a relay
    publishes them, and these tests are about the tasks that drive the run.
    """
    table = outbox_messages
    with db.connect() as conn:
        found = (
            conn.execute(
                select(table)
                .where(
                    table.c.aggregate_id == workflow_id,
                    table.c.published_at.is_(None),
                    table.c.kind == "task",
                )
                .order_by(table.c.seq)
            )
            .mappings()
            .all()
        )
    return [
        OutboxMessage(
            id=row["id"],
            kind=row["kind"],
            destination=row["destination"],
            queue=row["queue"],
            aggregate_id=row["aggregate_id"],
            body=row["body"],
            headers=row["headers"],
        )
        for row in found
    ]


def publish_pending(
    db: Engine, publisher: Publisher, workflow_id: str, *, times: int = 1
) -> list[OutboxMessage]:
    """Act as the relay for one run: publish its waiting messages ``times`` times each."""
    messages = unpublished(db, workflow_id)
    if not messages:
        return []
    for message in messages:
        for _ in range(times):
            publisher.publish([message])
    with db.begin() as conn:
        conn.execute(
            update(outbox_messages)
            .where(outbox_messages.c.id.in_([m.id for m in messages]))
            .values(published_at=func.now(), publish_attempts=times)
        )
    return messages


def forget_run(db: Engine, workflow_id: str) -> None:
    """Remove a run that was left open on purpose, and its unsent messages."""
    with db.begin() as conn:
        conn.execute(delete(outbox_messages).where(outbox_messages.c.aggregate_id == workflow_id))
        conn.execute(delete(workflow_runs).where(workflow_runs.c.workflow_id == workflow_id))


def activity_rows(db: Engine, run_id: str) -> dict[str, Any]:
    """The run's activity task rows by activity type."""
    return {
        row["activity_type"]: row
        for row in rows(db, activity_tasks, activity_tasks.c.run_id == run_id)
    }


def history_length(db: Engine, run_id: str) -> int:
    return count(db, workflow_events, workflow_events.c.run_id == run_id)


# ----------------------------------------------------------------------------- history
def timeline(history: Sequence[RecordedEvent]) -> list[tuple[str, str | None, bool]]:
    """The shape of a history: each event's type, activity (or event type), compensation flag."""
    compensations: set[str] = set()
    shape = []
    for recorded in history:
        event = recorded.event
        activity_id = getattr(event, "activity_id", None)
        if isinstance(event, ActivityScheduled) and event.is_compensation:
            compensations.add(event.activity_id)
        shape.append(
            (
                event.TYPE,
                getattr(event, "activity_type", None) or getattr(event, "event_type", None),
                activity_id in compensations,
            )
        )
    return shape


def assert_history_sound(history: Sequence[RecordedEvent]) -> None:
    """No gaps, no duplicated commands or results, and exactly one closing event, last."""
    seqs = [recorded.seq for recorded in history]
    assert seqs == list(range(1, len(history) + 1)), f"history seqs are not contiguous: {seqs}"
    scheduled = [
        recorded.event.activity_id
        for recorded in history
        if isinstance(recorded.event, ActivityScheduled)
    ]
    assert len(scheduled) == len(set(scheduled)), f"an activity was scheduled twice: {scheduled}"
    results = [
        recorded.event.activity_id  # type: ignore[attr-defined]
        for recorded in history
        if recorded.event.TYPE in ("ActivityCompleted", "ActivityFailed")
    ]
    assert len(results) == len(set(results)), f"an activity result was recorded twice: {results}"
    assert set(results) <= set(scheduled), "a result names an activity never scheduled"
    closing = [
        recorded.event.TYPE
        for recorded in history
        if recorded.event.TYPE.startswith("Workflow") and recorded.event.TYPE != "WorkflowStarted"
    ]
    assert len(closing) == 1, f"expected one closing event, found {closing}"
    assert closing[0] == history[-1].event.TYPE, "the closing event is not the last one"


# ------------------------------------------------------------ broker alarms
def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def _memory_alarm_on() -> bool:
    # Exit status 0 whether or not there are alarms; the text says which.
    report = subprocess.run(
        ["rabbitmq-diagnostics", "-q", "alarms"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "memory alarm" in report.stdout.lower()


# Where a test that raises the alarm keeps the watermark to put back: a run
# killed while the alarm was on leaves it here, and the next session restores it.
_SAVED_WATERMARK = Path(tempfile.gettempdir()) / "orchestrator-it-memory-watermark"


@contextlib.contextmanager
def publishers_blocked() -> Iterator[None]:
    """A memory alarm: the broker blocks every connection that publishes, until it clears.

    The alarm is the whole node's: every publisher on this broker waits while
    it lasts (the integration tests own their broker, see conftest).
    """
    watermark = _rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    assert re.fullmatch(r"[0-9.]+", watermark), f"unexpected watermark {watermark!r}"
    _SAVED_WATERMARK.write_text(watermark)
    try:
        _rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")
        wait_until(_memory_alarm_on, 30, "the broker's memory alarm")
        yield
    finally:
        restore_watermark()


def restore_watermark() -> None:
    """Put back the memory watermark a blocking test saved, if it is still saved."""
    if not _SAVED_WATERMARK.exists():
        return
    watermark = _SAVED_WATERMARK.read_text().strip()
    for attempt in range(5):
        try:
            _rabbitmqctl("set_vm_memory_high_watermark", watermark)
            break
        except subprocess.SubprocessError:
            if attempt == 4:
                raise
            time.sleep(1)
    wait_until(lambda: not _memory_alarm_on(), 30, "the memory alarm to clear")
    _SAVED_WATERMARK.unlink()


def blocked_publish_seconds(publish: Callable[[], object]) -> float:
    """How long ``publish`` takes to fail under a memory alarm (it must fail)."""
    with publishers_blocked():
        began = time.monotonic()
        with pytest.raises(PublishError):
            publish()
        return time.monotonic() - began
