"""Database engines for the state store, on PostgreSQL or SQLite."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from orchestrator.pipeline import prepare_engine
from orchestrator.sessions import CoreSession


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
    prepare_engine(engine)
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


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, class_=CoreSession, expire_on_commit=False)
