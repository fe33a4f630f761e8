"""Pipelined transactions on PostgreSQL: statements held back and sent with the next sync.

:func:`pipelined` opens a transaction whose writes wait in the client until it
next needs the server (a read, the commit); :func:`commit` sends them with
the COMMIT, and :func:`read_together` reads several statements' rows with one
round trip. A transaction nothing of which has gone yet goes in one write
(:mod:`orchestrator.one_write`). Engines from
:func:`orchestrator.db.create_db_engine` get the pool and cursor hooks these
need (:func:`prepare_engine`); elsewhere (SQLite, a libpq without pipeline
mode) the functions here fall back to plain execution.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, Executable, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from orchestrator.sessions import LEAN, CoreSession, LeanConnection, bound_to

log = logging.getLogger("orchestrator.db")


def prepare_engine(engine: Engine) -> None:
    """Give a PostgreSQL engine the hooks pipelined transactions rely on."""
    _read_results_in_pipeline(engine)
    _pooled_out_of_pipelines(engine)


def current_pipeline(session: Session) -> OpenPipeline | None:
    """The pipeline :func:`pipelined` opened on ``session``, if one is open."""
    entry: OpenPipeline | None = session.info.get(_PIPELINE)
    return entry


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
    back until it next waits anyway (see ``OpenPipeline.send``). One whose rows are
    read waits as usual, after everything before it. With :func:`commit`, a
    transition's writes and its COMMIT share one round trip instead of one
    each; a transaction that read nothing by then goes in one write
    (:mod:`orchestrator.one_write`), and psycopg's pipeline mode, entered only
    when a statement first goes to the driver, is never entered for it.
    Elsewhere (SQLite, a libpq without pipeline mode) this does nothing.

    ``lean``: a session with no transaction yet takes its pooled connection
    bare, without SQLAlchemy's connection machinery (see
    :class:`~orchestrator.sessions.LeanConnection`), for a transaction of the
    hot path; the connection goes back to the pool when that transaction
    ends.
    """
    if _PIPELINE in session.info:  # already in one: its writes and sync are the outer block's
        yield
        return
    held: LeanConnection | None = session.info.get(LEAN)
    if held is None and lean:
        engine = _lean_engine(session)
        if engine is not None:
            held = session.info[LEAN] = LeanConnection(engine)
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
    entry = OpenPipeline(driver, start_pipeline, info)
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
    """The engine a session may take a bare connection of (``lean``); None if it may not."""
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


class OpenPipeline:
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
        entry: OpenPipeline | None = record.info.pop(_PIPELINE, None)
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
    entry: OpenPipeline | None = session.info.get(_PIPELINE)
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
    entry: OpenPipeline | None = session.info.get(_PIPELINE)
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
    entry: OpenPipeline | None = session.info.pop(_PIPELINE, None)
    if entry is not None:
        entry.forget()
        entry.abandon()


def compiled_statements(dialect: Any) -> dict[Any, Any]:
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


def _compiled(statement: Executable, dialect: Any) -> Any:
    # By identity: the hot path's statements are built once, at import.
    compiled = compiled_statements(dialect)
    cached = compiled.get(id(statement))
    if cached is None or cached[0] is not statement:
        cached = (statement, statement.compile(dialect=dialect))  # type: ignore[attr-defined]
        compiled[id(statement)] = cached
    return cached[1]


@event.listens_for(Session, "before_commit")
def _commit_pipeline_first(session: Session) -> None:
    # A commit that bypasses commit() below, inside pipelined(): the pipeline's
    # statements and its COMMIT go first, as commit() would send them (the
    # driver, which learns of the transaction only at a sync, would otherwise
    # find nothing to commit). A savepoint's release only needs them sent.
    entry: OpenPipeline | None = session.info.get(_PIPELINE)
    if entry is None:
        return
    if session.in_nested_transaction():
        entry.flush()
        return
    del session.info[_PIPELINE]
    with _translated_errors(session):
        _commit_pipeline(entry)


@event.listens_for(Session, "after_transaction_end")
def _drop_closed_pipeline(session: Session, transaction: Any) -> None:
    # A pipeline whose connection went back to the pool (a rollback or a
    # close inside pipelined()): the session's next transaction has none. Runs
    # after orchestrator.sessions' hook of the same event (registered first, on
    # import), whose release of a lean connection is what closes its pipeline.
    if transaction.parent is None:
        entry: OpenPipeline | None = session.info.get(_PIPELINE)
        if entry is not None and entry.closed:
            del session.info[_PIPELINE]


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
    entry: OpenPipeline, reads: Sequence[tuple[str, Any]] = ()
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
