"""Tables of the transactional outbox, and the project's single ``MetaData``.

Every table of the project lives on :data:`metadata`, so one migration history
and one ``create_all`` cover them all; the engine adds its own tables to it.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

# Deterministic constraint names keep migrations reproducible across databases.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: PostgreSQL channel on which writers wake relays after committing rows left to them.
NOTIFY_CHANNEL = "orchestrator_outbox"

outbox_messages = Table(
    "outbox_messages",
    metadata,
    # SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
    Column(
        "seq",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("id", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("destination", String(255), nullable=False),
    Column("queue", String(255), nullable=True),
    Column("aggregate_id", String(255), nullable=True),
    Column("body", JSON, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Column(
        "publish_attempts",
        Integer,
        nullable=False,
        default=0,
        server_default=text("0"),
    ),
    Column("last_error", Text, nullable=True),
)

# Published rows pile up until pruned; the relay only ever scans the unpublished
# ones, so a partial index keeps its query cost proportional to the backlog.
Index(
    "ix_outbox_messages_unpublished",
    outbox_messages.c.seq,
    postgresql_where=outbox_messages.c.published_at.is_(None),
    sqlite_where=outbox_messages.c.published_at.is_(None),
)
