"""The hot path's statements reach their rows by primary key, whatever the planner knows.

A new database's tables have no statistics until autovacuum first analyzes
them, and a statement psycopg has prepared keeps the plan it got until then. A
plan that reaches one run through an index of *all* running runs (or of all
scheduled attempts) costs nothing on an empty table and grows with every open
run: on the benchmark's new database, every step's check read every running
run. Each statement here is prepared (``PREPARE``) and explained as its
generic plan (``plan_cache_mode = force_generic_plan``), the one a prepared
statement keeps, on empty tables the planner has never analysed, in a schema
of the test's own; every scan of the engine's tables in it must go through
that table's primary key.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg import sql
from sqlalchemy import Connection, Engine, text
from sqlalchemy.sql.expression import Executable

from orchestrator.activity_runner import _CLAIM_AT_ONCE, _COMPLETE_ATTEMPT, _COMPLETE_KNOWN_RUN
from orchestrator.runs import LOAD_HISTORY, LOCK_RUN
from orchestrator.schema import metadata

pytestmark = pytest.mark.integration

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RUN = {"b_run_id": "r-1"}
ATTEMPT = {**RUN, "b_activity_id": "1", "b_attempt": 1, "b_now": NOW}

STATEMENTS: dict[str, tuple[Executable, dict[str, Any]]] = {
    "complete for a known run": (
        _COMPLETE_KNOWN_RUN,
        {**ATTEMPT, "b_status": "RUNNING", "b_length": 2, "b_processed": 2, "b_cancel": False},
    ),
    "claim at once": (_CLAIM_AT_ONCE, {**ATTEMPT, "b_types": ["step_one"]}),
    "complete attempt": (_COMPLETE_ATTEMPT, ATTEMPT),
    "lock run": (LOCK_RUN, RUN),
    "load history": (LOAD_HISTORY, {**RUN, "b_after": 0}),
}
TABLES = ("workflow_runs", "activity_tasks", "workflow_events")


@pytest.fixture
def fresh_tables(db: Engine) -> Iterator[Connection]:
    """The engine's tables, empty and never analysed, in a schema of their own (rolled back)."""
    schema = f"plans_{uuid.uuid4().hex[:8]}"
    with db.connect() as conn:
        transaction = conn.begin()
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"SET LOCAL search_path TO {schema}"))
        metadata.create_all(conn)
        conn.execute(text("SET LOCAL plan_cache_mode TO force_generic_plan"))
        try:
            yield conn
        finally:
            transaction.rollback()


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def _type_of(value: Any) -> str:
    """The parameter's type for PREPARE; ``unknown`` lets the statement decide, as a driver does."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, datetime):
        return "timestamptz"
    if isinstance(value, list):
        return "text[]"
    return "unknown"


def scans(conn: Connection, statement: Executable, params: dict[str, Any]) -> list[tuple[str, str]]:
    """(table, how it is read) for each scan of the engine's tables in the generic plan."""
    compiled: Any = statement.compile(dialect=conn.dialect)
    bound = compiled.construct_params(params)
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text_of_statement = _PLACEHOLDER.sub(number, compiled.string)
    name = f"probe_{uuid.uuid4().hex[:8]}"
    types = ", ".join(_type_of(bound[n]) for n in names)
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    cursor.execute(f"PREPARE {name} ({types}) AS {text_of_statement}")
    arguments = sql.SQL(", ").join(sql.Literal(bound[n]) for n in names)
    try:
        cursor.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {} ({})").format(sql.Identifier(name), arguments)
        )
        plan = cursor.fetchone()[0]
    finally:
        # A prepared statement outlives the transaction; the connection goes
        # back to the pool.
        cursor.execute(f"DEALLOCATE {name}")
    document = plan if isinstance(plan, list) else json.loads(plan)
    found: list[tuple[str, str]] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") in TABLES and "Scan" in node["Node Type"]:
            found.append(
                (node["Relation Name"], f"{node['Node Type']} {node.get('Index Name', '')}")
            )
        for child in node.get("Plans", []):
            walk(child)

    walk(document[0]["Plan"])
    return found


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_hot_statements_use_primary_keys_on_tables_without_statistics(
    fresh_tables: Connection, name: str
) -> None:
    statement, params = STATEMENTS[name]
    found = scans(fresh_tables, statement, params)
    assert found, f"{name}: no scan of {TABLES} in its plan"
    for table, how in found:
        assert how.strip() in (f"Index Scan pk_{table}", f"Index Only Scan pk_{table}"), (
            f"{name} reads {table} by {how!r}, not by its primary key"
        )
