"""The inbox: which events each subscriber group has already handled.

A row is written in the same transaction as the handler's own writes, so it
exists exactly when the handler's effect does. A redelivered event finds its
row and is acknowledged without running the handler again. The table is on
the project's one ``MetaData``, so the engine's migrations manage it.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, String, Table

from outbox.schema import metadata

__all__ = ["inbox"]

inbox = Table(
    "event_inbox",
    metadata,
    Column("group_name", String(100), primary_key=True),
    Column("event_id", String(64), primary_key=True),
    Column("event_type", String(255), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("correlation_id", String(255), nullable=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
)

# Status reads each group's latest row, and pruning deletes a group's oldest rows.
Index("ix_event_inbox_group_processed", inbox.c.group_name, inbox.c.processed_at)
