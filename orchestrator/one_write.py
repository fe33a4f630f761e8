"""A transaction whose results nobody reads, sent to PostgreSQL in one write.

psycopg's pipeline mode hands each statement to the server as it is executed:
before and after each one it polls the socket and flushes, so a transaction of
five statements (BEGIN, three writes, COMMIT) made nineteen system calls and
reached the server as seven packets, each waking it. Most of the engine's
transactions read nothing (a start, a step of a run the worker knows): their
statements, held back until the commit, go here instead. Each is bound by
psycopg's own adaptation, written into libpq's buffer in pipeline mode, and
the buffer leaves with the COMMIT and a sync in one flush (a single write for
anything under libpq's 64 kB buffer); the replies are read until that sync.
A step's transaction then costs the client a fifth of the CPU it did, and the
server one wake-up.

Statements are prepared on a connection the first time they are sent on it,
as psycopg prepares the ones it sees often, under names of their own (never
psycopg's), and executed by name after that; a connection whose
``prepare_threshold`` is None (psycopg's switch for poolers that move a
session between server connections) prepares nothing here either. A prepare
the server did not run (one behind a failing statement) is forgotten and made
again next time. psycopg deallocates every prepared statement of a connection
when one of its transactions rolls back: the next transaction sent here then
finds its names gone, is rolled back, and is sent again, preparing anew (one
round trip more, after such a rollback only).

The first statement that fails stops the rest; its error, as psycopg would
have raised it, is raised here once the replies up to the sync are read, and
the transaction is left failed for the caller to roll back. A value that
cannot be sent fails before anything is written. A connection lost, or a wait
interrupted, on the way is closed, so that the pool replaces it.
"""

from __future__ import annotations

import re
import select
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from psycopg import errors, pq
from psycopg.adapt import PyFormat, Transformer

# The most statements a connection keeps prepared; past it, a new statement
# goes unprepared (planned at each execution) rather than evicting another.
MAX_PREPARED = 200
_PARAM = re.compile(r"%\((\w+)\)s|%s|%%")
_COMMIT = b"COMMIT"
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_FATAL = pq.ExecStatus.FATAL_ERROR
_PREPARED_OK = pq.ExecStatus.COMMAND_OK
_NO_SUCH_STATEMENT = "26000"  # invalid_sql_statement_name
# poll()'s event bits, which select() stands in for where poll is missing.
_IN, _OUT, _ERR = 1, 4, 8


class _Converted:
    """A statement in libpq's form: ``$n`` placeholders, and where each value comes from."""

    __slots__ = ("names", "positional", "query")

    def __init__(self, sql: str, encoding: str) -> None:
        names: list[str] = []
        count = 0

        def number(match: re.Match[str]) -> str:
            nonlocal count
            token = match.group(0)
            if token == "%%":
                return "%"
            count += 1
            if match.group(1) is not None:
                names.append(match.group(1))
            return f"${count}"

        self.query = _PARAM.sub(number, sql).encode(encoding)
        if names and len(names) != count:
            raise ValueError(f"named and positional placeholders mixed in {sql!r}")
        self.names = names
        self.positional = count if not names else 0

    def values(self, params: Any) -> Sequence[Any]:
        if params is None:
            return ()
        if self.names:
            return [params[name] for name in self.names]
        if len(params) != self.positional:
            raise ValueError(f"{self.positional} values expected, got {len(params)}")
        return list(params)


class _Connection:
    """What one connection keeps between transactions: its adapters and prepared names."""

    # Nothing here refers to the connection: the entry must go when it does.
    def __init__(self, driver: Any) -> None:
        # psycopg's way to say that the connection must not prepare (a pooler
        # that moves sessions between server connections): none here either.
        self.prepares = driver.prepare_threshold is not None
        self.encoding = driver.info.encoding
        self.prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.converted: dict[str, _Converted] = {}
        self.counter = 0

    def convert(self, sql: str) -> _Converted:
        converted = self.converted.get(sql)
        if converted is None:
            converted = self.converted[sql] = _Converted(sql, self.encoding)
        return converted


