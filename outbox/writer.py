"""Records outbox messages in the caller's transaction and publishes them after commit."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, event, insert, text, update
from sqlalchemy.orm import Session, SessionTransaction

from outbox.crashpoints import crash_point
from outbox.dedicated import ASYNC_COMMIT, OwnConnection
from outbox.doorbell import Doorbell
from outbox.errors import PublishError
from outbox.message import OutboxMessage
from outbox.publisher import Publisher
from outbox.schema import outbox_messages

_log = logging.getLogger("outbox")

# Each row binds about ten parameters; PostgreSQL caps a statement at 65535.
_INSERT_CHUNK = 1000
_UPDATE_CHUNK = 1000
# Inline: no RETURNING of the generated seq, which nothing reads.
_INSERT = insert(outbox_messages).inline()
# session.info key: the writers with messages in the session's transaction, and theirs.
_WRITERS = "outbox.writers"

#: How rows go into the caller's session: ``insert(session, statement, rows)``.
Insert = Callable[[Session, Any, list[dict[str, Any]]], None]


def _execute(session: Session, statement: Any, rows: list[dict[str, Any]]) -> None:
    session.execute(statement, rows)


_ASYNC_COMMIT = text("SET LOCAL synchronous_commit TO OFF")
# The batched marks on PostgreSQL: one statement, on the writer's own connection.
_MARK_ALL = (
    f"UPDATE {outbox_messages.name} SET published_at = %s, "
    "publish_attempts = publish_attempts + 1 WHERE id = ANY(%s)"
)

_T = TypeVar("_T")


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class _Pending:
    message: OutboxMessage
    # The innermost (possibly savepoint) transaction the row was inserted in, so
    # rolling back a savepoint forgets exactly the messages it undid.
    transaction: SessionTransaction


def _within(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


class _Marker:
    """Collects published ids and marks them in batches from a background thread."""

    _FLUSH_EVERY = 0.02
    _BATCH = 500

    def __init__(self, mark: Callable[[Sequence[str]], None]) -> None:
        self._mark = mark
        self._ids: list[str] = []
        self._wake = threading.Condition()
        self._pid = 0
        atexit.register(self.flush)
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # A forked child starts clean: its parent's lock may be held by a thread
        # that does not exist here, and the parent marks its own ids.
        self._wake = threading.Condition()
        self._ids = []
        self._pid = 0

    def add(self, ids: Sequence[str]) -> None:
        with self._wake:
            self._ids.extend(ids)
            if self._pid != os.getpid():
                # First use in this process (a forked child inherits no thread).
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="outbox-marker", daemon=True).start()
            if len(self._ids) >= self._BATCH:
                self._wake.notify()

    def flush(self) -> None:
        with self._wake:
            ids, self._ids = self._ids, []
        if ids:
            try:
                for chunk in _chunks(ids, _UPDATE_CHUNK):
                    self._mark(chunk)
            except Exception:
                _log.exception("marking %d published outbox message(s) failed", len(ids))

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait(self._FLUSH_EVERY)
            self.flush()


class OutboxWriter:
    """Writes outbox rows through the caller's session and publishes them once committed.

    Rows share the fate of the caller's transaction. After the outermost commit,
    the messages are published at once from the committing thread and then
    marked published; anything that fails on that path (a crash, a broker
    outage) stays unpublished in the table, where the relay picks it up. On
    PostgreSQL a commit that leaves rows to the relay (relay-only kinds, rows
    not published after commit, a failed publish) wakes listening relays
    through a :class:`~outbox.doorbell.Doorbell`, after the commit.

    Args:
        engine: Engine used for the short transactions that mark rows published
            and wake relays.
        publisher: Where messages go after commit.
        publish_after_commit: Whether to publish right after commit. When
            ``False`` only the relay publishes. Defaults to ``True``.
        relay_only_kinds: Message kinds never published after commit, only by
            the relay: a relay that claims rows in ``seq`` order can keep one
            aggregate's messages in commit order, which publishing from every
            committing process at once cannot. Defaults to none.
        batch_marks: Mark published rows from a background thread, many per
            statement, instead of one transaction per commit. A mark lost to a
            crash only means the relay sends that message again, which
            consumers drop. Defaults to ``False``.
        insert: How the rows go into the session, ``insert(session, statement,
            rows)``; for an engine with a faster way to run a constant
            statement. Defaults to ``session.execute(statement, rows)``.
    """

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        *,
        publish_after_commit: bool = True,
        relay_only_kinds: Collection[str] = (),
        batch_marks: bool = False,
        insert: Insert = _execute,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.publish_after_commit = publish_after_commit
        self.relay_only_kinds = frozenset(relay_only_kinds)
        self._insert = insert
        self._postgres = engine.dialect.name == "postgresql"
        # The doorbell's and the batched marks' connection (PostgreSQL): both
        # send short statements that need not wait for the disk (a lost ring
        # only leaves rows to the poll, a lost mark only sends them again).
        self._own = OwnConnection(engine, ASYNC_COMMIT) if self._postgres else None
        self._marker: _Marker | None = None
        if batch_marks and self._own is not None:
            # One statement a batch: one round trip, not a pooled transaction's four.
            own = self._own
            self._marker = _Marker(lambda ids: _mark_all(own, ids))
        elif batch_marks:
            self._marker = _Marker(self._mark_published)
        self.doorbell = Doorbell(engine, self._own) if self._own is not None else None

    def add(self, session: Session, messages: Iterable[OutboxMessage]) -> None:
        """Insert ``messages`` in ``session``'s current transaction.

        They are published after that transaction commits and forgotten if it
        (or the savepoint they were added in) rolls back.
        """
        batch = list(messages)
        if not batch:
            return
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = [
            {
                "id": message.id,
                "kind": message.kind,
                "destination": message.destination,
                "queue": message.queue,
                "aggregate_id": message.aggregate_id,
                "body": message.body,
                "headers": message.headers,
                "created_at": now,
                "publish_attempts": 0,
            }
            for message in batch
        ]
        for chunk in _chunks(rows, _INSERT_CHUNK):
            self._insert(session, _INSERT, list(chunk))
        if self.doorbell is None:
            if not self.publish_after_commit:
                return
            # Without a doorbell only the messages published after commit matter here.
            batch = [message for message in batch if self._publishes(message)]
            if not batch:
                return
        transaction = session.get_nested_transaction() or session.get_transaction()
        if transaction is None:  # pragma: no cover - execute() always begins one
            raise RuntimeError("session has no transaction after an insert")
        writers: dict[OutboxWriter, list[_Pending]] = session.info.setdefault(_WRITERS, {})
        writers.setdefault(self, []).extend(_Pending(message, transaction) for message in batch)

    def close(self) -> None:
        """Mark what was published and send the pending wake-ups (a clean shutdown)."""
        if self._marker is not None:
            self._marker.flush()
        if self.doorbell is not None:
            self.doorbell.close()
        if self._own is not None:
            self._own.close()

    def _publishes(self, message: OutboxMessage) -> bool:
        """Whether this writer publishes ``message`` after commit (else only the relay does)."""
        return self.publish_after_commit and message.kind not in self.relay_only_kinds

    def _after_commit(self, session: Session) -> None:
        # Releasing a savepoint also reports a commit; only the outermost one
        # makes the rows visible to the world.
        if session.in_nested_transaction():
            return
        pending: list[_Pending] | None = session.info.get(_WRITERS, {}).get(self)
        if not pending:
            return
        messages = [item.message for item in pending if self._publishes(item.message)]
        for_relay = len(messages) < len(pending)
        pending.clear()
        if for_relay:
            self._ring()
        if not messages:
            return
        crash_point("outbox.after_commit")
        # The caller's commit already succeeded; raising from here would make it
        # look failed, so every problem is logged and left to the relay.
        try:
            self.publisher.publish(messages)
        except PublishError as exc:
            _log.warning(
                "publishing %d outbox message(s) after commit failed, the relay will retry: %s",
                len(messages),
                exc,
            )
            self._ring()
            return
        except Exception:
            _log.exception(
                "publishing %d outbox message(s) after commit failed, the relay will retry",
                len(messages),
            )
            self._ring()
            return
        crash_point("outbox.after_publish")
        if self._marker is not None:
            self._marker.add([message.id for message in messages])
            return
        try:
            self._mark_published([message.id for message in messages])
        except Exception:
            _log.exception(
                "marking %d published outbox message(s) failed, the relay will send them again",
                len(messages),
            )

    def _ring(self) -> None:
        if self.doorbell is not None:
            self.doorbell.ring()

    def _after_soft_rollback(
        self, session: Session, previous_transaction: SessionTransaction
    ) -> None:
        pending: list[_Pending] | None = session.info.get(_WRITERS, {}).get(self)
        if pending:
            pending[:] = [
                item for item in pending if not _within(item.transaction, previous_transaction)
            ]

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        # Closing a session discards its transaction without a rollback event;
        # clearing here keeps those messages from riding along with a later commit.
        if transaction.parent is None:
            pending: list[_Pending] | None = session.info.get(_WRITERS, {}).get(self)
            if pending:
                pending.clear()

    def _mark_published(self, ids: Sequence[str]) -> None:
        table = outbox_messages
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            if self._postgres:
                # A mark lost to a database crash only means the relay sends that
                # message again, which consumers drop: no need to wait for the disk.
                conn.execute(_ASYNC_COMMIT)
            for chunk in _chunks(ids, _UPDATE_CHUNK):
                conn.execute(
                    update(table)
                    .where(table.c.id.in_(chunk))
                    .values(published_at=now, publish_attempts=table.c.publish_attempts + 1)
                )


def _mark_all(connection: OwnConnection, ids: Sequence[str]) -> None:
    connection.execute(_MARK_ALL, (datetime.now(UTC), list(ids)))


# Once for every session, rather than three listeners registered on each
# session that writes (a tenth of a start's client time): sessions without
# outbox messages only pay a dictionary lookup.
@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    for writer in list(session.info.get(_WRITERS, ())):
        writer._after_commit(session)


@event.listens_for(Session, "after_soft_rollback")
def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    for writer in list(session.info.get(_WRITERS, ())):
        writer._after_soft_rollback(session, previous_transaction)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    for writer in list(session.info.get(_WRITERS, ())):
        writer._after_transaction_end(session, transaction)
