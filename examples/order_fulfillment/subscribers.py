"""The example's peripheral services, as event subscribers: notifications and analytics.

Neither is a step of the order saga: they react to its events, each in its own
subscriber group with its own queue, so adding or changing one never touches
the workflow. Run them with::

    ORCHESTRATOR_SUBSCRIBER_MODULES=examples.order_fulfillment.subscribers \\
        orchestrator subscribers run

- ``notifications``: one e-mail per order outcome (completed or compensated),
  handed to a pluggable :class:`EmailSender`. The default writes it to the
  ``order_emails`` table in the handler's transaction, so each e-mail exists
  exactly once; set ``ORCHESTRATOR_EXAMPLE_EMAIL_FILE`` to append them to a
  file instead (at least once: a line carries its event id).
- ``analytics``: per-day counts of completed and compensated orders
  (``order_outcomes_daily``) and per-day latency of each saga step
  (``order_step_latency``).

The tables live on this module's own :data:`metadata`, like the services'
tables, and are created on first use.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from events import EventEnvelope, subscriber
from examples.order_fulfillment.events import OrderCompensated, OrderCompleted, StepCompleted

__all__ = [
    "EMAIL_FILE_ENV_VAR",
    "Email",
    "EmailSender",
    "FileEmailSender",
    "TableEmailSender",
    "compose_email",
    "count_order_outcome",
    "email_order_outcome",
    "metadata",
    "order_emails",
    "order_outcomes_daily",
    "order_step_latency",
    "record_step_latency",
    "set_email_sender",
]

EMAIL_FILE_ENV_VAR = "ORCHESTRATOR_EXAMPLE_EMAIL_FILE"
"""When set, e-mails are appended to this file instead of the ``order_emails`` table."""

metadata = MetaData()

order_emails = Table(
    "order_emails",
    metadata,
    # One e-mail per event: the key makes even a second write impossible.
    Column("event_id", String(64), primary_key=True),
    Column("order_id", String(128), nullable=False),
    Column("recipient", String(320), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

order_outcomes_daily = Table(
    "order_outcomes_daily",
    metadata,
    Column("day", Date, primary_key=True),
    Column("completed", Integer, nullable=False),
    Column("compensated", Integer, nullable=False),
)

order_step_latency = Table(
    "order_step_latency",
    metadata,
    Column("day", Date, primary_key=True),
    Column("step", String(64), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("total_ms", BigInteger, nullable=False),
    Column("max_ms", BigInteger, nullable=False),
)

# Any fixed number works: it only has to differ from other advisory locks taken
# on the same database.
_CREATE_LOCK = 0x6F726465725F7375


# ----------------------------------------------------------------------------- tables
_created: set[str] = set()
_created_lock = threading.Lock()


def _ensure_tables(session: Session) -> None:
    """Create the tables in the handler's transaction, the first time per database."""
    bind = session.get_bind()
    key = bind.engine.url.render_as_string(hide_password=False)
    with _created_lock:
        if key in _created:
            return
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # Two processes creating the same tables at once would collide in the catalog.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK})
    metadata.create_all(connection, checkfirst=True)

    # Remembered only once committed: a rolled-back handler also rolled the tables back.
    @event.listens_for(session, "after_commit", once=True)
    def _remember(_session: Session) -> None:
        with _created_lock:
            _created.add(key)


def _upsert(
    session: Session,
    table: Table,
    keys: dict[str, Any],
    increments: dict[str, int],
    maxima: dict[str, int] | None = None,
) -> None:
    """Add ``increments`` to (and raise ``maxima`` in) the row at ``keys``, creating it."""
    maxima = maxima or {}
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert_insert  # type: ignore[assignment]
        statement = upsert_insert(table).values(**keys, **increments, **maxima)
        greatest = func.greatest if dialect == "postgresql" else func.max
        changes: dict[str, Any] = {
            name: table.c[name] + statement.excluded[name] for name in increments
        }
        changes.update({name: greatest(table.c[name], statement.excluded[name]) for name in maxima})
        session.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=changes))
        return
    condition = [table.c[name] == value for name, value in keys.items()]
    current = session.execute(select(table).where(*condition).with_for_update()).first()
    if current is None:
        session.execute(insert(table).values(**keys, **increments, **maxima))
        return
    values: dict[str, Any] = {
        name: current._mapping[name] + amount for name, amount in increments.items()
    }
    values.update({name: max(current._mapping[name], amount) for name, amount in maxima.items()})
    session.execute(update(table).where(*condition).values(**values))