_CONNECTIONS: weakref.WeakKeyDictionary[Any, _Connection] = weakref.WeakKeyDictionary()


class _Command:
    """One statement bound and ready to write: prepared by name, or sent whole."""

    __slots__ = ("formats", "name", "params", "prepare", "query", "read", "result", "types")

    def __init__(
        self,
        query: bytes,
        params: Sequence[Any] | None,
        types: tuple[int, ...],
        formats: Sequence[pq.Format] | None,
    ) -> None:
        self.query = query
        self.params = params
        self.types = types
        self.formats = formats
        self.name: bytes | None = None
        self.prepare = False
        # Whether its rows are wanted, and then, once replied, its result.
        self.read = False
        self.result: Any = None


def commit_unread(
    driver: Any,
    statements: Sequence[tuple[str, Any, bool]],
    reads: Sequence[tuple[str, Any]] = (),
    before_send: Callable[[], object] | None = None,
) -> list[list[dict[str, Any]]]:
    """Run ``statements``, then ``reads``, then COMMIT; the rows of each read, in order.

    Statements are ``(sql, params, many)`` and reads ``(sql, params)``, with
    psycopg's placeholders. The first statement must begin the transaction
    (``BEGIN``) on a connection in autocommit: the caller's, as
    ``pipeline.pipelined`` leaves it. A read's rows come as psycopg reads them
    (its loaders for each column's type), as dictionaries by column name.
    ``before_send`` is called once everything is bound, before anything is
    written: from then on the COMMIT may reach the server.
    """
    state = _CONNECTIONS.get(driver)
    if state is None:
        state = _CONNECTIONS[driver] = _Connection(driver)
    # The connection's adapters, as its cursors use them; one per transaction
    # (a transformer refers to its connection, which the state must not).
    commands = _bind(state, Transformer(driver), statements, reads)
    if before_send is not None:
        before_send()
    error = _send(driver, state, commands)
    if error is not None and error.sqlstate == _NO_SUCH_STATEMENT:
        # The connection's prepared statements were dropped since they were
        # prepared: psycopg deallocates all of them when a transaction rolls
        # back while it holds prepared statements of its own. Nothing of this
        # transaction stands (the error failed it); it is rolled back and
        # sent again, preparing anew.
        rolled_back = _send(driver, state, [_Command(b"ROLLBACK", None, (), None)])
        if rolled_back is not None:
            raise rolled_back
        state.prepared.clear()
        for command in commands:
            command.name, command.prepare, command.result = None, False, None
        error = _send(driver, state, commands)
    if error is not None:
        raise error
    loader = Transformer(driver)
    return [_rows(loader, state.encoding, command.result) for command in commands if command.read]


def _rows(loader: Any, encoding: str, result: Any) -> list[dict[str, Any]]:
    loader.set_pgresult(result)
    names = [result.fname(index).decode(encoding) for index in range(result.nfields)]
    return [
        dict(zip(names, row, strict=True)) for row in loader.load_rows(0, result.ntuples, tuple)
    ]


def _send(driver: Any, state: _Connection, commands: Sequence[_Command]) -> errors.Error | None:
    """Write ``commands`` and a sync in one go, read the replies; the first error.

    Broken off on the way (a lost connection, an interrupted wait), the
    connection is closed: libpq would be left in pipeline mode with replies
    unread, which neither psycopg nor the pool's reset can undo, and a closed
    connection is one the pool replaces.
    """
    pgconn = driver.pgconn
    pgconn.enter_pipeline_mode()
    try:
        naming: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        for command in commands:
            _name(state, naming, command)
            if command.prepare:
                pgconn.send_prepare(command.name, command.query, param_types=command.types)
            if command.name is not None:
                pgconn.send_query_prepared(
                    command.name, command.params, param_formats=command.formats
                )
            else:
                pgconn.send_query_params(
                    command.query,
                    command.params,
                    param_types=command.types,
                    param_formats=command.formats,
                )
        pgconn.pipeline_sync()
        _flush(pgconn)
        error = _read_until_sync(pgconn, commands, state, naming, state.encoding)
        pgconn.exit_pipeline_mode()
    except BaseException:
        driver.close()
        raise
    return error


