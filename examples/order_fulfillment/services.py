"""The database engine of the example's services, one per process and database URL.

Engines are built on first use, so importing this module (as every worker does)
connects to nothing; a forked worker child gets fresh connections from
:func:`orchestrator.db.create_db_engine`. The first use of a database also
creates the services' tables and their initial stock, safely when several
processes start at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.dialects import postgresql, sqlite

from examples.order_fulfillment.schema import (
    INITIAL_STOCK,
    gateway_outages,
    inventory_stock,
    metadata,
)
from orchestrator.db import create_db_engine
from orchestrator.settings import Settings

__all__ = [
    "database_url",
    "get_engine",
    "is_down",
    "reset_engine_cache",
    "set_outage",
    "use_database",
]

# Any fixed number works: it only has to differ from other advisory locks taken
# on the same database.
_BOOTSTRAP_LOCK = 0x6F726465725F6678

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
# A plain global rather than a context variable: the embedded broker runs
# activities on its own threads, which must see it too.
_override: str | None = None


def database_url() -> str:
    """The services' database: the one given to :func:`use_database`, else the orchestrator's."""
    return _override or Settings().database_url


@contextmanager
def use_database(url: str) -> Iterator[None]:
    """Point the services at ``url`` inside the ``with`` (the demo's own database)."""
    global _override
    previous, _override = _override, url
    try:
        yield
    finally:
        _override = previous


def get_engine() -> Engine:
    """The engine of :func:`database_url`, built (with tables and stock) on first use."""
    url = database_url()
    engine = _engines.get(url)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_db_engine(url)
            try:
                _bootstrap(engine)
            except BaseException:
                engine.dispose()
                raise
            _engines[url] = engine
        return engine


def reset_engine_cache(url: str | None = None) -> None:
    """Dispose of the cached engine of ``url``, or of all of them (for tests)."""
    with _lock:
        urls = [url] if url is not None else list(_engines)
        for key in urls:
            engine = _engines.pop(key, None)
            if engine is not None:
                engine.dispose()


def _bootstrap(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Concurrent CREATE TABLEs of one name fail on PostgreSQL even with
            # checkfirst; SQLite's BEGIN IMMEDIATE already serialises this block.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _BOOTSTRAP_LOCK})
        metadata.create_all(conn, checkfirst=True)
        _insert_missing_stock(conn)


def _insert_missing_stock(conn: Connection) -> None:
    present = set(conn.scalars(select(inventory_stock.c.sku)))
    rows = [
        {"sku": sku, "available": available}
        for sku, available in INITIAL_STOCK.items()
        if sku not in present
    ]
    if not rows:
        return
    # Never overwrite a row that another process inserted meanwhile: its stock
    # may already have moved.
    if conn.dialect.name == "postgresql":
        conn.execute(postgresql.insert(inventory_stock).on_conflict_do_nothing(), rows)
    elif conn.dialect.name == "sqlite":
        conn.execute(sqlite.insert(inventory_stock).on_conflict_do_nothing(), rows)
    else:
        conn.execute(inventory_stock.insert(), rows)


def set_outage(service: str, down: bool) -> None:
    """Mark a downstream service down (or back up) for every process."""
    with get_engine().begin() as conn:
        conn.execute(gateway_outages.delete().where(gateway_outages.c.service == service))
        if down:
            conn.execute(gateway_outages.insert().values(service=service, since=datetime.now(UTC)))


def is_down(service: str) -> bool:
    with get_engine().connect() as conn:
        found = conn.execute(
            select(gateway_outages.c.service).where(gateway_outages.c.service == service)
        ).first()
    return found is not None
