"""A PostgreSQL connection of its own, outside an engine's pool, in autocommit mode."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine

_log = logging.getLogger("outbox")


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
    """A thread's :func:`dedicated_connection`, made on first use and again after a failure.

    Each statement runs on its own, autocommitting (one round trip). A
    statement that fails closes the connection, and the next one opens
    another. After a fork the child leaves its parent's connection alone
    (closing it would end the parent's session too) and opens its own. Threads
    take turns.
    """

    def __init__(self, engine: Engine, setup: Sequence[Any] = ()) -> None:
        self._engine = engine
        self._setup = tuple(setup)
        self._conn: Any = None
        self._lock = threading.Lock()
        # Connections a forked child inherited: kept, unused, so that nothing closes them.
        self._inherited: list[Any] = []

    def execute(self, statement: str, params: Any = None) -> None:
        """Run ``statement``; on any error the connection is closed and the error raised."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = dedicated_connection(self._engine, self._setup)
                cursor = self._conn.cursor()
                try:
                    cursor.execute(statement, params)
                finally:
                    cursor.close()
            except Exception:
                self._close()
                raise

    def forget(self) -> None:
        """In a forked child: the parent's connection is not this process's to use or close."""
        # The parent's lock may be held by a thread that does not exist here.
        self._lock = threading.Lock()
        if self._conn is not None:
            self._inherited.append(self._conn)
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing a broken connection
                _log.debug("closing a dedicated connection failed", exc_info=True)
