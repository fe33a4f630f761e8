"""Waiting for a run to close: told by a notification, not by polling (PostgreSQL).

A worker that closes a run announces it after the commit: its outbox's
doorbell sends ``NOTIFY orchestrator_run_closed, '<run id>'`` from a background
thread, in a transaction of its own (never in the closing one, which would
serialize every closing commit through PostgreSQL's notification lock).

A process where someone waits for results (``handle.result()``) keeps one
connection listening on that channel while anyone waits, and wakes the waiters
of the runs it hears about; they read the run once more. A waiter still reads
the run four times a second, so a lost notification (a crash between the
commit and the announcement, a dropped listening connection) costs at most that
much delay. Every listening process hears of every closed run: the traffic is
one short notification per closed run per listening process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

from psycopg import sql
from sqlalchemy import Engine

from outbox.dedicated import dedicated_connection

log = logging.getLogger("orchestrator.results")

RUN_CLOSED_CHANNEL = "orchestrator_run_closed"

# How long a first waiter waits for the connection to be listening, before it
# polls instead.
_READY_TIMEOUT = 2.0
# Listening stops this long after the last waiter left (the next one starts it again).
_IDLE_EXIT = 10.0
# After a failure to listen, waiters poll for this long before it is tried again.
_RETRY_AFTER = 5.0
# How often the listening thread looks up from the connection (to stop, to idle out).
_TURN = 0.2


class ClosedRuns:
    """The waiters of this process, by run id, and the connection that hears for them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._forget()
        # Through a weak reference: the hook must not keep this (and its engine) alive.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget(this))

    def _forget(self) -> None:
        # A forked child has no listening thread; it starts its own when needed.
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._listening: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._failed_until = 0.0
        self._closed = False

    def subscribe(self, run_id: str) -> threading.Event | None:
        """An event set when ``run_id`` may have closed; None if this process cannot listen.

        Subscribe before reading the run: a close committed after the
        subscription is heard, one committed before it is read.
        """
        event = threading.Event()
        with self._lock:
            if self._closed or time.monotonic() < self._failed_until:
                return None
            self._waiters.setdefault(run_id, set()).add(event)
            listening = self._listening
            if listening is None:
                listening = self._listening = threading.Event()
                self._thread = threading.Thread(
                    target=self._listen, args=(listening,), name="run-closed-listener", daemon=True
                )
                self._thread.start()
        # Set once listening, or at once when connecting failed.
        if not listening.wait(_READY_TIMEOUT) or time.monotonic() < self._failed_until:
            self.unsubscribe(run_id, event)
            return None
        return event

    def unsubscribe(self, run_id: str, event: threading.Event) -> None:
        with self._lock:
            waiting = self._waiters.get(run_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiters[run_id]

    def _listen(self, listening: threading.Event) -> None:
        conn: Any = None
        try:
            conn = self._connect()
            listening.set()
            idle_since: float | None = None
            while True:
                for note in conn.notifies(timeout=_TURN):
                    with self._lock:
                        for event in self._waiters.get(note.payload, ()):
                            event.set()
                with self._lock:
                    if self._closed:
                        self._listening = None
                        return
                    if self._waiters:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= _IDLE_EXIT:
                        self._listening = None
                        return
        except Exception as exc:
            log.warning("listening for closed runs failed, waiters poll instead: %s", exc)
            with self._lock:
                self._failed_until = time.monotonic() + _RETRY_AFTER
                self._listening = None
                listening.set()
                # Whoever waits reads the run again, then polls.
                for waiting in self._waiters.values():
                    for event in waiting:
                        event.set()
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # pragma: no cover - closing a broken connection
                    log.debug("closing the listening connection failed", exc_info=True)

    def close(self, timeout: float = 2.0) -> None:
        """Stop listening (waiters left poll) and wait a little for the connection to close."""
        with self._lock:
            self._closed = True
            thread = self._thread
            for waiting in self._waiters.values():
                for event in waiting:
                    event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _connect(self) -> Any:
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(RUN_CLOSED_CHANNEL))
        return dedicated_connection(self._engine, [listen])


def _forget(ref: weakref.ref[ClosedRuns]) -> None:
    closed_runs = ref()
    if closed_runs is not None:
        closed_runs._forget()


def can_listen(engine: Engine) -> bool:
    """Whether runs closing can be heard of on ``engine`` (PostgreSQL through psycopg)."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
