"""The state store's sessions: Core statements on their connection, hooks on a transaction's end.

A session of the engine is a :class:`CoreSession`. Its transaction may hold a
pooled connection bare (:class:`LeanConnection`, taken by
:func:`orchestrator.pipeline.pipelined`), given back when the transaction
ends. Work registered with :func:`after_commit` runs once the transaction
has committed, and with :func:`on_close` when the session closes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection, Engine, Executable, Result, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

log = logging.getLogger("orchestrator.db")


class CoreSession(Session):
    """A session that runs Core statements on its connection directly.

    The state store maps no classes, so the ORM's execute path (its events,
    bind lookup and result set-up) does nothing here but costs about a quarter of
    a short statement's client time, on every statement of the hot path.

    A session that :func:`orchestrator.pipeline.pipelined` gave a bare pooled
    connection (``lean``) runs everything SQLAlchemy executes on that same
    connection.
    """

    def get_bind(self, *args: Any, **kwargs: Any) -> Any:
        held: LeanConnection | None = self.info.get(LEAN)
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
                held: LeanConnection | None = self.info.pop(LEAN, None)
                if held is not None:
                    held.release()
            finally:
                for finalize in finalizers or ():
                    finalize(self)


# session.info key: the lean connection of the session's transaction, if it has one.
LEAN = "orchestrator.lean"


class LeanConnection:
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
    held: LeanConnection | None = session.info.get(LEAN)
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


@event.listens_for(Session, "after_transaction_end")
def _drop_after_commit(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_AFTER_COMMIT, None)
        # A lean connection goes back with its transaction (its adopted
        # Connection's transaction has just been closed): the pool's checkin
        # drops a pipeline still on it, and what it held back. Registered
        # before the pipeline's own hook (orchestrator.pipeline imports this
        # module), which looks for pipelines the checkin closed.
        held: LeanConnection | None = session.info.pop(LEAN, None)
        if held is not None:
            held.release()


def on_close(session: Session, finalize: Callable[[Session], object]) -> None:
    """Have ``finalize(session)`` run when ``session`` closes, however its work ended.

    For state a transaction holds outside the database (workflow instances it
    took from a cache): a commit hands it on and clears it, and whatever is
    left when the session closes is let go of.
    """
    finalizers: list[Callable[[Session], object]] = session.info.setdefault(_ON_CLOSE, [])
    if finalize not in finalizers:
        finalizers.append(finalize)
