"""Database engines for the state store, on PostgreSQL or SQLite."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, Executable, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything here is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """An engine whose transactions lock what they touch, on either database.

    SQLite has no row locks, so every transaction starts with BEGIN IMMEDIATE: it
    takes the write lock up front, which serialises writers the way SELECT ... FOR
    UPDATE does on PostgreSQL and avoids lock-upgrade deadlocks.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=NullPool,
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's BEGIN below be the only transaction control.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_size=5, max_overflow=10, **kwargs)
    _ping_idle_connections(engine)
    _read_results_in_pipeline(engine)
    _pooled_out_of_pipelines(engine)
    # A forked worker child must not share the parent's sockets.
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    return engine


log = logging.getLogger("orchestrator.db")

P = ParamSpec("P")
R = TypeVar("R")


def once_more_on_disconnect(transaction: Callable[P, R]) -> Callable[P, R]:
    """Run a one-transaction function again if it lost its connection.

    For the transactions of the hot path, which must not wait for a timeout
    because the database restarted while their pooled connection sat idle
    (see ``_ping_idle_connections``). Safe because each of them checks, under
    its lock, the state it expects before it writes anything.
    """

    @functools.wraps(transaction)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return transaction(*args, **kwargs)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.warning("database connection lost; running the transaction again: %s", exc.orig)
            return transaction(*args, **kwargs)

    return run


