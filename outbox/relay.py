"""Publishes outbox rows that the post-commit path did not get through."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, func, or_, select, update
from sqlalchemy.engine import Row, RowMapping
from sqlalchemy.sql.elements import ColumnElement

from outbox.crashpoints import crash_point
from outbox.dedicated import dedicated_connection
from outbox.errors import BrokerUnavailableError, PublishError
from outbox.message import OutboxMessage
from outbox.publisher import Publisher
from outbox.schema import NOTIFY_CHANNEL, outbox_messages

if TYPE_CHECKING:
    pass

_log = logging.getLogger("outbox.relay")

_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
# How long a blocked wait goes without looking at the stop event.
_STOP_CHECK = 0.5
# Sleeping exactly until a row's eligibility would race the clock and wake just short.
_WAKE_SLACK = 0.01
_PROGRESS_LOG_INTERVAL = 60.0
# Rows held back for ordering usually wait on a row another relay is publishing
# right now: look again soon, then less often if the wait drags on.
_DEFERRED_RETRY = 0.05
_MAX_ERROR_LENGTH = 2000
# Single publishes in a row that find the broker unavailable before the relay
# leaves the rest of a failed batch for its next run.
_UNAVAILABLE_IN_A_ROW = 2


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    # Databases without time zone support hand back naive values; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _to_message(row: RowMapping) -> OutboxMessage:
    return OutboxMessage(
        id=row["id"],
        kind=row["kind"],
        destination=row["destination"],
        queue=row["queue"],
        aggregate_id=row["aggregate_id"],
        body=row["body"],
        headers=row["headers"],
    )


class _Listener:
    """A dedicated autocommit connection subscribed to :data:`NOTIFY_CHANNEL`."""

    def __init__(self, engine: Engine) -> None:
        from psycopg import sql

        listen = sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL))
        self._conn: Any = dedicated_connection(engine, [listen])

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Wait up to ``timeout`` seconds for a notification; return whether one came."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            notes = self._conn.notifies(timeout=min(remaining, _STOP_CHECK), stop_after=1)
            try:
                received = next(notes, None)
            finally:
                # An unfinished generator keeps holding the connection's lock.
                notes.close()
            if received is not None:
                self.discard()
                return True
        return False

    def discard(self) -> None:
        """Drop notifications already received; the next table read covers them."""
        for _ in self._conn.notifies(timeout=0):
            pass

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # pragma: no cover - closing a broken connection
            _log.debug("closing the listening connection failed", exc_info=True)


class Relay:
    """Publishes unpublished outbox rows in ``seq`` order, safely from several processes.

    Rows are claimed with ``FOR UPDATE SKIP LOCKED``, so concurrent relays on
    PostgreSQL never publish the same row at the same time. SQLite has no row
    locks: run a single relay there.

    Rows of an *ordered* kind that name an ``aggregate_id`` reach the broker in
    ``seq`` order per aggregate even with several relays: a relay publishes
    such a row only if every earlier unpublished row of an ordered kind and the
    same aggregate is in its own batch, ahead of it; otherwise it leaves the
    row for a later pass. One aggregate's rows that fail to publish therefore hold back
    its later rows, and nothing else.

    Args:
        engine: Engine of the database holding the outbox table.
        publisher: Where messages go.
        batch_size: Most rows claimed and published per transaction. Defaults to 100.
        grace: Seconds a fresh row is left to the post-commit publisher before
            the relay takes it, so the normal path does not publish twice.
            Defaults to 2.0.
        poll_interval: Seconds :meth:`run` waits between reads when nothing
            wakes it earlier; on PostgreSQL notifications wake it, so this is
            only a safety net. Defaults to 5.0.
        relay_only_kinds: Kinds the post-commit publisher leaves to the relay
            (see ``OutboxWriter(relay_only_kinds=...)``); their rows are taken
            at once, without the grace period. Defaults to none.
        ordered_kinds: Kinds published in ``seq`` order per ``aggregate_id``.
            Defaults to ``("event",)``.
    """

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        *,
        batch_size: int = 100,
        grace: float = 2.0,
        poll_interval: float = 5.0,
        relay_only_kinds: Collection[str] = (),
        ordered_kinds: Collection[str] = ("event",),
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if grace < 0:
            raise ValueError("grace must not be negative")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.engine = engine
        self.publisher = publisher
        self.batch_size = batch_size
        self.grace = grace
        self.poll_interval = poll_interval
        self.relay_only_kinds = frozenset(relay_only_kinds)
        self.ordered_kinds = frozenset(ordered_kinds)

    def run_once(self) -> int:
        """Claim, publish and mark one batch of eligible rows; return how many were published.

        A :class:`PublishError` is recorded on the claimed rows (attempt count
        and last error), logged, and reported as 0; it is not raised.
        """
        published, _, _ = self._relay_batch()
        return published

    def backlog(self) -> tuple[int, float | None]:
        """Return the number of unpublished rows and the age in seconds of the oldest.

        The age is ``None`` when nothing is waiting.
        """
        table = outbox_messages
        with self.engine.connect() as conn:
            count, oldest = conn.execute(
                select(func.count(), func.min(table.c.created_at)).where(
                    table.c.published_at.is_(None)
                )
            ).one()
        if oldest is None:
            return int(count), None
        return int(count), max(0.0, (_now() - _as_utc(oldest)).total_seconds())

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set.

        On PostgreSQL with the psycopg driver, inserts wake the relay through
        ``LISTEN``/``NOTIFY``; elsewhere it polls every ``poll_interval``
        seconds. Database and broker failures are logged and retried with
        growing pauses, so the relay outlives restarts of either.
        """
        listen = (
            self.engine.dialect.name == "postgresql" and self.engine.dialect.driver == "psycopg"
        )
        _log.info(
            "outbox relay started (%s, batch of %d, grace %.1fs)",
            "listening for notifications" if listen else f"polling every {self.poll_interval}s",
            self.batch_size,
            self.grace,
        )
        listener: _Listener | None = None
        backoff = 0.0
        deferred_wait = 0.0
        relayed = 0
        last_report = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    if listen and listener is None:
                        listener = _Listener(self.engine)
                    # Subscribing before reading means an insert committed after
                    # the read still leaves a notification to wake the wait.
                    published, failed, deferred = self._drain(stop)
                    relayed += published
                    if failed:
                        backoff = self._next_backoff(backoff)
                        stop.wait(backoff)
                        continue
                    if deferred:
                        deferred_wait = min(
                            self.poll_interval, max(_DEFERRED_RETRY, deferred_wait * 2)
                        )
                        stop.wait(deferred_wait)
                        continue
                    deferred_wait = 0.0
                    if backoff:
                        _log.info("outbox relay recovered")
                        backoff = 0.0
                    if relayed and time.monotonic() - last_report >= _PROGRESS_LOG_INTERVAL:
                        _log.info(
                            "relayed %d outbox message(s) in the last %.0fs",
                            relayed,
                            time.monotonic() - last_report,
                        )
                        relayed = 0
                        last_report = time.monotonic()
                    self._wait(listener, stop)
                except Exception as exc:
                    # Anything here (mostly a lost database connection) must not
                    # end the relay: rows would pile up with nobody to send them.
                    if listener is not None:
                        listener.close()
                        listener = None
                    backoff = self._next_backoff(backoff)
                    _log.warning(
                        "outbox relay failed, retrying in %.1fs: %s",
                        backoff,
                        exc,
                        exc_info=_log.isEnabledFor(logging.DEBUG),
                    )
                    stop.wait(backoff)
        finally:
            if listener is not None:
                listener.close()
            _log.info("outbox relay stopped")

    def _next_backoff(self, current: float) -> float:
        ceiling = max(_MIN_BACKOFF, min(_MAX_BACKOFF, self.poll_interval))
        return min(ceiling, max(_MIN_BACKOFF, current * 2))

    def _drain(self, stop: threading.Event) -> tuple[int, bool, bool]:
        """Relay batches until none is full; return published, failed, and rows deferred."""
        total = 0
        while not stop.is_set():
            published, failed, deferred = self._relay_batch()
            total += published
            if failed:
                return total, True, False
            if deferred:
                return total, False, True
            # A short batch means the eligible rows are gone or held by another relay.
            if published < self.batch_size:
                break
        return total, False, False

    def _wait(self, listener: _Listener | None, stop: threading.Event) -> None:
        delay = self._until_next_eligible()
        if delay is not None:
            timeout = min(delay + _WAKE_SLACK, self.poll_interval)
            if listener is not None and self.relay_only_kinds:
                # A notification may announce a relay-only row, which is
                # eligible at once: sleeping out the grace period would hold it.
                listener.wait(timeout, stop)
                return
            # Notifications can only announce rows younger than the one waited
            # for, which become eligible later; waking for them would be wasted.
            stop.wait(timeout)
            if listener is not None:
                listener.discard()
        elif listener is not None:
            listener.wait(self.poll_interval, stop)
        else:
            stop.wait(self.poll_interval)

    def _until_next_eligible(self) -> float | None:
        """Seconds until the oldest row still inside its grace period becomes eligible."""
        if self.grace <= 0:
            return None
        table = outbox_messages
        cutoff = _now() - timedelta(seconds=self.grace)
        conditions = [table.c.published_at.is_(None), table.c.created_at > cutoff]
        if self.relay_only_kinds:
            conditions.append(table.c.kind.not_in(self.relay_only_kinds))
        with self.engine.connect() as conn:
            oldest = conn.execute(select(func.min(table.c.created_at)).where(*conditions)).scalar()
        if oldest is None:
            return None
        return max(0.0, (_as_utc(oldest) - cutoff).total_seconds())

    def _eligible(self) -> ColumnElement[bool]:
        table = outbox_messages
        old_enough = table.c.created_at <= _now() - timedelta(seconds=self.grace)
        if not self.relay_only_kinds:
            return old_enough
        return or_(old_enough, table.c.kind.in_(self.relay_only_kinds))

    def _in_aggregate_order(self, conn: Connection, rows: Sequence[Any]) -> tuple[list[Any], int]:
        """Drop claimed rows that an earlier unclaimed row of their aggregate must precede.

        Returns the rows to publish, in ``seq`` order, and how many were held back.
        """
        ordered = [
            row for row in rows if row.kind in self.ordered_kinds and row.aggregate_id is not None
        ]
        if not ordered:
            return list(rows), 0
        table = outbox_messages
        claimed = [row.seq for row in rows]
        # Read without locking: a row another relay holds is exactly what must
        # go first, and READ COMMITTED shows it unpublished until that relay commits.
        blockers = conn.execute(
            select(table.c.aggregate_id, func.min(table.c.seq).label("first_seq"))
            .where(
                table.c.published_at.is_(None),
                table.c.kind.in_(self.ordered_kinds),
                table.c.aggregate_id.in_({row.aggregate_id for row in ordered}),
                table.c.seq < max(row.seq for row in ordered),
                table.c.seq.not_in(claimed),
            )
            .group_by(table.c.aggregate_id)
        ).all()
        first_unclaimed: dict[str, int] = {row.aggregate_id: row.first_seq for row in blockers}
        if not first_unclaimed:
            return list(rows), 0
        kept = [
            row
            for row in rows
            if row.kind not in self.ordered_kinds
            or row.aggregate_id not in first_unclaimed
            or row.seq < first_unclaimed[row.aggregate_id]
        ]
        return kept, len(rows) - len(kept)

    def _relay_batch(self) -> tuple[int, bool, bool]:
        """Relay one batch; return the number published, whether publishing failed,
        and whether rows were held back for ordering."""
        table = outbox_messages
        with self.engine.begin() as conn:
            claimed = conn.execute(
                select(
                    table.c.seq,
                    table.c.id,
                    table.c.kind,
                    table.c.destination,
                    table.c.queue,
                    table.c.aggregate_id,
                    table.c.body,
                    table.c.headers,
                )
                .where(table.c.published_at.is_(None), self._eligible())
                .order_by(table.c.seq)
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            if not claimed:
                return 0, False, False
            rows, deferred = self._in_aggregate_order(conn, claimed)
            if not rows:
                return 0, False, True
            crash_point("relay.after_claim")
            seqs = [row.seq for row in rows]
            failures: dict[int, str] = {}
            try:
                self.publisher.publish([_to_message(row._mapping) for row in rows])
            except PublishError as exc:
                _log.warning("publishing %d outbox message(s) failed: %s", len(rows), exc)
                # One bad message must not hold up the rest: retry them one by one.
                failures = self._publish_one_by_one(rows)
            crash_point("relay.after_publish")
            if failures:
                for seq, error in failures.items():
                    conn.execute(
                        update(table)
                        .where(table.c.seq == seq)
                        .values(
                            publish_attempts=table.c.publish_attempts + 1,
                            last_error=error[:_MAX_ERROR_LENGTH],
                        )
                    )
                seqs = [seq for seq in seqs if seq not in failures]
            if seqs:
                conn.execute(
                    update(table)
                    .where(table.c.seq.in_(seqs))
                    .values(
                        published_at=_now(),
                        publish_attempts=table.c.publish_attempts + 1,
                        last_error=None,
                    )
                )
        _log.debug("relayed %d outbox message(s)", len(seqs))
        return len(seqs), bool(failures), deferred > 0

    def _publish_one_by_one(self, rows: Sequence[Row[Any]]) -> dict[int, str]:
        """Publish rows singly; return the errors of those that failed, by seq.

        A row of an ordered kind is not attempted once an earlier row of its
        aggregate failed: its events must not overtake one another. Two rows
        in a row that find the broker unavailable (a blocked broker, each
        waiting out the publisher's timeout) leave the rest for the next run;
        one alone may be that message's own doing (a body too slow to
        confirm), and it must not hold up the messages behind it.
        """
        failures: dict[int, str] = {}
        blocked: set[tuple[str, str | None]] = set()
        unavailable = 0
        for index, row in enumerate(rows):
            key = (row.kind, row.aggregate_id)
            if row.kind in self.ordered_kinds and key in blocked:
                failures[row.seq] = "held back: an earlier message of its aggregate failed"
                continue
            try:
                self.publisher.publish([_to_message(row._mapping)])
            except PublishError as exc:
                failures[row.seq] = str(exc)
                blocked.add(key)
                unavailable = unavailable + 1 if isinstance(exc, BrokerUnavailableError) else 0
                if unavailable == _UNAVAILABLE_IN_A_ROW:
                    for rest in rows[index + 1 :]:
                        failures[rest.seq] = str(exc)
                    break
            else:
                unavailable = 0
        return failures
