"""Pooled connections that the database dropped: checked when idle, retried when busy."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import harness
import pytest
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

import activities as activity
from orchestrator import (
    IdConflictPolicy,
    Orchestrator,
    Settings,
    WorkflowAlreadyStartedError,
    workflow,
)
from orchestrator import db as orchestrator_db
from orchestrator import pipeline as orchestrator_pipeline
from orchestrator import sessions as orchestrator_sessions
from orchestrator.activity_runner import ActivityRunner
from orchestrator.db import create_db_engine, once_more_on_disconnect, session_factory
from orchestrator.instance import WorkflowInstance
from orchestrator.pipeline import commit, pipelined, queue_checks, read_together
from orchestrator.writes import write

pytestmark = pytest.mark.timeout(60)

APP_NAME = "it-dropped-connections"


@pytest.fixture
def pooled(database_url: str) -> Any:
    engine = create_db_engine(database_url, connect_args={"application_name": APP_NAME})
    yield engine
    engine.dispose()


def drop_connections(admin: Engine) -> int:
    """What a database restart looks like from the pool's side."""
    with admin.begin() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": APP_NAME},
            ).scalar_one()
        )


def backend_pid(engine: Engine) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_recently_used_connection_is_not_checked_and_a_lost_one_is_retried(
    pooled: Engine, db: Engine
) -> None:
    calls: list[int] = []

    @once_more_on_disconnect
    def transaction() -> int:
        calls.append(1)
        return backend_pid(pooled)

    first = backend_pid(pooled)
    assert drop_connections(db) == 1
    # Checked in a moment ago: used without a check, fails, and runs again on a
    # fresh connection.
    assert transaction() != first
    assert len(calls) == 2


def test_an_idle_connection_is_checked_before_use(
    pooled: Engine, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orchestrator_db, "PING_AFTER_IDLE_SECONDS", 0.2)
    first = backend_pid(pooled)
    assert drop_connections(db) == 1
    time.sleep(0.3)
    # The check finds it dead; the pool hands out a new one and nothing fails.
    assert backend_pid(pooled) != first


def test_other_database_errors_are_not_retried(pooled: Engine) -> None:
    calls: list[int] = []

    @once_more_on_disconnect
    def transaction() -> None:
        calls.append(1)
        with pooled.begin() as conn:
            conn.execute(text("SELECT 1/0"))

    with pytest.raises(Exception, match="division by zero"):
        transaction()
    assert len(calls) == 1


def test_without_the_retry_the_lost_connection_fails_the_transaction(
    pooled: Engine, db: Engine
) -> None:
    """The check above is what makes the first test pass, not luck."""
    backend_pid(pooled)
    drop_connections(db)
    with pytest.raises(Exception, match=r"terminat|closed|connection"):
        backend_pid(pooled)


# ----------------------------------------------------------------- pipelined writes
@pytest.fixture
def scratch(pooled: Engine) -> Any:
    """A table of the test's own, on the pooled engine."""
    with pooled.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS it_pipelined"))
        conn.execute(text("CREATE TABLE it_pipelined (id int PRIMARY KEY, note text)"))
    yield
    with pooled.begin() as conn:
        conn.execute(text("DROP TABLE it_pipelined"))


def notes(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text("SELECT * FROM it_pipelined ORDER BY id"))]


def in_pipeline_mode(session: Session) -> bool:
    driver = session.connection().connection.driver_connection
    return bool(driver.pgconn.pipeline_status)


INSERT = text("INSERT INTO it_pipelined VALUES (:id, :note)")


def test_pipelined_writes_commit_together_and_reads_see_them(pooled: Engine, scratch: Any) -> None:
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        session.execute(INSERT, {"id": 1, "note": "a"})
        assert in_pipeline_mode(session)
        session.execute(INSERT, {"id": 2, "note": "b"})
        # A read waits for the writes queued before it, and sees them.
        count = session.execute(text("SELECT count(*) FROM it_pipelined")).scalar_one()
        assert count == 2
        session.execute(text("UPDATE it_pipelined SET note = 'c' WHERE id = 2"))
        kept_with_connection = session.connection().info
        commit(session)
        # Back in the pool already: the next user of the connection, maybe in
        # another thread, must not find this transaction's pipeline on it.
        assert not any(key.startswith("orchestrator.") for key in kept_with_connection)
    assert notes(pooled) == [(1, "a"), (2, "c")]
    # The pooled connection went back out of pipeline mode.
    with sessions() as session:
        assert not in_pipeline_mode(session)
        assert session.execute(text("SELECT count(*) FROM it_pipelined")).scalar_one() == 2


def test_a_failing_pipelined_write_fails_the_commit_and_writes_nothing(
    pooled: Engine, scratch: Any
) -> None:
    sessions = session_factory(pooled)
    with pytest.raises(IntegrityError), sessions() as session, pipelined(session):
        session.execute(INSERT, {"id": 1, "note": "a"})
        session.execute(INSERT, {"id": 1, "note": "twice"})  # queued: fails at the commit
        commit(session)
    assert notes(pooled) == []
    with sessions() as session:
        assert not in_pipeline_mode(session)
        session.execute(INSERT, {"id": 3, "note": "after"})
        session.commit()
    assert notes(pooled) == [(3, "after")]