# A pooled connection idle this long is checked before use.
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_idle_connections(engine: Engine) -> None:
    """Check a pooled connection before use only if it has been idle a while.

    A check on every checkout (``pool_pre_ping``) is a round trip per
    transaction, a sixth of a step's cost. A connection that was in use a moment
    ago is almost surely alive; if the database restarted in that moment, the
    statement that finds out fails and SQLAlchemy discards the whole pool, so
    the next transaction starts on fresh connections.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool drops this connection and checks out another.
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc


class CoreSession(Session):
    """A session that runs Core statements on its connection directly.

    The state store maps no classes, so the ORM's execute path (its events,
    bind lookup and result set-up) does nothing here but costs about a quarter of
    a short statement's client time, on every statement of the hot path.

    A session that :func:`pipelined` gave a bare pooled connection (``lean``)
    runs everything SQLAlchemy executes on that same connection.
    """

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        held: _Lean | None = self.info.get(_LEAN)
        if held is not None and kwargs.get("bind") in (None, held.engine):
            return held.connection()
        return super().get_bind(*args, **kwargs)

    def execute(
        self,
        statement: Executable,
        params: Any = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Result[Any]:
        if execution_options or bind_arguments or kwargs:
            return super().execute(
                statement,
                params,
                execution_options=execution_options or {},
                bind_arguments=bind_arguments,
                **kwargs,
            )
        return self.connection().execute(statement, params)

    def close(self) -> None:
        # Whatever a transaction's work registered to be let go of (see on_close).
        finalizers = self.info.pop(_ON_CLOSE, None)
        try:
            super().close()
        finally:
            try:
                # Given back when its transaction ended; this is the backstop.
                held: _Lean | None = self.info.pop(_LEAN, None)
                if held is not None:
                    held.release()
            finally:
                for finalize in finalizers or ():
                    finalize(self)


_LEAN = "orchestrator.lean"


class _Lean:
    """A session's pooled connection, checked out without SQLAlchemy's ``Connection``.

    A transaction whose statements all go through :func:`pipelined` (held
    back, sent by :func:`commit` or :func:`read_together`) never needs one:
    the session's transaction then has no connection for SQLAlchemy to begin,
    commit and give back, which cost a short transaction of the hot path
    about as much client time as its one round trip. Anything SQLAlchemy does
    execute in the session adopts the connection (see ``CoreSession.get_bind``),
    so it runs in the same transaction. The connection goes back to the pool
    when the session's transaction ends, however it ends, as a session's own
    connection does (see ``_drop_after_commit``).
    """

    __slots__ = ("adopted", "engine", "pooled")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect
        try:
            self.pooled = engine.raw_connection()
        except dialect.loaded_dbapi.Error as exc:
            # As engine.connect() raises it: SQLAlchemy's error, which callers
            # catch (without the engine's handle_error hooks, which we set none of).
            raise DBAPIError.instance(
                None,
                None,
                exc,
                dialect.loaded_dbapi.Error,
                connection_invalidated=dialect.is_disconnect(exc, None, None),
                dialect=dialect,
            ) from exc
        self.adopted: Connection | None = None

    def connection(self) -> Connection:
        if self.adopted is None:
            self.adopted = Connection(self.engine, connection=self.pooled)
        return self.adopted

    def release(self) -> None:
        (self.adopted or self.pooled).close()


def bound_to(session: Session) -> Engine | Connection:
    """The engine (or connection) ``session`` runs on, without taking a connection for it."""
    held: _Lean | None = session.info.get(_LEAN)
    return held.engine if held is not None else session.get_bind()


_ON_CLOSE = "orchestrator.on_close"
_AFTER_COMMIT = "orchestrator.after_commit"


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Have ``callback()`` run right after ``session``'s transaction commits; never if it does not.

    For what must not be said of work that may yet roll back (a run's close in
    the log, the metrics and the notification to those waiting: a decision
    refused at its commit is made again, and must count once). Any session,
    the engine's or an application's, however it commits; dropped when its
    transaction ends otherwise (a rollback, a close). A callback that fails is
    logged: the commit it follows has happened.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    # Releasing a savepoint also reports a commit; only the outermost one counts.
    if session.in_nested_transaction():
        return
    for callback in session.info.pop(_AFTER_COMMIT, ()):
        try:
            callback()
        except Exception:
            log.exception("a step after a commit failed (the commit stands)")


@event.listens_for(Session, "before_commit")
def _commit_pipeline_first(session: Session) -> None:
    # A commit that bypasses commit() below, inside pipelined(): the pipeline's
    # statements and its COMMIT go first, as commit() would send them (the
    # driver, which learns of the transaction only at a sync, would otherwise
    # find nothing to commit). A savepoint's release only needs them sent.
    entry: _Open | None = session.info.get(_PIPELINE)
    if entry is None:
        return
    if session.in_nested_transaction():
        entry.flush()
        return
    del session.info[_PIPELINE]
    with _translated_errors(session):
        _commit_pipeline(entry)


@event.listens_for(Session, "after_transaction_end")
def _drop_after_commit(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_AFTER_COMMIT, None)
        # A lean connection goes back with its transaction (its adopted
        # Connection's transaction has just been closed): the pool's checkin
        # drops a pipeline still on it, and what it held back.
        held: _Lean | None = session.info.pop(_LEAN, None)
        if held is not None:
            held.release()
        # A pipeline whose connection went back to the pool (a rollback or a
        # close inside pipelined()): the session's next transaction has none.
        entry: _Open | None = session.info.get(_PIPELINE)
        if entry is not None and entry.closed:
            del session.info[_PIPELINE]


def on_close(session: Session, finalize: Callable[[Session], object]) -> None:
    """Have ``finalize(session)`` run when ``session`` closes, however its work ended.

    For state a transaction holds outside the database (workflow instances it
    took from a cache): a commit hands it on and clears it, and whatever is
    left when the session closes is let go of.
    """
    finalizers: list[Callable[[Session], object]] = session.info.setdefault(_ON_CLOSE, [])
    if finalize not in finalizers:
        finalizers.append(finalize)


_PIPELINE = "orchestrator.pipeline"
# The engines whose pool turns a connection back from what pipelined() did to it.
_RESETTING_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_CONNECTION_OK = 0  # libpq's CONNECTION_OK
_IDLE = 0  # libpq's PQTRANS_IDLE


@contextlib.contextmanager
def pipelined(session: Session, *, lean: bool = False) -> Iterator[None]:
    """Send the transaction's writes without a round trip each (PostgreSQL).

    In psycopg's pipeline mode a statement whose result nothing reads (an
    insert, an update) does not wait for the server; the transaction holds it
    back until it next waits anyway (see ``_Open.send``). One whose rows are
    read waits as usual, after everything before it. With :func:`commit`, a
    transition's writes and its COMMIT share one round trip instead of one
    each; a transaction that read nothing by then goes in one write
    (:mod:`orchestrator.one_write`), and psycopg's pipeline mode, entered only
    when a statement first goes to the driver, is never entered for it.
    Elsewhere (SQLite, a libpq without pipeline mode) this does nothing.

    ``lean``: a session with no transaction yet takes its pooled connection
    bare, without SQLAlchemy's connection machinery (see ``_Lean``), for a
    transaction of the hot path; the connection goes back to the pool when
    that transaction ends.
    """
    if _PIPELINE in session.info:  # already in one: its writes and sync are the outer block's
        yield
        return
    held: _Lean | None = session.info.get(_LEAN)
    if held is None and lean:
        engine = _lean_engine(session)
        if engine is not None:
            held = session.info[_LEAN] = _Lean(engine)
            # The session's transaction, for what its commit tells (the
            # outbox publishes) and for giving the connection back when it
            # ends; SQLAlchemy gets no connection for it.
            session.begin()
    if held is not None:
        driver, info = held.pooled.driver_connection, held.pooled.info
    else:
        connection = session.connection()
        driver, info = connection.connection.driver_connection, connection.info
    start_pipeline = getattr(driver, "pipeline", None)
    if driver is None or start_pipeline is None or not _pipeline_supported():
        yield
        return
    # In pipeline mode psycopg begins a transaction with a round trip of its
    # own: BEGIN, then a sync to learn that the transaction began. The BEGIN
    # goes with the transaction's other statements instead: an idle
    # connection, not yet in pipeline mode, turns to autocommit (no word to the
    # server), so that psycopg leaves the transaction to the statements sent;
    # the pool turns it back (see _pooled_out_of_pipelines). One round trip
    # and two wake-ups less a transaction.
    begins = (
        not driver.autocommit
        and driver.pgconn.status == _CONNECTION_OK
        and driver.pgconn.transaction_status == _IDLE
        # psycopg's own BEGIN carries these; an engine that sets any keeps it.
        and driver.isolation_level is None
        and driver.read_only is None
        and driver.deferrable is None
        # Only an engine whose pool turns the connection back.
        and bound_to(session) in _RESETTING_ENGINES
    )
    if begins:
        driver.autocommit = True
    entry = _Open(driver, start_pipeline, info)
    if begins:
        entry.began = True
        entry.send("BEGIN", None)
    info[_PIPELINE] = session.info[_PIPELINE] = entry
    try:
        yield
    except BaseException as exc:
        entry = session.info.pop(_PIPELINE, None)
        if entry is not None and not entry.closed:
            entry.forget()
            # Leaves pipeline mode; the block's exception is the one that counts.
            entry.leave(exc)
        raise
    else:
        entry = session.info.pop(_PIPELINE, None)
        if entry is not None and not entry.closed:  # ended without a commit
            entry.forget()
            with _translated_errors(session):
                try:
                    entry.flush()
                except BaseException as exc:
                    # Leaves pipeline mode all the same: the connection goes
                    # back to the pool.
                    entry.leave(exc)
                    raise
                entry.leave()


def _lean_engine(session: Session) -> Engine | None:
    """The engine a session may take a bare connection of (see ``_Lean``); None if it may not."""
    engine = session.bind
    if (
        # Only a CoreSession runs what SQLAlchemy executes on the bare connection.
        not isinstance(session, CoreSession)
        # Nothing of the session's own yet: its transaction will be the lean one.
        or session.in_transaction()
        or not isinstance(engine, Engine)
        # Only an engine whose pool resets what pipelined() does to a connection,
        # for a connection given back with its pipeline or in autocommit.
        or engine not in _RESETTING_ENGINES
        # Execution options (an isolation level, read only) are set up when a
        # Connection is made, which a bare connection skips.
        or engine.get_execution_options()
        or getattr(session, "execution_options", None)
        # Without a pipeline every statement would adopt a Connection anyway.
        or not _pipeline_supported()
    ):
        return None
    return engine


class _Open:
    """A pipeline that :func:`pipelined` opened on a session's connection."""

    def __init__(
        self, driver: Any, start_pipeline: Callable[[], Any], info: dict[str, Any]
    ) -> None:
        self.driver = driver
        self._start_pipeline = start_pipeline
        # psycopg's pipeline, entered when a statement first goes to the driver (see enter).
        self.manager: Any = None
        self.pipeline: Any = None
        self.info = info
        self._blind: Any = None
        # Statements whose results nobody reads, not handed to the driver yet (see send).
        self.pending: list[tuple[str, Any, bool]] = []
        # Why handing them over failed, if it did: the transaction must not commit.
        self.failed: BaseException | None = None
        # Left by the pool: the transaction ended some other way (see _pooled_out_of_pipelines).
        self.closed = False
        # Whether pipelined() turned the connection to autocommit and sent BEGIN itself.
        self.began = False
        # Whether the COMMIT has been handed to the driver (it may have reached the server).
        self.handed_over = False

    def enter(self) -> None:
        """Enter psycopg's pipeline mode, before the first statement goes to the driver.

        Not before: a transaction whose statements are all still held back at
        its commit goes in one write instead (see :meth:`commit_at_once`).
        """
        if self.manager is None:
            manager = self._start_pipeline()
            self.pipeline = manager.__enter__()
            self.manager = manager

    def _hand_over(self) -> None:
        self.handed_over = True

    @property
    def unsent(self) -> bool:
        """Whether the transaction began here and nothing of it has gone to the driver."""
        return self.manager is None and self.began and self.failed is None

    def commit_at_once(
        self, reads: Sequence[tuple[str, Any]] = ()
    ) -> list[list[dict[str, Any]]] | None:
        """Send the whole transaction and its COMMIT in one write; None if it cannot go so.

        Only a transaction that began here (its BEGIN the first statement held
        back) and of which nothing has gone to the driver; ``reads`` run last,
        before the COMMIT, and their rows are returned. See
        :mod:`orchestrator.one_write`.
        """
        if not self.unsent:
            return None
        from orchestrator.one_write import commit_unread  # psycopg only: not for SQLite

        pending, self.pending = self.pending, []
        try:
            return commit_unread(self.driver, pending, reads, before_send=self._hand_over)
        except BaseException as exc:
            self.failed = exc
            raise

    def blind_cursor(self) -> Any:
        """One cursor for every statement whose results nobody reads: writes, checks, COMMIT.

        In pipeline mode a statement's result replaces the one before it on
        its cursor, which these never look at; their errors come out at the
        next sync whatever cursor sent them. A cursor each costs a fifth of
        such a statement's client time.
        """
        if self._blind is None:
            self._blind = self.driver.cursor()
        return self._blind

    def send(self, sql: str, params: Any, *, many: bool = False) -> None:
        """Queue a statement whose results nobody reads; it goes out with the next sync.

        psycopg sends each statement to the server as it is executed; the
        server, done with one before the engine has built the next, sleeps and
        is woken again for each (a step's statements woke it four or five
        times). Held back until the transaction next needs the server (a read,
        any statement SQLAlchemy executes, the commit), they are handed over
        together, in order, and wake it once (see docs/architecture.md).

        The parameters are read when the statement is handed over: they must
        not change until then. An error the server reports comes out at the
        next sync, as before; one the driver raises while handing a statement
        over (a value it cannot send) comes out there, and the transaction can
        no longer commit (see :meth:`flush`).
        """
        self.pending.append((sql, params, many))

    def flush(self) -> None:
        """Hand the statements :meth:`send` held back to the driver, in order.

        If one fails, those before it are with the driver and those after it
        are dropped: the transaction is incomplete, and its commit raises the
        same error again (a caller that caught it must not commit half).
        """
        if self.failed is not None:
            raise self.failed
        self.enter()
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        cursor = self.blind_cursor()
        try:
            for sql, params, many in pending:
                if many:
                    cursor.executemany(sql, params)
                else:
                    cursor.execute(sql, params)
        except BaseException as exc:
            self.failed = exc
            raise

    def leave(self, exc: BaseException | None = None) -> None:
        """Leave pipeline mode (one sync), and autocommit if the transaction has ended.

        An idle connection left in autocommit would commit each statement of
        the session's next work on its own; one still in its transaction (the
        block ended without a commit) is turned back by the pool.
        """
        if self.manager is not None:
            if exc is None:
                self.manager.__exit__(None, None, None)
            else:
                self.manager.__exit__(type(exc), exc, exc.__traceback__)
        if self.began and self.driver.pgconn.transaction_status == _IDLE:
            self.driver.autocommit = False

    def abandon(self) -> None:
        """Drop what was held back and leave pipeline mode, whatever the server says.

        For a transaction that is lost anyway (a refusing check, a connection
        the pool took back): errors of statements queued after the one that
        failed would only be reported again.
        """
        self.closed = True
        self.pending.clear()
        if self.manager is not None:
            with contextlib.suppress(Exception):
                self.manager.__exit__(None, None, None)

    def forget(self) -> None:
        # Before the connection can go back to the pool: its next user must not
        # find this pipeline in the connection's info (the pool keeps that dict).
        if self.info.get(_PIPELINE) is self:
            del self.info[_PIPELINE]