def _bind(
    state: _Connection,
    transformer: Any,
    statements: Sequence[tuple[str, Any, bool]],
    reads: Sequence[tuple[str, Any]],
) -> list[_Command]:
    """Every statement bound before anything is written: a value that cannot be sent fails here."""
    commands = [
        _bound(state, transformer, sql, row)
        for sql, params, many in statements
        for row in (params if many else [params])
    ]
    for sql, params in reads:
        command = _bound(state, transformer, sql, params)
        command.read = True
        commands.append(command)
    commands.append(_Command(_COMMIT, None, (), None))
    return commands


def _bound(state: _Connection, transformer: Any, sql: str, params: Any) -> _Command:
    converted = state.convert(sql)
    values = converted.values(params)
    if not values:
        return _Command(converted.query, None, (), None)
    dumped = transformer.dump_sequence(values, [PyFormat.AUTO] * len(values))
    types = tuple(transformer.types or ())
    formats = tuple(transformer.formats or ())
    return _Command(converted.query, dumped, types, formats)


def _name(
    state: _Connection, naming: dict[tuple[bytes, tuple[int, ...]], bytes], command: _Command
) -> None:
    if command.params is None:
        return  # BEGIN, COMMIT: nothing to plan
    key = (command.query, command.types)
    name = state.prepared.get(key) or naming.get(key)
    if name is None and state.prepares and len(state.prepared) + len(naming) < MAX_PREPARED:
        state.counter += 1
        name = naming[key] = f"_orchestrator_{state.counter}".encode()
        command.prepare = True
    command.name = name


def _flush(pgconn: Any) -> None:
    """Write libpq's buffer out, reading what the server sends meanwhile.

    A server whose replies fill the socket stops reading until they are read:
    a long transaction must not wait to write while the replies pile up.
    """
    while pgconn.flush():
        if _wait(pgconn.socket, _OUT | _IN) & _IN:
            pgconn.consume_input()


def _wait(fd: int, events: int) -> int:
    if not hasattr(select, "poll"):  # eventlet takes poll away; its select cooperates
        readable, writable, _ = select.select(
            [fd] if events & _IN else [], [fd] if events & _OUT else [], [fd]
        )
        return (_IN if readable else 0) | (_OUT if writable else 0)
    poller = select.poll()
    poller.register(fd, events | _ERR)
    ready = 0
    for _fd, event in poller.poll():
        ready |= event
    return ready


def _read_until_sync(
    pgconn: Any,
    commands: Sequence[_Command],
    state: _Connection,
    naming: dict[tuple[bytes, tuple[int, ...]], bytes],
    encoding: str,
) -> errors.Error | None:
    """Read every reply up to the sync; the first error, as psycopg raises it.

    A read's result is kept on its command; a prepare the server ran is
    remembered on the connection.
    """
    # The replies, in order: a prepare's (its key), then its statement's.
    expected: list[tuple[bytes, tuple[int, ...]] | _Command] = []
    for command in commands:
        if command.prepare:
            expected.append((command.query, command.types))
        expected.append(command)
    error: errors.Error | None = None
    index = 0
    last: Any = None
    while True:
        while pgconn.is_busy():
            _wait(pgconn.socket, _IN)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:  # the end of one command's replies
            if index < len(expected) and last is not None:
                replied = expected[index]
                if isinstance(replied, _Command):
                    if replied.read:
                        replied.result = last
                elif last.status == _PREPARED_OK:
                    state.prepared[replied] = naming[replied]
            index += 1
            last = None
            continue
        status = result.status
        if status == _SYNC:
            return error
        last = result
        if status == _FATAL and error is None:
            error = errors.error_from_result(result, encoding=encoding)
