"""The migrations produce exactly the schema the code declares, on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from orchestrator import migrate
from orchestrator.db import create_db_engine
from orchestrator.schema import metadata

pytestmark = pytest.mark.timeout(60)


def test_migrations_match_the_declared_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/schema.db"
    migrate.upgrade(url)
    assert migrate.current_revision(url) == migrate.head_revision()
    engine = create_db_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_removes_everything(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/down.db"
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    assert migrate.current_revision(url) is None
    engine = create_db_engine(url)
    with engine.connect() as connection:
        tables = set(
            connection.exec_driver_sql("select name from sqlite_master where type='table'")
            .scalars()
            .all()
        )
    engine.dispose()
    assert tables <= {"alembic_version"}
