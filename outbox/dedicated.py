"""A PostgreSQL connection of its own, outside an engine's pool, in autocommit mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine


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
