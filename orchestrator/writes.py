"""Writes nobody reads the result of, compiled once and sent without SQLAlchemy's execution."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Executable
from sqlalchemy.orm import Session

from orchestrator.pipeline import compiled_statements, current_pipeline
from orchestrator.sessions import bound_to


def write(
    session: Session,
    statement: Executable,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> None:
    """Run a write nobody reads the result of; in a pipeline, without SQLAlchemy's execution.

    Outside a pipeline, or for a statement SQLAlchemy must prepare at each
    execution (Python-side defaults, expanding or escaped parameters, a
    RETURNING), this is ``session.execute``. Otherwise the statement, compiled
    once for these parameter names, goes to the driver's cursor with each value
    bound as SQLAlchemy binds it (its type's bind processing): the same SQL,
    without SQLAlchemy's per-execution machinery, a third of a write's client
    time. It goes with the transaction's next sync (see
    :meth:`~orchestrator.pipeline.OpenPipeline.send`), so ``params`` must not
    change until then. Several rows of a plain insert go
    as one statement (see ``_rows_shape``). Only for statements built once
    (module constants): the compiled form is kept by the statement's identity.
    Its errors come at the next sync.
    """
    entry = current_pipeline(session)
    rows = [params] if isinstance(params, Mapping) else list(params)
    if entry is None or not rows:
        session.execute(statement, params)
        return
    dialect = bound_to(session).dialect
    names = tuple(sorted(rows[0]))
    key = ("write", id(statement), names)
    writes = compiled_statements(dialect)
    cached: _CompiledWrite | None = writes.get(key)
    if cached is None or cached.statement is not statement:
        compiled: Any = statement.compile(dialect=dialect, column_keys=list(names))  # type: ignore[attr-defined]
        direct = not (
            compiled.insert_prefetch
            or compiled.update_prefetch
            or compiled.literal_execute_params
            or compiled.post_compile_params
            or compiled.escaped_bind_names
            or compiled.effective_returning
        )
        cached = _CompiledWrite(statement, compiled, compiled._bind_processors if direct else None)
        writes[key] = cached
    compiled, processors = cached.compiled, cached.processors
    if processors is None:
        session.execute(statement, params)
        return
    values = []
    for row in rows:
        bound = compiled.construct_params(row)
        for name, process in processors.items():
            if name in bound:
                bound[name] = process(bound[name])
        values.append(bound)
    if len(values) == 1:
        entry.send(compiled.string, values[0])
        return
    shape = cached.rows_shape
    if shape is None:
        entry.send(compiled.string, values, many=True)
        return
    order, sql_for = shape
    for start in range(0, len(values), _ROWS_PER_INSERT):
        chunk = values[start : start + _ROWS_PER_INSERT]
        entry.send(sql_for(len(chunk)), [row[name] for row in chunk for name in order])


# The most rows one insert statement carries. Several rows in one statement are
# one Bind and Execute instead of one each: for two rows, a tenth less work in
# all (client, server) than ``executemany``.
_ROWS_PER_INSERT = 50
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_INSERT_HEAD = re.compile(r"^INSERT INTO [^()]+ \([^()]*\) VALUES ", re.DOTALL)


def _values_row(sql: str) -> tuple[str, str] | None:
    """(head, row) of ``INSERT INTO t (columns) VALUES (row)`` with nothing after the row.

    The row is the first parenthesized group after VALUES, its parentheses
    balanced; anything after it (``ON CONFLICT ...``, ``RETURNING ...``), a
    quoted literal (whose parentheses would not count) or an escaped percent
    sign (``%%``, a literal the placeholders must not be read in) disqualifies.
    """
    head = _INSERT_HEAD.match(sql)
    if head is None or "'" in sql or "%%" in sql:
        return None
    depth = 0
    for index in range(head.end(), len(sql)):
        depth += {"(": 1, ")": -1}.get(sql[index], 0)
        if depth == 0:
            return (sql[: head.end()], sql[head.end() :]) if index == len(sql) - 1 else None
    return None


class _CompiledWrite:
    """A write statement compiled for one set of parameter names, as ``write`` keeps it."""

    __slots__ = ("compiled", "processors", "rows_shape", "statement")

    def __init__(self, statement: Executable, compiled: Any, processors: Any) -> None:
        self.statement = statement
        self.compiled = compiled
        # Each parameter's bind processing; None if SQLAlchemy must execute it.
        self.processors = processors
        self.rows_shape = _rows_shape(compiled.string)


def _rows_shape(sql: str) -> tuple[list[str], Callable[[int], str]] | None:
    """How to send several rows of the insert ``sql`` at once; None if it cannot be.

    Only ``INSERT INTO t (columns) VALUES (...)`` with nothing after it (no
    ``ON CONFLICT``, no ``RETURNING``) qualifies: the parameter names in the
    order of the row's placeholders, and the statement for a number of rows,
    with positional placeholders.
    """
    parts = _values_row(sql)
    if parts is None:
        return None
    head, row = parts
    order = _PLACEHOLDER.findall(row)
    row = _PLACEHOLDER.sub("%s", row)

    @functools.cache
    def sql_for(count: int) -> str:
        return head + ", ".join([row] * count)

    return (order, sql_for) if order else None
