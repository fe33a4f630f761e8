"""Pooled connections that the database dropped: checked when idle, retried when busy."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import Engine, text

from orchestrator import db as orchestrator_db
from orchestrator.db import create_db_engine, once_more_on_disconnect

pytestmark = pytest.mark.timeout(60)

APP_NAME = "it-dropped-connections"


@pytest.fixture
def pooled(database_url: str) -> Any:
    engine = create_db_engine(database_url, connect_args={"application_name": APP_NAME})
    yield engine
    engine.dispose()


def drop_connections(admin: Engine) -> int:
    """What a database restart looks like from the pool's side."""
    with admin.begin() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": APP_NAME},
            ).scalar_one()
        )


def backend_pid(engine: Engine) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_recently_used_connection_is_not_checked_and_a_lost_one_is_retried(
    pooled: Engine, db: Engine
) -> None:
    calls: list[int] = []

    @once_more_on_disconnect
    def transaction() -> int:
        calls.append(1)
        return backend_pid(pooled)

    first = backend_pid(pooled)
    assert drop_connections(db) == 1
    # Checked in a moment ago: used without a check, fails, and runs again on a
    # fresh connection.
    assert transaction() != first
    assert len(calls) == 2


def test_an_idle_connection_is_checked_before_use(
    pooled: Engine, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(orchestrator_db, "PING_AFTER_IDLE_SECONDS", 0.2)
    first = backend_pid(pooled)
    assert drop_connections(db) == 1
    time.sleep(0.3)
    # The check finds it dead; the pool hands out a new one and nothing fails.
    assert backend_pid(pooled) != first


def test_other_database_errors_are_not_retried(pooled: Engine) -> None:
    calls: list[int] = []

    @once_more_on_disconnect
    def transaction() -> None:
        calls.append(1)
        with pooled.begin() as conn:
            conn.execute(text("SELECT 1/0"))

    with pytest.raises(Exception, match="division by zero"):
        transaction()
    assert len(calls) == 1


def test_without_the_retry_the_lost_connection_fails_the_transaction(
    pooled: Engine, db: Engine
) -> None:
    """The check above is what makes the first test pass, not luck."""
    backend_pid(pooled)
    drop_connections(db)
    with pytest.raises(Exception, match=r"terminat|closed|connection"):
        backend_pid(pooled)
