"""A PostgreSQL connection of its own, outside an engine's pool, in autocommit mode."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine

_log = logging.getLogger("outbox")

#: Set up a connection whose transactions do not wait for the disk.
ASYNC_COMMIT = ("SET synchronous_commit TO off",)


def dedicated_connection(engine: Engine, setup: Sequence[Any] = ()) -> Any:
    """The driver connection of a new connection of ``engine``, detached and autocommitting.

    Detached, it keeps the engine's connect arguments and hooks but takes no
    pool slot for as long as it lives (a listener, a notifier). ``setup``
    statements (``LISTEN``, a ``SET``) run first; if one fails, the connection
    is closed and the error raised.
    """
    raw = engine.raw_connection()
    # Read before detaching: a detached connection no longer reports it.
    driver: Any = raw.driver_connection
    raw.detach()
    try:
        driver.rollback()
        driver.autocommit = True
        cursor = driver.cursor()
        try:
            for statement in setup:
                cursor.execute(statement)
        finally:
            cursor.close()
    except BaseException:
        driver.close()
        raise
    return driver


class OwnConnection:
    """A :func:`dedicated_connection` for background threads, made when first needed.

    Each statement runs on its own, autocommitting (one round trip); threads
    take turns. One that fails closes the connection, and the next opens
    another; one that finds a connection the database dropped since its last
    use (a restart) runs once more on a new one. After a fork the child
    leaves its parent's connection alone (closing it would end the parent's
    session too) and opens its own.
    """

    def __init__(self, engine: Engine, setup: Sequence[Any] = ()) -> None:
        self._engine = engine
        self._setup = tuple(setup)
        self._conn: Any = None
        self._lock = threading.Lock()
        # Connections a forked child inherited: kept, unused, so that nothing closes them.
        self._inherited: list[Any] = []
        # Through a weak reference: the hook must not keep this (and its engine) alive.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget(this))

    def execute(self, statement: str, params: Any = None) -> None:
        """Run ``statement``; on an error the connection is closed and the error raised."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._run(statement, params)
                    return
                except Exception:
                    dropped = bool(getattr(self._conn, "broken", False))
                    self._close()
                    if not dropped:
                        raise
                except BaseException:
                    # An interrupt may leave it half used: the next statement opens another.
                    self._close()
                    raise
            self._conn = dedicated_connection(self._engine, self._setup)
            try:
                self._run(statement, params)
            except BaseException:
                self._close()
                raise

    def _run(self, statement: str, params: Any) -> None:
        cursor = self._conn.cursor()
        try:
            cursor.execute(statement, params)
        finally:
            cursor.close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _forget(self) -> None:
        # The parent's lock may be held by a thread that does not exist here.
        self._lock = threading.Lock()
        if self._conn is not None:
            self._inherited.append(self._conn)
            self._conn = None

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken connection
                _log.debug("closing a dedicated connection failed", exc_info=True)


def _forget(ref: weakref.ref[OwnConnection]) -> None:
    connection = ref()
    if connection is not None:
        connection._forget()
