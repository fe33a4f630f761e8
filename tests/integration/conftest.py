"""Fixtures of the integration suite: a fresh database, clean queues, real processes.

The database named by ``ORCHESTRATOR_TEST_DATABASE_URL`` is dropped and
recreated once per session, so leftovers of an earlier run cannot make a test
pass or fail. An unreachable PostgreSQL or RabbitMQ fails the suite at once.
"""

from __future__ import annotations

import fcntl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import harness
import pytest
from sqlalchemy import Engine, create_engine

from examples.order_fulfillment import services
from examples.order_fulfillment.app import build
from orchestrator import Orchestrator, Settings, migrate

# Every process this session started, so a failing test can show their logs.
_STARTED: list[harness.Proc] = []
_TEST_START = pytest.StashKey[float]()
# Module-wide process groups now running: their workers are expected consumers.
_MODULE_GROUPS: list[harness.ProcessGroup] = []
# Two sessions on one machine would share the queues and drop each other's database.
_SESSION_LOCK = Path(tempfile.gettempdir()) / "orchestrator-integration-tests.lock"
_LOCK_WAIT_SECONDS = 90.0


# ---------------------------------------------------------------------------- services
def _check_broker() -> None:
    try:
        with harness.broker_connection() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ is unreachable at {harness.BROKER_URL} "
            f"(set ORCHESTRATOR_TEST_BROKER_URL): {exc!r}",
            pytrace=False,
        )


def ensure_no_foreign_consumers() -> None:
    """Fail if something outside this test consumes the project's queues.

    A stray worker (of an interrupted session, say) would take messages meant
    for the processes under test and make the results meaningless.
    """
    harness.wait_until(
        lambda: harness.consumers_of() == 0,
        15,
        "no consumers on the project's queues "
        f"(found {harness.queue_state()}; is another worker or test session running?)",
    )


def _exclusive_session() -> IO[bytes]:
    handle = _SESSION_LOCK.open("ab")
    deadline = time.monotonic() + _LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                pytest.fail(
                    f"another integration test session holds {_SESSION_LOCK} "
                    f"after {_LOCK_WAIT_SECONDS:g}s; it shares this database and broker",
                    pytrace=False,
                )
            time.sleep(0.5)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    lock = _exclusive_session()
    try:
        yield _prepare_services()
    finally:
        lock.close()


def _prepare_services() -> str:
    _check_broker()
    # A run killed while a test held the broker's memory alarm left it on.
    harness.restore_watermark()
    harness.recreate_database(harness.DATABASE_URL)
    migrate.upgrade(harness.DATABASE_URL)
    # The services' tables and their stock, created the way a worker creates them.
    with services.use_database(harness.DATABASE_URL):
        services.get_engine()
    services.reset_engine_cache(harness.DATABASE_URL)
    ensure_no_foreign_consumers()
    harness.purge_queues()
    return harness.DATABASE_URL


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[Engine]:
    """The test's own connection to the database, for looking at what the processes did."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def _orchestrator(database_url: str, **settings: object) -> Orchestrator:
    return build(Settings(database_url=database_url, broker_url=harness.BROKER_URL, **settings))


@pytest.fixture(scope="module")
def orchestrator(database_url: str) -> Iterator[Orchestrator]:
    """The application's side: starts and inspects runs, publishes right after commit."""
    built = _orchestrator(database_url)
    yield built
    built.close()


@pytest.fixture(scope="module")
def quiet_orchestrator(database_url: str) -> Iterator[Orchestrator]:
    """Like ``orchestrator`` but leaves its messages in the outbox (no publishing, no fast path).

    A run started through it waits, untouched, until the test publishes its
    messages itself.
    """
    built = _orchestrator(database_url, publish_after_commit=False, fast_path=False)
    yield built
    built.close()


# ---------------------------------------------------------------------------- processes
def _process_group(tmp_path_factory: pytest.TempPathFactory, name: str) -> harness.ProcessGroup:
    return harness.ProcessGroup(tmp_path_factory.mktemp(name), _STARTED)


@pytest.fixture
def procs(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[harness.ProcessGroup]:
    """Processes of one test; whatever is still running at its end is stopped."""
    if not _MODULE_GROUPS:
        ensure_no_foreign_consumers()
        harness.purge_queues()
    group = _process_group(tmp_path_factory, "procs")
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture(scope="module")
def module_procs(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[harness.ProcessGroup]:
    """Processes shared by the tests of one module, stopped after its last test."""
    ensure_no_foreign_consumers()
    harness.purge_queues()
    group = _process_group(tmp_path_factory, "module-procs")
    _MODULE_GROUPS.append(group)
    try:
        yield group
    finally:
        _MODULE_GROUPS.remove(group)
        group.stop_all()


@pytest.fixture
def private_queue() -> Iterator[harness.PrivateQueue]:
    queue = harness.PrivateQueue()
    yield queue
    queue.close()


@pytest.fixture
def detoured(database_url: str, private_queue: harness.PrivateQueue) -> Iterator[Orchestrator]:
    """An application-side orchestrator whose start messages land in ``private_queue``.

    Without the fast path, so that a start's message is its first workflow task
    (with it, the start would schedule the first activity on the shared queue).
    """
    built = _orchestrator(database_url, workflow_queue=private_queue.name, fast_path=False)
    yield built
    built.close()


# ----------------------------------------------------------------------- failure output
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_TEST_START] = time.monotonic()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield  # type: ignore[misc]
    if report.failed:
        began = item.stash.get(_TEST_START, 0.0)
        for proc in _STARTED:
            # Only the processes that were alive during this test explain its failure.
            if proc.ended_at is not None and proc.ended_at < began:
                continue
            report.sections.append(
                (
                    f"log of {proc.name} (pid {proc.popen.pid}, {Path(proc.log_path).name})",
                    proc.tail(150),
                ),
            )
    return report  # type: ignore[return-value]
