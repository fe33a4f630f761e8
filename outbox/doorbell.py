"""Wakes listening relays after a commit, from outside the committing transaction."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

from sqlalchemy import Engine

from outbox.dedicated import ASYNC_COMMIT, OwnConnection
from outbox.schema import NOTIFY_CHANNEL

_log = logging.getLogger("outbox")

# Every notification since the last send, in one statement (one transaction).
_NOTIFY = "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS n(c, p)"
# A failing database is not asked again for each ring.
_QUIET_AFTER_FAILURE = 1.0
# An idle thread ends, closing its connection (the next ring starts another).
_IDLE_EXIT = 10.0


class Doorbell:
    """Sends ``NOTIFY`` (by default on :data:`NOTIFY_CHANNEL`) from a background thread.

    PostgreSQL serializes the transactions that notify, from their ``NOTIFY``
    to the end of their commit, disk flush included. Notifying from the
    transactions that write outbox rows (a trigger did, once) made each such
    commit wait for the previous one's flush: six connections committing a row
    each lost a third of their commits to it (``python -m bench.micro``). Here
    a ring only marks the bell; the thread sends, in one transaction of its
    own that does not wait for the disk, on a connection of its own (one round
    trip, outside the engine's pool, closed when idle), the notifications of
    all the rings that came since its last send (they pile up while a send is
    under way). A lost ring (a crash, a
    database error) delays the rows until a relay's safety poll, nothing more.
    Other channels may ride along (the engine announces closed runs this way
    to those waiting for their results); each distinct payload since the last
    send goes out once.
    """

    def __init__(self, engine: Engine, connection: OwnConnection | None = None) -> None:
        self._wake = threading.Condition()
        self._rung: dict[tuple[str, str], None] = {}
        self._sending = False
        self._pid = 0
        # Each notification is a transaction of its own that need not wait for
        # the disk: a lost one only leaves rows to the poll. The connection
        # may be shared with others of the same kind (see OutboxWriter).
        self._conn = connection or OwnConnection(engine, ASYNC_COMMIT)
        self._closed = False
        # Through a weak reference: the hook must not keep this (and its engine) alive.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget(this))
        # A short script's last rings still go out when it exits.
        atexit.register(_send_at_exit, this)

    def _forget(self) -> None:
        # A forked child starts clean: its parent's lock may be held by a thread
        # that does not exist here.
        self._wake = threading.Condition()
        self._rung = {}
        self._sending = False
        self._pid = 0

    def ring(self, channel: str = NOTIFY_CHANNEL, payload: str = "") -> None:
        """Ask for a notification after the caller's commit; returns at once."""
        with self._wake:
            if self._closed:
                return
            self._rung[(channel, payload)] = None
            if self._pid != os.getpid():
                # First use in this process (a forked child inherits no thread).
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="outbox-doorbell", daemon=True).start()
            self._wake.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every ring so far has been sent (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._rung or self._sending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Send what was rung (waiting up to ``timeout``), then stop and close the connection."""
        self.wait_idle(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                idle_until = time.monotonic() + _IDLE_EXIT
                while not self._rung:
                    remaining = idle_until - time.monotonic()
                    if remaining <= 0 or self._closed:
                        self._pid = 0
                        self._conn.close()
                        return
                    self._wake.wait(remaining)
                rung, self._rung = list(self._rung), {}
                self._sending = True
            sent = self._send(rung)
            with self._wake:
                self._sending = False
                self._wake.notify_all()
            if not sent:
                time.sleep(_QUIET_AFTER_FAILURE)

    def _send(self, rung: list[tuple[str, str]]) -> bool:
        channels, payloads = zip(*rung, strict=True)
        try:
            self._conn.execute(_NOTIFY, (list(channels), list(payloads)))
        except Exception as exc:
            _log.warning("notifying failed, those listening will find out by polling: %s", exc)
            return False
        return True


def _forget(ref: weakref.ref[Doorbell]) -> None:
    doorbell = ref()
    if doorbell is not None:
        doorbell._forget()


def _send_at_exit(ref: weakref.ref[Doorbell]) -> None:
    doorbell = ref()
    if doorbell is not None:
        doorbell.wait_idle(1.0)