def _pooled_out_of_pipelines(engine: Engine) -> None:
    """Give the pool its connections back as they were: out of pipeline mode, not autocommit.

    ``pipelined`` turns an idle connection to autocommit for the transaction
    it begins itself, and its transaction normally ends through ``commit``,
    which leaves the pipeline. One that ended otherwise while the block was
    open (``session.rollback()``, ``session.close()``) still has its pipeline,
    and its held-back statements, which must not reach the next user.
    """

    _RESETTING_ENGINES.add(engine)

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        entry: _Open | None = record.info.pop(_PIPELINE, None)
        if entry is not None:
            entry.abandon()
        if dbapi_connection is None:
            return
        try:
            if dbapi_connection.pgconn.pipeline_status:
                raise RuntimeError("still in pipeline mode")
            if dbapi_connection.autocommit:
                if dbapi_connection.pgconn.transaction_status != _IDLE:
                    dbapi_connection.rollback()
                dbapi_connection.autocommit = False
        except Exception as exc:
            # Not as the next user must find it: the pool opens a new one.
            log.warning("a pooled connection could not be reset: %s", exc)
            record.invalidate(exc)


@functools.cache
def _pipeline_supported() -> bool:
    from psycopg import Pipeline

    return bool(Pipeline.is_supported())


def _read_results_in_pipeline(engine: Engine) -> None:
    """In pipeline mode, wait for the result of a statement whose rows are read.

    SQLAlchemy looks for a statement's rows as soon as it is sent; in pipeline
    mode they have not arrived yet, so it would see none. Syncing here, before
    it looks, makes a read behave as it does outside a pipeline (and raises its
    errors, or those of the writes before it, through SQLAlchemy as usual).
    """

    @event.listens_for(engine, "before_cursor_execute")
    def _send_held_back(
        connection: Any,
        _cursor: Any,
        _statement: str,
        _parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> None:
        entry = connection.info.get(_PIPELINE)
        if entry is not None:
            entry.flush()

    @event.listens_for(engine, "after_cursor_execute")
    def _sync(
        connection: Any,
        cursor: Any,
        _statement: str,
        _parameters: Any,
        context: Any,
        _executemany: bool,
    ) -> None:
        entry = connection.info.get(_PIPELINE)
        if entry is None or not cursor.connection.pgconn.pipeline_status:
            return
        if context.is_crud and not context.compiled.effective_returning:
            return  # nothing to read: stays in the pipeline
        entry.pipeline.sync()


def read_together(
    session: Session,
    reads: Sequence[tuple[Executable, Mapping[str, Any]]],
    *,
    then_commit: bool = False,
) -> list[list[dict[str, Any]]] | None:
    """Run several statements that return rows with one round trip; their rows, in order.

    Inside :func:`pipelined` the statements are queued one behind the other and
    read after a single sync: each still runs after the one before it has
    finished (a lock it takes is held before the next one runs, and the next
    one sees what it waited for), only the client no longer waits between them.
    With ``then_commit`` the COMMIT joins them in that round trip, as in
    :func:`commit`. Outside a pipeline this returns None, runs nothing, and the
    caller runs them as usual.

    The statements go to the driver's cursor as compiled for the dialect, with
    their parameters as given: only for statements whose parameters and
    columns need no conversion by SQLAlchemy (strings, numbers, times, JSON
    read by the driver).
    """
    entry: _Open | None = session.info.get(_PIPELINE)
    if entry is None:
        return None
    dialect = bound_to(session).dialect
    if then_commit and entry.unsent:
        # Nothing of the transaction has gone yet: all of it goes in one write.
        statements = []
        for statement, params in reads:
            compiled = _compiled(statement, dialect)
            statements.append((compiled.string, compiled.construct_params(dict(params))))
        del session.info[_PIPELINE]
        with _translated_errors(session):
            read = _commit_pipeline(entry, statements)
        session.commit()
        return read
    cursors = []
    with _translated_errors(session):
        try:
            entry.flush()
            for statement, params in reads:
                compiled = _compiled(statement, dialect)
                cursor = entry.driver.cursor()
                cursors.append(cursor)
                cursor.execute(compiled.string, compiled.construct_params(dict(params)))
            if then_commit:
                del session.info[_PIPELINE]
                _commit_pipeline(entry)
            else:
                entry.pipeline.sync()
            rows = []
            for cursor in cursors:
                names = [column.name for column in cursor.description]
                rows.append([dict(zip(names, row, strict=True)) for row in cursor.fetchall()])
        finally:
            for cursor in cursors:
                cursor.close()
    if then_commit:
        session.commit()
    return rows


def queue_checks(session: Session, checks: Sequence[tuple[Executable, Mapping[str, Any]]]) -> bool:
    """Queue statements whose rows nobody reads; False, with nothing run, outside a pipeline.

    A check refuses by raising in the database (a division by zero, see
    :func:`check_refused`). Its error, like any queued statement's, comes out
    at the next sync (a read or the commit) and the transaction is lost, with
    everything queued after the check.
    """
    entry: _Open | None = session.info.get(_PIPELINE)
    if entry is None:
        return False
    dialect = bound_to(session).dialect
    for statement, params in checks:
        compiled = _compiled(statement, dialect)
        entry.send(compiled.string, compiled.construct_params(dict(params)))
    return True


def check_refused(exc: DBAPIError) -> bool:
    """Whether ``exc`` is a check of :func:`queue_checks` refusing (SQLSTATE 22012)."""
    return getattr(exc.orig, "sqlstate", None) == "22012"


def abandon_pipeline(session: Session) -> None:
    """Leave the pipeline of a transaction a refusing check has lost, without a word.

    The statements queued after the check fail with it; leaving pipeline mode
    reports them again, and nothing is to be learned from that.
    """
    entry: _Open | None = session.info.pop(_PIPELINE, None)
    if entry is not None:
        entry.forget()
        entry.abandon()


def _statements(dialect: Any) -> dict[Any, Any]:
    """The compiled statements of one dialect, kept on it.

    An engine's own JSON serializer is part of its dialect, and the compiled
    forms refer to it: kept on the dialect, they go when its engine goes. The
    keys are the statements' identities, and each entry keeps its statement.
    """
    cache: dict[Any, Any] = dialect.__dict__.setdefault("_orchestrator_statements", {})
    if len(cache) > _STATEMENTS_KEPT:
        # Only module constants belong here; a statement built per call would
        # otherwise grow this without end. Compiling again is all it costs.
        cache.clear()
    return cache


_STATEMENTS_KEPT = 1000


def write(
    session: Session,
    statement: Executable,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> None:
    """Run a write nobody reads the result of; in a pipeline, without SQLAlchemy's execution.

    Outside a pipeline, or for a statement SQLAlchemy must prepare at each
    execution (Python-side defaults, expanding or escaped parameters, a
    RETURNING), this is ``session.execute``. Otherwise the statement, compiled
    once for these parameter names, goes to the driver's cursor with each value
    bound as SQLAlchemy binds it (its type's bind processing): the same SQL,
    without SQLAlchemy's per-execution machinery, a third of a write's client
    time. It goes with the transaction's next sync (see ``_Open.send``), so
    ``params`` must not change until then. Several rows of a plain insert go
    as one statement (see ``_rows_shape``). Only for statements built once
    (module constants): the compiled form is kept by the statement's identity.
    Its errors come at the next sync.
    """
    entry: _Open | None = session.info.get(_PIPELINE)
    rows = [params] if isinstance(params, Mapping) else list(params)
    if entry is None or not rows:
        session.execute(statement, params)
        return
    dialect = bound_to(session).dialect
    names = tuple(sorted(rows[0]))
    key = ("write", id(statement), names)
    writes = _statements(dialect)
    cached: _CompiledWrite | None = writes.get(key)
    if cached is None or cached.statement is not statement:
        compiled: Any = statement.compile(dialect=dialect, column_keys=list(names))  # type: ignore[attr-defined]
        direct = not (
            compiled.insert_prefetch
            or compiled.update_prefetch
            or compiled.literal_execute_params
            or compiled.post_compile_params
            or compiled.escaped_bind_names
            or compiled.effective_returning
        )
        cached = _CompiledWrite(statement, compiled, compiled._bind_processors if direct else None)
        writes[key] = cached
    compiled, processors = cached.compiled, cached.processors
    if processors is None:
        session.execute(statement, params)
        return
    values = []
    for row in rows:
        bound = compiled.construct_params(row)
        for name, process in processors.items():
            if name in bound:
                bound[name] = process(bound[name])
        values.append(bound)
    if len(values) == 1:
        entry.send(compiled.string, values[0])
        return
    shape = cached.rows_shape
    if shape is None:
        entry.send(compiled.string, values, many=True)
        return
    order, sql_for = shape
    for start in range(0, len(values), _ROWS_PER_INSERT):
        chunk = values[start : start + _ROWS_PER_INSERT]
        entry.send(sql_for(len(chunk)), [row[name] for row in chunk for name in order])


# The most rows one insert statement carries. Several rows in one statement are
# one Bind and Execute instead of one each: for two rows, a tenth less work in
# all (client, server) than ``executemany``.
_ROWS_PER_INSERT = 50
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_INSERT_HEAD = re.compile(r"^INSERT INTO [^()]+ \([^()]*\) VALUES ", re.DOTALL)


def _values_row(sql: str) -> tuple[str, str] | None:
    """(head, row) of ``INSERT INTO t (columns) VALUES (row)`` with nothing after the row.

    The row is the first parenthesized group after VALUES, its parentheses
    balanced; anything after it (``ON CONFLICT ...``, ``RETURNING ...``), a
    quoted literal (whose parentheses would not count) or an escaped percent
    sign (``%%``, a literal the placeholders must not be read in) disqualifies.
    """
    head = _INSERT_HEAD.match(sql)
    if head is None or "'" in sql or "%%" in sql:
        return None
    depth = 0
    for index in range(head.end(), len(sql)):
        depth += {"(": 1, ")": -1}.get(sql[index], 0)
        if depth == 0:
            return (sql[: head.end()], sql[head.end() :]) if index == len(sql) - 1 else None
    return None


class _CompiledWrite:
    """A write statement compiled for one set of parameter names, as ``write`` keeps it."""

    __slots__ = ("compiled", "processors", "rows_shape", "statement")

    def __init__(self, statement: Executable, compiled: Any, processors: Any) -> None:
        self.statement = statement
        self.compiled = compiled
        # Each parameter's bind processing; None if SQLAlchemy must execute it.
        self.processors = processors
        self.rows_shape = _rows_shape(compiled.string)


def _rows_shape(sql: str) -> tuple[list[str], Callable[[int], str]] | None:
    """How to send several rows of the insert ``sql`` at once; None if it cannot be.

    Only ``INSERT INTO t (columns) VALUES (...)`` with nothing after it (no
    ``ON CONFLICT``, no ``RETURNING``) qualifies: the parameter names in the
    order of the row's placeholders, and the statement for a number of rows,
    with positional placeholders.
    """
    parts = _values_row(sql)
    if parts is None:
        return None
    head, row = parts
    order = _PLACEHOLDER.findall(row)
    row = _PLACEHOLDER.sub("%s", row)

    @functools.cache
    def sql_for(count: int) -> str:
        return head + ", ".join([row] * count)

    return (order, sql_for) if order else None


def _compiled(statement: Executable, dialect: Any) -> Any:
    # By identity: the hot path's statements are built once, at import.
    compiled = _statements(dialect)
    cached = compiled.get(id(statement))
    if cached is None or cached[0] is not statement:
        cached = (statement, statement.compile(dialect=dialect))  # type: ignore[attr-defined]
        compiled[id(statement)] = cached
    return cached[1]


def commit(session: Session, *, committed: Callable[[], None] | None = None) -> None:
    """Commit; inside :func:`pipelined`, the COMMIT joins the pending writes.

    The COMMIT is queued behind the writes and leaving pipeline mode sends them
    all with one sync (an error of any of them is raised here). Then
    SQLAlchemy's own commit finds nothing left to commit, runs its hooks (the
    outbox publishes) and returns the connection to the pool, never in
    pipeline mode. ``committed`` runs once the database has committed: in a
    pipeline before those hooks, so before anyone hears of the commit;
    elsewhere after them.
    """
    entry = session.info.pop(_PIPELINE, None)
    if entry is not None:
        try:
            with _translated_errors(session):
                _commit_pipeline(entry)
        except BaseException:
            if entry.handed_over:
                session.info[_COMMIT_HANDED_OVER] = True
            raise
        if committed is not None:
            committed()
            committed = None
    try:
        session.commit()
    except BaseException:
        # Outside a pipeline the COMMIT goes at once: on PostgreSQL it may have
        # committed whatever came after (SQLite commits, or not, in process).
        if bound_to(session).dialect.name == "postgresql":
            session.info[_COMMIT_HANDED_OVER] = True
        raise
    if committed is not None:
        committed()


_COMMIT_HANDED_OVER = "orchestrator.commit_handed_over"


def commit_handed_over(session: Session) -> bool:
    """Whether a :func:`commit` of ``session`` that failed may have reached the database.

    True once its COMMIT was handed to the driver (or the connection was lost
    under a plain commit): the error may have come after the database
    committed. False if it failed before that: nothing was committed.
    """
    return bool(session.info.get(_COMMIT_HANDED_OVER, False))


def _commit_pipeline(
    entry: _Open, reads: Sequence[tuple[str, Any]] = ()
) -> list[list[dict[str, Any]]] | None:
    """Queue the COMMIT and leave pipeline mode: one sync for everything queued.

    Or, for a transaction nothing of which has gone to the driver, one write
    with ``reads`` last (their rows are returned; only given for such a one).
    """
    entry.forget()
    try:
        rows = entry.commit_at_once(reads)
        if rows is None:
            entry.flush()
            entry.handed_over = True
            entry.blind_cursor().execute("COMMIT")
    except BaseException as exc:
        entry.leave(exc)
        raise
    entry.leave()
    return rows


@contextlib.contextmanager
def _translated_errors(session: Session) -> Iterator[None]:
    """Raise the driver's errors met outside SQLAlchemy as SQLAlchemy's, as it would.

    A lost connection is invalidated and the pool replaced, as SQLAlchemy does
    when a statement finds the database gone, so that
    :func:`once_more_on_disconnect` runs the transaction again on a fresh
    connection rather than on another dead pooled one.
    """
    try:
        yield
    except BaseException as exc:
        bind = bound_to(session)
        dialect = bind.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        if not isinstance(exc, dbapi_error):
            # Anything else (an interrupt, a timeout) that left the driver's
            # connection closed (one_write closes one it broke off on): the
            # pool must not hand it out again, and the session's rollback must
            # not fail on it and hide this exception.
            if session.in_transaction():  # else no connection of its own to look at
                connection = session.connection()
                if getattr(connection.connection.driver_connection, "closed", False):
                    connection.invalidate(exc)
            raise
        connection = session.connection()
        lost = dialect.is_disconnect(exc, connection.connection.driver_connection, None)
        if lost:
            connection.invalidate(exc)
            if isinstance(bind, Engine):
                bind.dispose(close=False)
        raise DBAPIError.instance(
            None, None, exc, dbapi_error, connection_invalidated=lost, dialect=dialect
        ) from exc


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, class_=CoreSession, expire_on_commit=False)