@pytest.mark.parametrize(
    ("held_back", "lean"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["sent-at-once", "in-one-write", "lean-sent-at-once", "lean-in-one-write"],
)
def test_a_connection_lost_in_a_pipeline_is_retried_like_any_other(
    pooled: Engine, db: Engine, scratch: Any, held_back: bool, lean: bool
) -> None:
    sessions = session_factory(pooled)
    attempts: list[int] = []

    @once_more_on_disconnect
    def transaction() -> None:
        attempts.append(1)
        with sessions() as session, pipelined(session, lean=lean):
            assert (orchestrator_sessions.LEAN in session.info) is lean
            row = {"id": 10 + len(attempts), "note": "x"}
            if held_back:  # the whole transaction goes in one write, at the commit
                write(session, INSERT, row)
            else:
                session.execute(INSERT, row)
            if len(attempts) == 1:
                drop_connections(db)  # the database restarts before the commit
            commit(session)

    transaction()
    assert len(attempts) == 2
    assert notes(pooled) == [(12, "x")]
    fit_for_the_next_user(pooled)


@pytest.mark.parametrize("held_back", [False, True], ids=["sent-at-once", "in-one-write"])
def test_a_failed_commit_says_whether_its_commit_may_have_reached_the_database(
    pooled: Engine, db: Engine, scratch: Any, held_back: bool
) -> None:
    sessions = session_factory(pooled)

    def attempt(rows: list[dict[str, Any]], before_commit: Any = None) -> bool:
        with sessions() as session:
            try:
                with pipelined(session):
                    for row in rows:
                        if held_back:
                            write(session, INSERT, row)
                        else:
                            session.execute(INSERT, row)
                    if before_commit is not None:
                        before_commit()
                    commit(session)
            except Exception:
                return orchestrator_pipeline.commit_handed_over(session)
        raise AssertionError("the commit did not fail")

    # A value the driver cannot send: nothing went to the server.
    assert attempt([{"id": 1, "note": object()}]) is False
    # The server refused. Held back, the refusal comes at the commit, once the
    # COMMIT went (the caller tells a refusal from doubt); sent at once, it may
    # come before, when nothing could have committed.
    refused = attempt([{"id": 2, "note": "a"}, {"id": 2, "note": "b"}])
    assert refused is True or not held_back
    # The connection lost under the commit: in doubt.
    assert attempt([{"id": 3, "note": "c"}], before_commit=lambda: drop_connections(db)) is True
    assert notes(pooled) == []


# -------------------------------------------------------- reads in one round trip
SELECT_NOTE = text("SELECT id, note FROM it_pipelined WHERE id = :id FOR UPDATE")
RENAME_NOTE = text("UPDATE it_pipelined SET note = :note WHERE id = :id RETURNING id, note")
FAILING_READ = text("SELECT 1 / (id - :id) AS boom FROM it_pipelined")


def count_syncs(session: Session, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    entry = orchestrator_pipeline.current_pipeline(session)
    assert entry is not None
    pipeline = entry.pipeline
    syncs: list[int] = []
    original = pipeline.sync

    def sync() -> None:
        syncs.append(1)
        original()

    monkeypatch.setattr(pipeline, "sync", sync)
    return syncs


def test_reads_together_share_one_sync_and_see_the_writes_before_them(
    pooled: Engine, scratch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        session.execute(INSERT, {"id": 1, "note": "a"})
        syncs = count_syncs(session, monkeypatch)
        rows = read_together(
            session,
            [
                (SELECT_NOTE, {"id": 1}),
                (RENAME_NOTE, {"id": 1, "note": "b"}),
                (SELECT_NOTE, {"id": 2}),
            ],
        )
        assert syncs == [1]
        # In order: the second statement ran after the first, the third found nothing.
        assert rows == [[{"id": 1, "note": "a"}], [{"id": 1, "note": "b"}], []]
        commit(session)
    assert notes(pooled) == [(1, "b")]


def test_reads_together_outside_a_pipeline_run_nothing(pooled: Engine, scratch: Any) -> None:
    sessions = session_factory(pooled)
    with sessions() as session:
        session.execute(INSERT, {"id": 1, "note": "a"})
        assert read_together(session, [(RENAME_NOTE, {"id": 1, "note": "b"})]) is None
        session.commit()
    assert notes(pooled) == [(1, "a")]


def test_a_failing_read_together_raises_the_database_error_and_writes_nothing(
    pooled: Engine, scratch: Any
) -> None:
    sessions = session_factory(pooled)
    with (
        pytest.raises(DBAPIError, match="division by zero"),
        sessions() as session,
        pipelined(session),
    ):
        session.execute(INSERT, {"id": 1, "note": "a"})
        read_together(session, [(RENAME_NOTE, {"id": 1, "note": "b"}), (FAILING_READ, {"id": 1})])
        commit(session)
    assert notes(pooled) == []
    with sessions() as session:
        assert not in_pipeline_mode(session)


@dataclass(frozen=True)
class OneWrite:
    """One transaction sent by ``one_write``: its thread, statements and reads."""

    thread: int
    statements: list[tuple[str, bool]]  # (sql, several rows)
    reads: list[str]


class OneWrites(list[OneWrite]):
    """The transactions sent so far; ``observers`` hear of each as it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.observers: list[Callable[[OneWrite], None]] = []


@pytest.fixture
def one_writes(monkeypatch: pytest.MonkeyPatch) -> OneWrites:
    """Every transaction ``one_write`` sends, in order, as it is sent."""
    from orchestrator import one_write

    sent = OneWrites()
    commit_unread = one_write.commit_unread

    def spy(driver: Any, statements: Any, reads: Any = (), **kwargs: Any) -> Any:
        batch = OneWrite(
            threading.get_ident(),
            [(sql, many) for sql, _params, many in statements],
            [sql for sql, _params in reads],
        )
        sent.append(batch)
        for observe in sent.observers:
            observe(batch)
        return commit_unread(driver, statements, reads, **kwargs)

    monkeypatch.setattr(one_write, "commit_unread", spy)
    return sent


def test_reads_that_end_a_transaction_nothing_of_which_was_sent_go_in_its_one_write(
    pooled: Engine, docs: Any, one_writes: OneWrites
) -> None:
    now = datetime.now(UTC)
    read_doc = text("SELECT id, doc, at FROM it_written WHERE id = :id FOR UPDATE")
    rename = text("UPDATE it_written SET doc = :doc WHERE id = :id RETURNING id, doc")
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 1, "doc": {"v": 1}, "at": now})
        rows = read_together(
            session,
            [(read_doc, {"id": 1}), (rename, {"id": 1, "doc": '{"v": 2}'}), (read_doc, {"id": 2})],
            then_commit=True,
        )
    # The write, the reads and the COMMIT in one write; each read's rows, as psycopg reads them.
    assert [
        ([sql.split()[0] for sql, _ in sent.statements], len(sent.reads)) for sent in one_writes
    ] == [(["BEGIN", "INSERT"], 3)]
    assert rows == [[{"id": 1, "doc": {"v": 1}, "at": now}], [{"id": 1, "doc": {"v": 2}}], []]
    assert stored_docs(pooled) == [(1, '{"v": 2}', now)]
    # A read that fails fails the transaction: nothing of it stays.
    with (
        pytest.raises(DBAPIError, match="division by zero"),
        sessions() as session,
        pipelined(session),
    ):
        write(session, INSERT_DOC, {"id": 2, "doc": {}})
        read_together(session, [(text("SELECT 1 / 0 AS boom"), {})], then_commit=True)
    assert [row[0] for row in stored_docs(pooled)] == [1]
    fit_for_the_next_user(pooled)


@workflow.defn(name="ItThreeSteps")
class ThreeSteps:
    @workflow.run
    async def run(self, word: str) -> str:
        for _ in range(3):
            word = await workflow.execute_activity(shout, word)
        return word


@activity.defn(task_queue="it-three-steps")
def shout(word: str) -> str:
    return word + "!"


@pytest.mark.parametrize("cache_size", [100, 0])
def test_a_step_takes_the_history_with_the_run_lock(database_url: str, cache_size: int) -> None:
    # In-process broker, PostgreSQL store: every step is recorded through the pipeline.
    orchestrator = Orchestrator(
        workflows=[ThreeSteps],
        activities=[shout],
        settings=Settings(
            database_url=database_url,
            broker_url="embedded://",
            instance_cache_size=cache_size,
            lifecycle_events=False,
        ),
    )
    history_reads: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM workflow_events" in statement:
            history_reads.append(statement)

    event.listen(orchestrator.db, "before_cursor_execute", spy)
    try:
        handle = orchestrator.client().start_workflow(
            ThreeSteps, "go", workflow_id=harness.unique("it-3")
        )
        assert handle.result(timeout=20) == "go!!!"
    finally:
        orchestrator.close()
    # The starting process decided the first step; every step after it came to an
    # instance that was not cached (the first, or all of them without a cache) and
    # read the history in the round trip that locked the run, not on its own.
    assert history_reads == []


@activity.defn(task_queue="it-deadlines")
def report_deadline() -> list[str]:
    info = activity.info()
    return [info.scheduled_at.isoformat(), info.started_at.isoformat(), info.deadline.isoformat()]


@workflow.defn(name="ItDeadline")
class Deadline:
    @workflow.run
    async def run(self, timeouts: list[float | None]) -> list[str]:
        start_to_close, heartbeat, schedule_to_close = timeouts
        result: list[str] = await workflow.execute_activity(
            report_deadline,
            start_to_close=start_to_close,
            heartbeat_timeout=heartbeat,
            schedule_to_close=schedule_to_close,
        )
        return result


@pytest.mark.parametrize(
    ("timeouts", "deadline_from", "seconds"),
    [
        ([30.0, None, None], "started", 30.0),
        ([30.0, 5.5, None], "started", 5.5),
        ([30.0, 5.5, 2.25], "scheduled", 2.25),
        ([1.5, 5.5, 20.0], "started", 1.5),
    ],
)
def test_the_claim_in_one_statement_sets_the_deadline_as_the_timeouts_say(
    database_url: str, timeouts: list[float | None], deadline_from: str, seconds: float
) -> None:
    orchestrator = Orchestrator(
        workflows=[Deadline],
        activities=[report_deadline],
        settings=Settings(
            database_url=database_url, broker_url="embedded://", lifecycle_events=False
        ),
    )
    try:
        handle = orchestrator.client().start_workflow(
            Deadline, timeouts, workflow_id=harness.unique("it-deadline")
        )
        scheduled, started, deadline = map(datetime.fromisoformat, handle.result(timeout=20))
    finally:
        orchestrator.close()
    base = scheduled if deadline_from == "scheduled" else started
    assert deadline == base + timedelta(seconds=seconds)


@workflow.defn(name="ItWaitsOpen")
class WaitsOpen:
    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: self.go)


def test_a_start_commits_without_reading_its_insert_and_a_taken_id_still_fails(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from psycopg import Pipeline

    orchestrator = Orchestrator(
        workflows=[WaitsOpen],
        settings=Settings(
            database_url=database_url, broker_url="embedded://", lifecycle_events=False
        ),
    )
    syncs: list[int] = []
    original = Pipeline.sync

    def sync(self: Any) -> None:
        syncs.append(1)
        original(self)

    monkeypatch.setattr(Pipeline, "sync", sync)
    workflow_id = harness.unique("it-unread")
    client = orchestrator.client()
    try:
        first = client.start_workflow(WaitsOpen, workflow_id=workflow_id)
        # Writes and COMMIT in one round trip: nothing was read back on the way.
        assert syncs == []
        with pytest.raises(WorkflowAlreadyStartedError):
            client.start_workflow(WaitsOpen, workflow_id=workflow_id)
        same = client.start_workflow(
            WaitsOpen, workflow_id=workflow_id, id_conflict_policy=IdConflictPolicy.USE_EXISTING
        )
        assert same.run_id == first.run_id
        with orchestrator.db.connect() as conn:
            runs = conn.execute(
                text("SELECT count(*) FROM workflow_runs WHERE workflow_id = :id"),
                {"id": workflow_id},
            ).scalar_one()
        assert runs == 1
        first.signal("proceed")
        first.result(timeout=20)
    finally:
        orchestrator.close()


# ------------------------------------------- results of runs a worker already knows
class KnownRunSpy:
    """What each try to record a result without reading the run returned, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.recorded: list[bool] = []
        self.stale: list[str] = []
        original = ActivityRunner._complete_known_run
        original_stale = ActivityRunner._stale

        def spied(runner: ActivityRunner, *args: Any, **kwargs: Any) -> Any:
            recorded, claim = original(runner, *args, **kwargs)
            self.recorded.append(recorded)
            return recorded, claim

        def stale(run_id: str, activity_id: str, attempt: int) -> None:
            self.stale.append(activity_id)
            original_stale(run_id, activity_id, attempt)

        monkeypatch.setattr(ActivityRunner, "_complete_known_run", spied)
        monkeypatch.setattr(ActivityRunner, "_stale", staticmethod(stale))
        # Every workflow instance made (kept, so that no id is reused): none may
        # be left open at the end.
        self.made: list[WorkflowInstance] = []
        make = WorkflowInstance.__init__

        def made(instance: WorkflowInstance, *args: Any, **kwargs: Any) -> None:
            self.made.append(instance)
            make(instance, *args, **kwargs)

        monkeypatch.setattr(WorkflowInstance, "__init__", made)

    def left_open(self) -> list[WorkflowInstance]:
        return [instance for instance in self.made if not instance.loop.is_closed()]


def embedded_on_postgres(database_url: str, *workflows: Any, cache_size: int = 100) -> Any:
    return Orchestrator(
        workflows=list(workflows),
        activities=[shout, signal_own_run, overtake_own_attempt],
        settings=Settings(
            database_url=database_url,
            broker_url="embedded://",
            instance_cache_size=cache_size,
            lifecycle_events=False,
        ),
    )


def event_types(handle: Any) -> list[str]:
    return [recorded.event.TYPE for recorded in handle.history()]


@pytest.mark.parametrize("cache_size", [100, 0])
def test_a_result_for_a_run_the_worker_knows_is_recorded_without_reading_the_run(
    database_url: str, cache_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = KnownRunSpy(monkeypatch)
    orchestrator = embedded_on_postgres(database_url, ThreeSteps, cache_size=cache_size)
    try:
        handle = orchestrator.client().start_workflow(
            ThreeSteps, "go", workflow_id=harness.unique("it-known")
        )
        assert handle.result(timeout=20) == "go!!!"
        types = event_types(handle)
    finally:
        orchestrator.close()
    # The first result comes to the instance the claim replayed from the history
    # it read, the next two to the one that recorded the step before; without a
    # cache there is no instance to decide before reading.
    assert spy.recorded == ([True, True, True] if cache_size else [])
    assert types == [
        "WorkflowStarted",
        *["ActivityScheduled", "ActivityCompleted"] * 3,
        "WorkflowCompleted",
    ]


# The orchestrators of the test that runs: the embedded one that runs the
# workflow first, another process's last. Activities reach them through this.
CURRENT: list[Orchestrator] = []


def elsewhere(database_url: str, *workflows: Any) -> Orchestrator:
    """Another process's engine on the same database, with no cache of its own."""
    return Orchestrator(
        workflows=list(workflows) or [ChangedMidStep],
        activities=[shout, signal_own_run, overtake_own_attempt],
        settings=Settings(
            database_url=database_url,
            broker_url=harness.BROKER_URL,
            instance_cache_size=0,
            lifecycle_events=False,
            publish_after_commit=False,
        ),
    )


@activity.defn(task_queue="it-known-runs")
def signal_own_run(word: str) -> str:
    """Changes its own run while it runs, through another process's engine."""
    info = activity.info()
    CURRENT[-1].client().get_handle(info.workflow_id).signal("note", "signalled")
    return word + "?"


@activity.defn(task_queue="it-known-runs")
def overtake_own_attempt(word: str) -> str:
    """Makes its own attempt stale while it runs, as a timeout and a retry would."""
    info = activity.info()
    with CURRENT[0].db.begin() as conn:
        conn.execute(
            text(
                "UPDATE activity_tasks SET status = 'SCHEDULED', attempt = attempt + 1 "
                "WHERE run_id = :r AND activity_id = :a"
            ),
            {"r": info.run_id, "a": info.activity_id},
        )
    return word


STEPS = {
    "shout": shout,
    "signal_own_run": signal_own_run,
    "overtake_own_attempt": overtake_own_attempt,
}


@workflow.defn(name="ItChangedMidStep")
class ChangedMidStep:
    def __init__(self) -> None:
        self.notes: list[str] = []

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)

    @workflow.run
    async def run(self, steps: list[str]) -> list[str]:
        """Runs the activities named in ``steps`` in turn, each on the last one's result."""
        word = "a"
        for step in steps:
            word = await workflow.execute_activity(STEPS[step], word)
        return [word, *self.notes]


def test_a_run_changed_since_the_worker_recorded_it_is_read_again(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestrator")
    spy = KnownRunSpy(monkeypatch)
    orchestrator = embedded_on_postgres(database_url, ChangedMidStep)
    other = elsewhere(database_url)
    CURRENT[:] = [orchestrator, other]
    try:
        handle = orchestrator.client().start_workflow(
            ChangedMidStep,
            ["shout", "signal_own_run"],
            workflow_id=harness.unique("it-changed"),
        )
        assert handle.result(timeout=20) == ["a!?", "signalled"]
        types = event_types(handle)
    finally:
        orchestrator.close()
        other.close()
        CURRENT.clear()
    # The signal came while the second step ran: its result was refused without
    # reading the run first, then recorded after the signal, in order; the
    # instance that decided too early was closed, and every other one at the end.
    assert spy.recorded == [True, False]
    assert spy.made and spy.left_open() == []
    # The refused result would have closed the run too: only the close that
    # committed is logged.
    closes = [
        record
        for record in caplog.records
        if record.getMessage() == "workflow closed COMPLETED"
        and getattr(record, "run_id", None) == handle.run_id
    ]
    assert len(closes) == 1
    assert types == [
        "WorkflowStarted",
        "ActivityScheduled",
        "ActivityCompleted",
        "ActivityScheduled",
        "SignalReceived",
        "ActivityCompleted",
        "WorkflowCompleted",
    ]


def test_a_stale_result_for_a_run_the_worker_knows_is_dropped(
    database_url: str, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = KnownRunSpy(monkeypatch)
    orchestrator = embedded_on_postgres(database_url, ChangedMidStep)
    CURRENT[:] = [orchestrator]
    try:
        handle = orchestrator.client().start_workflow(
            ChangedMidStep,
            ["shout", "overtake_own_attempt"],
            workflow_id=harness.unique("it-stale"),
        )
        harness.wait_until(lambda: spy.stale, 20, "the stale outcome to be dropped")
        types = event_types(handle)
        rows = harness.activity_rows(db, handle.run_id)
        # Nobody will run the overtaking attempt: the run must not outlive the test.
        handle.terminate("test over")
    finally:
        orchestrator.close()
        CURRENT.clear()
    assert spy.recorded == [True, False]
    assert len(spy.stale) == 1, spy.stale
    # Nothing of the refused transaction stayed: no result, and the attempt is
    # still the one that overtook it.
    assert types == [
        "WorkflowStarted",
        "ActivityScheduled",
        "ActivityCompleted",
        "ActivityScheduled",
    ]
    assert (rows["overtake_own_attempt"]["status"], rows["overtake_own_attempt"]["attempt"]) == (
        "SCHEDULED",
        2,
    )


def test_only_claims_and_outbox_marks_commit_without_waiting_for_their_flush(
    database_url: str, monkeypatch: pytest.MonkeyPatch, one_writes: OneWrites
) -> None:
    import psycopg

    sent: list[tuple[int, str]] = []
    execute = psycopg.Cursor.execute

    def spied(cursor: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append((threading.get_ident(), str(query)))
        return execute(cursor, query, *args, **kwargs)

    def spied_one_write(batch: OneWrite) -> None:
        # In the order the server runs them, among the cursors' statements.
        sent.extend((batch.thread, sql) for sql, _many in batch.statements)
        sent.extend((batch.thread, sql) for sql in batch.reads)
        sent.append((batch.thread, "COMMIT"))

    monkeypatch.setattr(psycopg.Cursor, "execute", spied)
    one_writes.observers.append(spied_one_write)
    orchestrator = embedded_on_postgres(database_url, ThreeSteps)
    try:
        handle = orchestrator.client().start_workflow(
            ThreeSteps, "go", workflow_id=harness.unique("it-flush")
        )
        assert handle.result(timeout=20) == "go!!!"
    finally:
        orchestrator.close()
    # Each of the three attempts came as a message (no eager dispatch here) and
    # was claimed right after the flag; the start and the results commit as usual.
    claims = [sql for _thread, sql in sent if "UPDATE activity_tasks AS a" in sql]
    assert len(claims) == 3
    flagged: list[str] = []
    for index, (thread, statement) in enumerate(sent):
        if "synchronous_commit" in statement:
            # In the flag's thread, the statement right after it.
            after = next(sql for other, sql in sent[index + 1 :] if other == thread)
            if statement == "SET synchronous_commit TO off":
                # The doorbell's own connection: it only ever notifies.
                assert after.startswith("SELECT pg_notify"), after
                continue
            assert statement == "SET LOCAL synchronous_commit TO OFF"
            flagged.append(after)
    assert len([sql for sql in flagged if "UPDATE activity_tasks AS a" in sql]) == 3
    # Anything else flagged marks published outbox rows (a lost mark only sends again).
    others = [sql for sql in flagged if "UPDATE activity_tasks AS a" not in sql]
    assert others
    assert all(sql.startswith("UPDATE outbox_messages SET published_at") for sql in others), others


# ------------------------------------------------------ writes straight to the driver
DOCS = Table(
    "it_written",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("doc", JSON),
    Column("at", DateTime(timezone=True)),
)
INSERT_DOC = insert(DOCS)
UPDATE_DOC = update(DOCS).where(DOCS.c.id == bindparam("b_id"))


@pytest.fixture
def docs(pooled: Engine) -> Any:
    DOCS.drop(pooled, checkfirst=True)
    DOCS.create(pooled)
    yield
    DOCS.drop(pooled)


def stored_docs(engine: Engine) -> list[tuple[Any, ...]]:
    """Each row with its document as text: a JSON null and a SQL NULL differ there."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, doc::text, at FROM it_written ORDER BY id"))
        return [tuple(row) for row in rows]


def test_writes_in_a_pipeline_skip_sqlalchemy_and_bind_values_as_it_does(
    pooled: Engine, docs: Any
) -> None:
    seen: list[str] = []
    event.listen(pooled, "before_cursor_execute", lambda *args: seen.append(args[2]))
    now = datetime.now(UTC)
    rows = [
        {"id": 1, "doc": {"a": [1, None]}, "at": now},
        {"id": 2, "doc": None, "at": None},
        {"id": 3, "doc": "x", "at": now},
        {"id": 4, "doc": [], "at": now},
    ]
    sessions = session_factory(pooled)
    # The same rows the usual way, as the reference: in another table's place.
    with sessions() as session:
        session.execute(INSERT_DOC, rows)
        session.execute(UPDATE_DOC, {"b_id": 4, "doc": {"b": True}})
        session.commit()
    expected = stored_docs(pooled)
    with pooled.begin() as conn:
        conn.execute(DOCS.delete())
    seen.clear()
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, rows[:1])
        write(session, INSERT_DOC, rows[1:])
        write(session, UPDATE_DOC, {"b_id": 4, "doc": {"b": True}})
        commit(session)
    assert seen == []
    assert stored_docs(pooled) == expected
    assert expected[1] == (2, "null", None)  # Python None is a JSON null, as SQLAlchemy binds it
    seen.clear()
    with sessions() as session:
        # Outside a pipeline a write is an ordinary execution.
        write(session, UPDATE_DOC, {"b_id": 3, "doc": {"c": 1}})
        session.commit()
    assert len(seen) == 1
    assert stored_docs(pooled)[2] == (3, '{"c": 1}', now)


@pytest.fixture
def handed_to_driver(
    monkeypatch: pytest.MonkeyPatch, one_writes: OneWrites
) -> list[tuple[str, str]]:
    """(method, SQL) of each statement handed to psycopg, in order.

    Through its cursors, or, for a transaction that reads nothing, in one write
    (``one_write``): there a statement of several rows counts as executemany.
    """
    import psycopg

    sent: list[tuple[str, str]] = []
    execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany

    def spy_one_write(batch: OneWrite) -> None:
        sent.extend(("executemany" if many else "execute", sql) for sql, many in batch.statements)
        sent.append(("execute", "COMMIT"))

    def spy_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(("execute", str(query)))
        return execute(self, query, *args, **kwargs)

    def spy_executemany(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(("executemany", str(query)))
        return executemany(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", spy_execute)
    monkeypatch.setattr(psycopg.Cursor, "executemany", spy_executemany)
    one_writes.observers.append(spy_one_write)
    return sent


def test_rows_of_a_plain_insert_go_in_one_statement_per_fifty(
    pooled: Engine, docs: Any, handed_to_driver: list[tuple[str, str]]
) -> None:
    sent = handed_to_driver
    now = datetime.now(UTC)
    rows = [{"id": n, "doc": {"n": n} if n % 3 else None, "at": now} for n in range(1, 121)]
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        sent.clear()
        write(session, INSERT_DOC, rows)
        commit(session)
        inserts = [entry for entry in sent if entry[1] not in ("BEGIN", "COMMIT")]
    # 120 rows: statements of 50, 50 and 20 rows, no statement per row.
    assert [kind for kind, _ in inserts] == ["execute"] * 3
    assert [sql.count("), (") + 1 for _, sql in inserts] == [50, 50, 20]
    stored = stored_docs(pooled)
    assert [row[0] for row in stored] == list(range(1, 121))
    assert stored[2] == (3, "null", now) and stored[3] == (4, '{"n": 4}', now)
    # An insert with more after its VALUES is no plain insert: a statement per row.
    upsert = pg_insert(DOCS).on_conflict_do_nothing()
    with sessions() as session, pipelined(session):
        sent.clear()
        write(session, upsert, [{"id": 1, "doc": {}}, {"id": 200, "doc": {}}])
        commit(session)
        upserts = [entry for entry in sent if entry[1] not in ("BEGIN", "COMMIT")]
    assert [kind for kind, _ in upserts] == ["executemany"]
    assert [row[0] for row in stored_docs(pooled)][-1] == 200


def test_writes_wait_for_the_next_sync_and_go_out_together_in_order(
    pooled: Engine, docs: Any, handed_to_driver: list[tuple[str, str]]
) -> None:
    sent = handed_to_driver
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        sent.clear()
        write(session, INSERT_DOC, {"id": 1, "doc": {"v": 1}})
        write(session, UPDATE_DOC, {"b_id": 1, "doc": {"v": 2}})
        # Held back: nothing has reached the driver yet.
        assert sent == []
        # A statement SQLAlchemy executes sends them first, and sees them:
        # the transaction's BEGIN goes with them, not in a round trip of its own.
        seen = session.execute(text("SELECT doc->>'v' FROM it_written WHERE id = 1"))
        assert seen.scalar_one() == "2"
        assert [sql.split()[0] for _, sql in sent] == ["BEGIN", "INSERT", "UPDATE", "SELECT"]
        sent.clear()
        write(session, INSERT_DOC, {"id": 2, "doc": None})
        assert sent == []
        commit(session)
        # The commit sends what was held back, then COMMIT.
        assert [sql.split()[0] for _, sql in sent] == ["INSERT", "COMMIT"]
    assert [row[0] for row in stored_docs(pooled)] == [1, 2]
    # A pipeline that ends without a commit still sends what it held back, so
    # that the transaction can be committed after it.
    with sessions() as session:
        with pipelined(session):
            write(session, INSERT_DOC, {"id": 3, "doc": {}})
        session.commit()
    assert [row[0] for row in stored_docs(pooled)] == [1, 2, 3]
    # A block that fails sends nothing of what it held back.
    sent.clear()
    with (
        pytest.raises(RuntimeError, match="the engine failed"),
        sessions() as session,
        pipelined(session),
    ):
        write(session, INSERT_DOC, {"id": 4, "doc": {}})
        raise RuntimeError("the engine failed")
    assert not [sql for _, sql in sent if sql.startswith("INSERT")]
    assert [row[0] for row in stored_docs(pooled)] == [1, 2, 3]


def test_a_read_together_sees_the_writes_held_back_before_it(pooled: Engine, docs: Any) -> None:
    sessions = session_factory(pooled)
    count = text("SELECT count(*) AS n FROM it_written")
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, [{"id": 1, "doc": {}}, {"id": 2, "doc": {}}])
        rows = read_together(session, [(count, {})])
        assert rows == [[{"n": 2}]]
        commit(session)
    assert [row[0] for row in stored_docs(pooled)] == [1, 2]


def fit_for_the_next_user(engine: Engine) -> None:
    """Every pooled connection is out of pipeline mode, idle, not autocommit, and keeps no entry."""
    held = [engine.raw_connection() for _ in range(engine.pool.checkedin())]
    try:
        for proxy in held:
            driver = proxy.driver_connection
            assert driver is not None
            assert not driver.pgconn.pipeline_status
            assert driver.pgconn.transaction_status == 0  # idle
            assert not driver.autocommit
            assert not any(key.startswith("orchestrator.") for key in proxy.info)
    finally:
        for proxy in held:
            proxy.close()


def test_a_transaction_that_reads_nothing_goes_in_one_write_with_its_begin_and_commit(
    pooled: Engine, docs: Any, monkeypatch: pytest.MonkeyPatch, one_writes: OneWrites
) -> None:
    from psycopg import _pipeline_base, pq

    # psycopg syncs (sends, then waits for every result) at a read, at the end
    # of its pipeline, and after the BEGIN it sends itself.
    syncs: list[str] = []
    sync, leave = _pipeline_base.BasePipeline._sync_gen, _pipeline_base.BasePipeline._exit_gen
    monkeypatch.setattr(
        _pipeline_base.BasePipeline, "_sync_gen", lambda p: syncs.append("sync") or sync(p)
    )
    monkeypatch.setattr(
        _pipeline_base.BasePipeline, "_exit_gen", lambda p: syncs.append("exit") or leave(p)
    )

    def prepared() -> int:
        with pooled.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_prepared_statements"
                        " WHERE name LIKE '\\_orchestrator\\_%'"
                    )
                ).scalar_one()
            )

    sessions = session_factory(pooled)
    counts = []
    for value in (1, 2):  # the second time by the names prepared the first
        with sessions() as session, pipelined(session):
            write(session, INSERT_DOC, {"id": value, "doc": {}})
            write(session, UPDATE_DOC, {"b_id": value, "doc": {"v": value}})
            commit(session)
            driver = session.connection().connection.driver_connection
        assert driver.pgconn.pipeline_status == pq.PipelineStatus.OFF
        counts.append(prepared())
    # BEGIN, the writes and COMMIT in one go each time; psycopg's pipeline never entered.
    assert [[sql.split()[0] for sql, _ in sent.statements] for sent in one_writes] == [
        ["BEGIN", "INSERT", "UPDATE"]
    ] * 2
    assert syncs == []
    assert stored_docs(pooled) == [(1, '{"v": 1}', None), (2, '{"v": 2}', None)]
    # The pool holds one connection here: the two writes were prepared once.
    assert counts == [2, 2]
    fit_for_the_next_user(pooled)


def test_statements_prepared_for_one_write_survive_their_connection_forgetting_them(
    pooled: Engine, docs: Any
) -> None:
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        commit(session)
    # What psycopg does at a rollback when it has prepared statements of its own.
    with pooled.connect() as conn:
        conn.exec_driver_sql("DEALLOCATE ALL")
        conn.commit()
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 2, "doc": {}})
        write(session, UPDATE_DOC, {"b_id": 2, "doc": {"v": 2}})
        commit(session)
    assert [row[:2] for row in stored_docs(pooled)] == [(1, "{}"), (2, '{"v": 2}')]
    fit_for_the_next_user(pooled)


def test_a_transaction_larger_than_the_socket_takes_goes_in_one_write_all_the_same(
    pooled: Engine, docs: Any
) -> None:
    # About 8 MB of statements: libpq writes them in several goes, the server
    # replying meanwhile.
    rows = [{"id": n, "doc": {"pad": "x" * 2000, "n": n}} for n in range(1, 4001)]
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, rows)
        for n in range(1, 4001, 2):
            write(session, UPDATE_DOC, {"b_id": n, "doc": {"n": -n}})
        commit(session)
    with pooled.connect() as conn:
        stored = conn.execute(text("SELECT count(*), sum((doc->>'n')::int) FROM it_written")).one()
    assert tuple(stored) == (4000, sum(range(2, 4001, 2)) - sum(range(1, 4001, 2)))
    fit_for_the_next_user(pooled)


def test_a_one_write_interrupted_on_its_way_raises_the_interrupt_and_the_pool_moves_on(
    pooled: Engine, docs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import one_write

    def interrupted(fd: int, events: int) -> int:
        raise KeyboardInterrupt

    sessions = session_factory(pooled)
    with monkeypatch.context() as patch:
        patch.setattr(one_write, "_wait", interrupted)
        with pytest.raises(KeyboardInterrupt), sessions() as session, pipelined(session):
            write(session, INSERT_DOC, {"id": 1, "doc": {}})
            driver = session.connection().connection.driver_connection
            commit(session)
    assert driver.closed
    # The interrupt, not an error of the closed connection's rollback; that
    # connection is gone from the pool, and the next transaction runs.
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 2, "doc": {}})
        commit(session)
        assert session.connection().connection.driver_connection is not driver
    assert 2 in [row[0] for row in stored_docs(pooled)]
    fit_for_the_next_user(pooled)


def test_a_connection_told_not_to_prepare_prepares_nothing_for_one_write(
    database_url: str, docs: Any
) -> None:
    engine = create_db_engine(database_url, connect_args={"prepare_threshold": None})
    try:
        sessions = session_factory(engine)
        for value in (1, 2):
            with sessions() as session, pipelined(session):
                write(session, INSERT_DOC, {"id": value, "doc": {}})
                commit(session)
        with engine.connect() as conn:
            names = conn.execute(text("SELECT name FROM pg_prepared_statements")).scalars().all()
        assert names == []
        assert [row[0] for row in stored_docs(engine)] == [1, 2]
    finally:
        engine.dispose()


def test_a_failing_statement_in_one_write_fails_the_commit_and_the_rest_is_not_run(
    pooled: Engine, docs: Any
) -> None:
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        commit(session)
    with (
        pytest.raises(IntegrityError, match="duplicate key"),
        sessions() as session,
        pipelined(session),
    ):
        write(session, INSERT_DOC, {"id": 2, "doc": {}})
        write(session, INSERT_DOC, {"id": 1, "doc": {}})  # fails
        write(session, INSERT_DOC, {"id": 3, "doc": {}})  # never runs
        commit(session)
    assert [row[0] for row in stored_docs(pooled)] == [1]
    fit_for_the_next_user(pooled)
    # The connection's prepared statements still serve.
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 4, "doc": {}})
        commit(session)
    assert [row[0] for row in stored_docs(pooled)] == [1, 4]


def test_a_pipelined_transaction_that_ends_another_way_leaves_the_connection_as_it_found_it(
    database_url: str, pooled: Engine, docs: Any
) -> None:
    sessions = session_factory(pooled)
    elsewhere = create_engine(database_url)  # sees only what was committed
    try:
        # A pipeline inside another joins it.
        with sessions() as session, pipelined(session):
            write(session, INSERT_DOC, {"id": 1, "doc": {}})
            outer = orchestrator_pipeline.current_pipeline(session)
            with pipelined(session):
                write(session, INSERT_DOC, {"id": 2, "doc": {}})
            # The outer block's pipeline holds the inner one's write too, unsent.
            assert orchestrator_pipeline.current_pipeline(session) is outer
            assert [sql.split()[0] for sql, _, _ in outer.pending] == ["BEGIN", "INSERT", "INSERT"]
            write(session, INSERT_DOC, {"id": 3, "doc": {}})
            commit(session)
        assert [row[0] for row in stored_docs(elsewhere)] == [1, 2, 3]
        fit_for_the_next_user(pooled)
        # A plain session commit inside the pipeline commits what was held back.
        with sessions() as session, pipelined(session):
            write(session, INSERT_DOC, {"id": 4, "doc": {}})
            session.commit()
        assert [row[0] for row in stored_docs(elsewhere)] == [1, 2, 3, 4]
        fit_for_the_next_user(pooled)
        # A rollback, or a close, inside it sends nothing of what was held back;
        # the session's next transaction, in the same block, has no pipeline.
        with sessions() as session, pipelined(session):
            write(session, INSERT_DOC, {"id": 5, "doc": {}})
            session.rollback()
            assert not queue_checks(session, [])  # no pipeline any more
            write(session, INSERT_DOC, {"id": 50, "doc": {}})
            session.commit()
        with sessions() as session, pipelined(session):
            write(session, INSERT_DOC, {"id": 6, "doc": {}})
            session.close()
        fit_for_the_next_user(pooled)
        # A block that fails before anything reached the server leaves the
        # connection out of autocommit: what the session does next is one
        # transaction again, and rolls back as one.
        with sessions() as session:
            with pytest.raises(RuntimeError, match="the engine failed"), pipelined(session):
                write(session, INSERT_DOC, {"id": 60, "doc": {}})
                raise RuntimeError("the engine failed")
            session.execute(INSERT_DOC, {"id": 61, "doc": {}})
            session.rollback()
        fit_for_the_next_user(pooled)
        # A pipeline that ends without a commit sends its writes; the session
        # commits them after it.
        with sessions() as session:
            with pipelined(session):
                write(session, INSERT_DOC, {"id": 7, "doc": {}})
            session.commit()
        # An exception in the block: nothing stays.
        with (
            pytest.raises(RuntimeError, match="the engine failed"),
            sessions() as session,
            pipelined(session),
        ):
            write(session, INSERT_DOC, {"id": 8, "doc": {}})
            session.execute(text("SELECT 1"))  # the write reaches the server
            raise RuntimeError("the engine failed")
        fit_for_the_next_user(pooled)
        assert [row[0] for row in stored_docs(elsewhere)] == [1, 2, 3, 4, 7, 50]
    finally:
        elsewhere.dispose()


def test_an_engine_with_an_isolation_level_keeps_the_drivers_own_begin(database_url: str) -> None:
    engine = create_db_engine(database_url, isolation_level="SERIALIZABLE")
    try:
        with session_factory(engine)() as session, pipelined(session):
            level = session.execute(text("SHOW transaction_isolation")).scalar_one()
            commit(session)
        assert level == "serializable"
        fit_for_the_next_user(engine)
    finally:
        engine.dispose()


def test_a_value_the_driver_cannot_send_leaves_nothing_half_written(
    pooled: Engine, docs: Any
) -> None:
    sessions = session_factory(pooled)
    unsendable = {"id": 2, "doc": {"not json": object()}}
    # Held back, the bad value fails where the writes are handed over: here the
    # commit, which leaves the pipeline and commits nothing.
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        write(session, INSERT_DOC, unsendable)
        with pytest.raises(TypeError, match="not JSON serializable"):
            commit(session)
    assert stored_docs(pooled) == []
    # A caller that catches the failure where it surfaced (a statement
    # SQLAlchemy executes) cannot commit the half that was handed over.
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        write(session, INSERT_DOC, unsendable)
        with pytest.raises(TypeError, match="not JSON serializable"):
            session.execute(text("SELECT 1"))
        with pytest.raises(TypeError, match="not JSON serializable"):
            commit(session)
    assert stored_docs(pooled) == []
    # A pipeline that ends without a commit and fails to hand its writes over
    # still leaves pipeline mode: the pooled connection is fit for its next user.
    with sessions() as session:
        with pytest.raises(TypeError, match="not JSON serializable"), pipelined(session):
            write(session, INSERT_DOC, unsendable)
        kept_with_connection = session.connection().info
        assert not in_pipeline_mode(session)
        assert not any(key.startswith("orchestrator.") for key in kept_with_connection)
        session.rollback()
    with sessions() as session:
        assert not in_pipeline_mode(session)
        assert session.execute(text("SELECT count(*) FROM it_written")).scalar_one() == 0


def test_an_insert_with_a_clause_after_its_values_is_sent_row_by_row(
    pooled: Engine, docs: Any, handed_to_driver: list[tuple[str, str]]
) -> None:
    sent = handed_to_driver
    upsert = pg_insert(DOCS)
    upsert = upsert.on_conflict_do_update(
        index_elements=[DOCS.c.id], set_={"doc": func.coalesce(upsert.excluded.doc, DOCS.c.doc)}
    )
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session):
        write(session, INSERT_DOC, {"id": 1, "doc": {"v": 1}})
        sent.clear()
        write(session, upsert, [{"id": 1, "doc": {"v": 2}}, {"id": 2, "doc": {"v": 3}}])
        commit(session)
        assert [kind for kind, sql in sent if "ON CONFLICT" in sql] == ["executemany"]
    assert stored_docs(pooled) == [(1, '{"v": 2}', None), (2, '{"v": 3}', None)]


def test_a_failing_write_in_a_pipeline_fails_the_commit_and_writes_nothing(
    pooled: Engine, docs: Any
) -> None:
    sessions = session_factory(pooled)
    with (
        pytest.raises(IntegrityError, match="duplicate key"),
        sessions() as session,
        pipelined(session),
    ):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        commit(session)
    with pooled.connect() as conn:
        assert conn.execute(select(DOCS)).all() == []


@workflow.defn(name="ItWaitsBetweenSteps")
class WaitsBetweenSteps:
    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.run
    async def run(self) -> str:
        first = await workflow.execute_activity(shout, "a")
        await workflow.wait_condition(lambda: self.go)
        return str(await workflow.execute_activity(shout, first))


def test_a_claim_brings_a_cached_instance_up_to_date_with_what_others_recorded(
    database_url: str, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = KnownRunSpy(monkeypatch)
    here = embedded_on_postgres(database_url, WaitsBetweenSteps)
    other = elsewhere(database_url, WaitsBetweenSteps)
    workflow_id = harness.unique("it-catch-up")
    try:
        handle = here.client().start_workflow(WaitsBetweenSteps, workflow_id=workflow_id)
        harness.wait_until(lambda: spy.recorded, 20, "the first result")
        applied = here.engine.cache.applied_seq(handle.run_id)
        assert applied == 3, applied  # started, first step scheduled and completed
        # Another process records the signal and decides the second step; its
        # message (left in that process's outbox) is delivered here by hand.
        other.client().get_handle(workflow_id).signal("proceed")
        second = harness.activity_rows(db, handle.run_id)
        assert len(second) == 1
        history_reads: list[Any] = []
        read = orchestrator_pipeline.read_together

        def spy_reads(session: Session, reads: Any, **kwargs: Any) -> Any:
            history_reads.extend(p["b_after"] for _s, p in reads if "b_after" in p)
            return read(session, reads, **kwargs)

        monkeypatch.setattr("orchestrator.activity_runner.read_together", spy_reads)
        here.engine.activity_task(handle.run_id, "2", 1)
        assert handle.result(timeout=20) == "a!!"
    finally:
        here.close()
        other.close()
        with db.begin() as conn:
            conn.execute(
                text("DELETE FROM outbox_messages WHERE aggregate_id = :w"), {"w": workflow_id}
            )
    # The claim read only the two events the cached instance had not applied,
    # and the second result was recorded as for a known run.
    assert history_reads == [3]
    assert spy.recorded == [True, True]


def test_after_a_refusal_the_next_result_is_recorded_carefully_then_ahead_again(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = KnownRunSpy(monkeypatch)
    orchestrator = embedded_on_postgres(database_url, ChangedMidStep)
    other = elsewhere(database_url, ChangedMidStep)
    CURRENT[:] = [orchestrator, other]
    try:
        handle = orchestrator.client().start_workflow(
            ChangedMidStep,
            ["shout", "signal_own_run", "shout", "shout"],
            workflow_id=harness.unique("it-contended"),
        )
        assert handle.result(timeout=20) == ["a!?!!", "signalled"]
    finally:
        orchestrator.close()
        other.close()
        CURRENT.clear()
    # The second result is refused (the signal came while it ran). The third is
    # recorded the careful way, reading only what the instance lacked, and finds
    # nothing new from outside; the fourth is decided ahead again.
    assert spy.recorded == [True, False, True]
    assert spy.left_open() == []


def _outbox_triggers(url: str) -> int:
    engine = orchestrator_db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_trigger t"
                        " JOIN pg_class c ON c.oid = t.tgrelid"
                        " WHERE c.relname = 'outbox_messages' AND NOT t.tgisinternal"
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_the_migrations_drop_the_outbox_insert_trigger_and_bring_it_back_down() -> None:
    from orchestrator import migrate

    url = harness.database_url("orchestrator_migrations_it")
    harness.recreate_database(url)
    migrate.upgrade(url, "0002")
    assert _outbox_triggers(url) == 1
    migrate.upgrade(url)
    # Writers wake relays after their commit: no insert notifies any more.
    assert _outbox_triggers(url) == 0
    migrate.downgrade(url, "0002")
    assert _outbox_triggers(url) == 1


def test_a_start_writes_its_outbox_rows_straight_to_the_driver(database_url: str) -> None:
    orchestrator = embedded_on_postgres(database_url, ThreeSteps)
    seen: list[str] = []

    def statement(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        seen.append(sql)

    event.listen(orchestrator.db, "before_cursor_execute", statement)
    try:
        handle = orchestrator.client().start_workflow(
            ThreeSteps, "go", workflow_id=harness.unique("it-outbox-direct")
        )
        first = len(seen)
        assert handle.result(timeout=20) == "go!!!"
    finally:
        event.remove(orchestrator.db, "before_cursor_execute", statement)
        orchestrator.close()
    # The start's pipeline sent its rows without SQLAlchemy's execution (and its events).
    assert not [sql for sql in seen[:first] if "INSERT INTO outbox_messages" in sql]
    with orchestrator.db.connect() as conn:
        rows = conn.execute(
            text("SELECT body FROM outbox_messages WHERE body->>'run_id' = :run_id"),
            {"run_id": handle.run_id},
        ).all()
    # ...bound as SQLAlchemy binds them: the JSON body reads back as written.
    assert rows and all(row.body["run_id"] == handle.run_id for row in rows)


# ------------------------------------------------ lean: the pooled connection, bare
@pytest.fixture
def connects(pooled: Engine) -> Any:
    """Every SQLAlchemy ``Connection`` made on the pooled engine from now on."""
    made: list[Any] = []

    def connected(connection: Any) -> None:
        made.append(connection)

    event.listen(pooled, "engine_connect", connected)
    yield made
    event.remove(pooled, "engine_connect", connected)


def test_a_lean_transaction_commits_without_a_sqlalchemy_connection(
    pooled: Engine, docs: Any, connects: list[Any], one_writes: OneWrites
) -> None:
    sessions = session_factory(pooled)
    told: list[str] = []
    with sessions() as session, pipelined(session, lean=True):
        write(session, INSERT_DOC, {"id": 1, "doc": {"a": 1}})
        orchestrator_sessions.after_commit(session, lambda: told.append("committed"))
        assert pooled.pool.checkedout() == 1
        commit(session)
        # Back in the pool with its transaction, the session still open.
        assert pooled.pool.checkedout() == 0
    # No Connection, and so none of its begin, commit and close: the pooled
    # connection went in one write, and what waits for the commit heard of it.
    assert connects == []
    assert [[sql.split()[0] for sql, _ in sent.statements] for sent in one_writes] == [
        ["BEGIN", "INSERT"]
    ]
    assert told == ["committed"]
    assert stored_docs(pooled) == [(1, '{"a": 1}', None)]
    assert pooled.pool.checkedout() == 0
    fit_for_the_next_user(pooled)


def test_what_sqlalchemy_executes_in_a_lean_transaction_runs_in_it(
    pooled: Engine, docs: Any, connects: list[Any]
) -> None:
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session, lean=True):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        # The session's statement goes on the bare connection, after the write
        # held back before it: the same transaction, which sees it.
        assert session.execute(text("SELECT count(*) FROM it_written")).scalar_one() == 1
        assert pooled.pool.checkedout() == 1
        session.execute(text("UPDATE it_written SET doc = '{\"b\": 2}'"))
        commit(session)
    assert len(connects) == 1
    assert stored_docs(pooled) == [(1, '{"b": 2}', None)]
    assert pooled.pool.checkedout() == 0
    fit_for_the_next_user(pooled)


def test_a_lean_transaction_that_fails_writes_nothing_and_gives_its_connection_back(
    pooled: Engine, docs: Any
) -> None:
    sessions = session_factory(pooled)
    with pytest.raises(IntegrityError), sessions() as session, pipelined(session, lean=True):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        write(session, INSERT_DOC, {"id": 1, "doc": {}})
        commit(session)
    assert pooled.pool.checkedout() == 0
    with pytest.raises(RuntimeError), sessions() as session, pipelined(session, lean=True):
        write(session, INSERT_DOC, {"id": 2, "doc": {}})
        raise RuntimeError("the caller's own error, before the commit")
    assert stored_docs(pooled) == []
    assert pooled.pool.checkedout() == 0
    fit_for_the_next_user(pooled)


def test_a_lean_transaction_that_cannot_connect_raises_as_sqlalchemy_does() -> None:
    unreachable = create_db_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    try:
        sessions = session_factory(unreachable)
        raised = []
        for lean in (False, True):
            with (
                pytest.raises(DBAPIError) as caught,
                sessions() as session,
                pipelined(session, lean=lean),
            ):
                commit(session)
            raised.append((type(caught.value), type(caught.value.orig)))
        assert raised[0] == raised[1]
    finally:
        unreachable.dispose()


def test_a_lean_transaction_rolled_back_or_closed_early_leaves_nothing_behind(
    pooled: Engine, docs: Any
) -> None:
    sessions = session_factory(pooled)
    with sessions() as session, pipelined(session, lean=True):
        write(session, INSERT_DOC, {"id": 1, "doc": {}})  # held back
        session.rollback()
        # The connection went back with the transaction, its writes dropped;
        # what follows is a transaction of its own, on a connection of its own.
        assert pooled.pool.checkedout() == 0
        assert orchestrator_pipeline.current_pipeline(session) is None
        session.execute(INSERT_DOC, {"id": 2, "doc": {}})
        session.commit()
    with sessions() as session, pipelined(session, lean=True):
        write(session, INSERT_DOC, {"id": 3, "doc": {}})
        session.execute(text("SELECT 1"))  # sent: the transaction has begun on the server
        session.close()
        assert pooled.pool.checkedout() == 0
    assert stored_docs(pooled) == [(2, "{}", None)]
    fit_for_the_next_user(pooled)