# ----------------------------------------------------------------------------- e-mail
class Email(BaseModel):
    """One e-mail to a customer, tied to the event that caused it."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    order_id: str
    to: str
    subject: str
    body: str


class EmailSender(Protocol):
    """Sends e-mails; called inside the handler's transaction."""

    def send(self, session: Session, email: Email) -> None:
        """Send ``email``. Writes through ``session`` commit with the event's inbox row."""
        ...


class TableEmailSender:
    """Writes each e-mail to ``order_emails`` in the handler's transaction: exactly once."""

    def send(self, session: Session, email: Email) -> None:
        _ensure_tables(session)
        session.execute(
            insert(order_emails).values(
                event_id=email.event_id,
                order_id=email.order_id,
                recipient=email.to,
                subject=email.subject,
                body=email.body,
                created_at=datetime.now(UTC),
            )
        )


class FileEmailSender:
    """Appends each e-mail as a JSON line to ``path``.

    The file is outside the transaction, so an e-mail can be written again if
    the transaction then fails and the event is retried: readers drop lines
    whose ``event_id`` they have seen, as a mail gateway would.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def send(self, session: Session, email: Email) -> None:
        line = json.dumps(email.model_dump(), ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _default_sender() -> EmailSender:
    path = os.environ.get(EMAIL_FILE_ENV_VAR)
    return FileEmailSender(path) if path else TableEmailSender()


_sender: EmailSender = _default_sender()


def set_email_sender(sender: EmailSender | None) -> None:
    """Use ``sender`` for the notifications from now on (``None``: back to the default)."""
    global _sender
    _sender = sender if sender is not None else _default_sender()


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def compose_email(event: OrderCompleted | OrderCompensated, event_id: str) -> Email:
    """The e-mail telling the customer how their order ended."""
    if isinstance(event, OrderCompleted):
        subject = f"Order {event.order_id} is on its way"
        body = (
            f"We charged {_money(event.total_cents)} and shipped your order "
            f"{event.order_id}. Tracking number: {event.tracking_number}."
        )
    else:
        subject = f"Order {event.order_id} could not be completed"
        body = (
            f"We could not complete your order {event.order_id} ({event.reason}). "
            "Nothing was charged, or the charge was refunded in full."
        )
    return Email(
        event_id=event_id,
        order_id=event.order_id,
        to=event.customer_email,
        subject=subject,
        body=body,
    )


# ------------------------------------------------------------------------- subscribers
@subscriber("order.*", group="notifications", name="notifications.order_outcome_email")
def email_order_outcome(
    event: OrderCompleted | OrderCompensated, session: Session, envelope: EventEnvelope
) -> None:
    """E-mail the customer once their order completed or was compensated."""
    _sender.send(session, compose_email(event, envelope.event_id))


def _day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


@subscriber("order.*", group="analytics", name="analytics.order_outcomes")
def count_order_outcome(
    event: OrderCompleted | OrderCompensated, session: Session, envelope: EventEnvelope
) -> None:
    """Count the order under the day its outcome occurred (UTC)."""
    _ensure_tables(session)
    completed = isinstance(event, OrderCompleted)
    _upsert(
        session,
        order_outcomes_daily,
        {"day": _day(envelope.occurred_at)},
        {"completed": int(completed), "compensated": int(not completed)},
    )


@subscriber("order.*", group="analytics", name="analytics.step_latency")
def record_step_latency(event: StepCompleted, session: Session) -> None:
    """Add the step's latency to its day's count, total and maximum."""
    _ensure_tables(session)
    latency = event.latency_ms
    _upsert(
        session,
        order_step_latency,
        {"day": _day(event.finished_at), "step": event.STEP},
        {"count": 1, "total_ms": latency},
        {"max_ms": latency},
    )
