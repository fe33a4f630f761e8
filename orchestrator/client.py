"""Starting runs and looking at them: the Client and its WorkflowHandle."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import bindparam, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from activities.errors import InvalidPayloadError, PayloadTooLargeError
from activities.failure import Failure
from activities.payload import from_payload, to_payload, validate_input
from orchestrator.db import as_utc
from orchestrator.definition import WorkflowDefinition
from orchestrator.engine import UNREAD_START, Engine, StartResult, log_started
from orchestrator.errors import (
    InvalidWorkflowIdError,
    ResultTimeoutError,
    StartInDoubtError,
    UnknownSignalError,
    WorkflowFailedError,
    WorkflowNotFoundError,
    failure_of,
)
from orchestrator.history import RecordedEvent
from orchestrator.pipeline import commit, commit_handed_over, pipelined, queue_checks
from orchestrator.policies import IdConflictPolicy, IdReusePolicy, RunStatus
from orchestrator.runs import load_history
from orchestrator.schema import workflow_runs
from orchestrator.sessions import bound_to
from orchestrator.start_group import ALONE, Member
from orchestrator.workflow import NO_ARG

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator


@dataclass(frozen=True)
class RunDescription:
    """A run as stored: ids, status, input, result or failure, and progress."""

    workflow_id: str
    run_id: str
    workflow_type: str
    status: RunStatus
    input: Any
    result: Any
    failure: Failure | None
    history_length: int
    cancel_requested: bool
    paused: bool
    task_failure: Failure | None
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "workflow_type": self.workflow_type,
            "status": self.status.value,
            "input": self.input,
            "result": self.result,
            "failure": self.failure.to_json() if self.failure else None,
            "history_length": self.history_length,
            "cancel_requested": self.cancel_requested,
            "paused": self.paused,
            "task_failure": self.task_failure.to_json() if self.task_failure else None,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
        }


# The pauses of WorkflowHandle.result's polling, growing by half each time.
_DESCRIBE = select(workflow_runs).where(workflow_runs.c.run_id == bindparam("b_run_id"))
_FIRST_POLL = 0.002
_LAST_POLL = 0.25


class Client:
    """Starts workflows and hands out handles to runs. Get one from ``Orchestrator.client()``."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator

    def start_workflow(
        self,
        workflow: type[Any] | str,
        input: Any = NO_ARG,
        *,
        workflow_id: str | None = None,
        id_reuse_policy: IdReusePolicy = IdReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy: IdConflictPolicy = IdConflictPolicy.FAIL,
        session: Session | None = None,
    ) -> WorkflowHandle:
        """Start a run of ``workflow`` (a class or its type name) with ``input``.

        The input is validated against the run method's type hint before anything
        is written. With ``session``, the run, its first event and its first
        message join that session's transaction: they exist only if the caller
        commits. ``workflow_id`` defaults to a random UUID.
        """
        orchestrator = self._orchestrator
        defn = orchestrator.registry.workflow(workflow)
        payload = self._input_payload(defn, input)
        workflow_id = _check_workflow_id(str(uuid.uuid4()) if workflow_id is None else workflow_id)
        engine = orchestrator.engine
        if session is not None:
            started = engine.start(
                session,
                defn.name,
                payload,
                workflow_id=workflow_id,
                id_reuse_policy=id_reuse_policy,
                id_conflict_policy=id_conflict_policy,
            )
        else:
            started = self._start_in_own_transaction(
                defn.name, payload, workflow_id, id_reuse_policy, id_conflict_policy
            )
        return WorkflowHandle(self, workflow_id, started.run_id)

    def _start_in_own_transaction(
        self,
        workflow_type: str,
        payload: Any,
        workflow_id: str,
        id_reuse_policy: IdReusePolicy,
        id_conflict_policy: IdConflictPolicy,
    ) -> StartResult:
        """Start and commit, with the starts other threads of this process make meanwhile.

        See :mod:`orchestrator.start_group`. Where an open run is the expected
        case (``USE_EXISTING``), the start goes alone and reads as it goes.
        """
        request = _StartRequest(
            workflow_type, payload, workflow_id, id_reuse_policy, id_conflict_policy
        )
        orchestrator = self._orchestrator
        if id_conflict_policy is not IdConflictPolicy.USE_EXISTING:
            started = orchestrator.start_group.start(request)
            if started is not ALONE:
                return cast(StartResult, started)
        return _start_alone(orchestrator, request)

    def _input_payload(self, defn: WorkflowDefinition, input: Any) -> Any:
        """Validate a run's input against its type hint before anything is written."""
        limit = self._orchestrator.settings.max_payload_bytes
        if defn.takes_input:
            if input is NO_ARG:
                raise TypeError(f"workflow {defn.name} takes an input")
            try:
                payload = to_payload(
                    validate_input(input, defn.input_type), defn.input_type, limit=limit
                )
            except InvalidPayloadError as exc:
                raise InvalidPayloadError(
                    f"invalid input for workflow {defn.name}: {exc}"
                ) from None
            except PayloadTooLargeError as exc:
                raise PayloadTooLargeError(exc.size, exc.limit, f"input of {defn.name}") from None
        elif input is not NO_ARG:
            raise TypeError(f"workflow {defn.name} takes no input")
        else:
            payload = None
        return payload

    def signal_with_start(
        self,
        workflow: type[Any] | str,
        input: Any = NO_ARG,
        *,
        signal: str,
        signal_arg: Any = NO_ARG,
        workflow_id: str,
    ) -> WorkflowHandle:
        """Signal the open run of ``workflow_id``, starting it first if there is none.

        Both happen in one transaction, so the signal is never lost between them.
        """
        orchestrator = self._orchestrator
        defn = orchestrator.registry.workflow(workflow)
        payload = self._input_payload(defn, input)
        signal_payload = self._signal_payload(defn.name, signal, signal_arg)
        workflow_id = _check_workflow_id(workflow_id)
        engine = orchestrator.engine
        with engine.sessions() as session:
            started = engine.start(
                session,
                defn.name,
                payload,
                workflow_id=workflow_id,
                id_reuse_policy=IdReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=IdConflictPolicy.USE_EXISTING,
            )
            engine.signal(session, started.run_id, signal, signal_payload)
            engine.commit(session)
        return WorkflowHandle(self, workflow_id, started.run_id)

    def _signal_payload(self, workflow_type: str, name: str, arg: Any) -> Any:
        registry = self._orchestrator.registry
        if not registry.has_workflow(workflow_type):
            # Only the workers know this workflow; they check the signal.
            return None if arg is NO_ARG else to_payload(arg)
        defn = registry.workflow(workflow_type)
        handler = defn.signals.get(name)
        if handler is None:
            raise UnknownSignalError(
                f"workflow {defn.name} has no signal {name!r}; it has: "
                f"{', '.join(sorted(defn.signals)) or 'none'}"
            )
        return _handler_payload(handler.takes_input, handler.input_type, arg, name)

    def get_handle(self, workflow_id: str, run_id: str | None = None) -> WorkflowHandle:
        """A handle to ``run_id``, or to the workflow id's open (else latest) run."""
        with self._orchestrator.engine.sessions() as session:
            query = select(workflow_runs.c.run_id).where(workflow_runs.c.workflow_id == workflow_id)
            if run_id is not None:
                query = query.where(workflow_runs.c.run_id == run_id)
            found = session.execute(
                query.order_by(
                    workflow_runs.c.closed_at.is_(None).desc(), workflow_runs.c.created_at.desc()
                ).limit(1)
            ).scalar()
        if found is None:
            raise WorkflowNotFoundError(f"no run of workflow {workflow_id!r}")
        return WorkflowHandle(self, workflow_id, found)

    # -- used by handles --------------------------------------------------------
    def _describe(self, run_id: str) -> RunDescription:
        # One read, so no transaction around it: on PostgreSQL one round trip
        # instead of three (BEGIN, the read, ROLLBACK), the last step of every result().
        with self._orchestrator.db.connect() as connection:
            row = (
                connection.execution_options(isolation_level="AUTOCOMMIT")
                .execute(_DESCRIBE, {"b_run_id": run_id})
                .mappings()
                .first()
            )
        if row is None:
            raise WorkflowNotFoundError(f"no run {run_id}")
        return RunDescription(
            workflow_id=row["workflow_id"],
            run_id=row["run_id"],
            workflow_type=row["workflow_type"],
            status=RunStatus(row["status"]),
            input=row["input"],
            result=row["result"],
            failure=failure_of(row["failure"]),
            history_length=row["history_length"],
            cancel_requested=bool(row["cancel_requested"]),
            paused=bool(row["paused"]),
            task_failure=failure_of(row["task_failure"]),
            created_at=as_utc(row["created_at"]),
            updated_at=as_utc(row["updated_at"]),
            closed_at=as_utc(row["closed_at"]) if row["closed_at"] else None,
        )

    def _history(self, run_id: str) -> list[RecordedEvent]:
        with self._orchestrator.engine.sessions() as session:
            return load_history(session, run_id)


class WorkflowHandle:
    """One run: wait for its result, describe it, read its history, cancel it."""

    def __init__(self, client: Client, workflow_id: str, run_id: str) -> None:
        self._client = client
        self.workflow_id = workflow_id
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"WorkflowHandle(workflow_id={self.workflow_id!r}, run_id={self.run_id!r})"

    def describe(self) -> RunDescription:
        return self._client._describe(self.run_id)

    def history(self) -> list[RecordedEvent]:
        return self._client._history(self.run_id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to close; return its result or raise WorkflowFailedError.

        Raises ResultTimeoutError if it is still open after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Short first: a run of a few quick steps closes within milliseconds, and
        # a poll is one indexed read; a long run is soon polled four times a second.
        pause = _FIRST_POLL
        orchestrator = self._client._orchestrator
        # On PostgreSQL the close is announced (see run_closed): the wait ends
        # when it is, and reading four times a second only covers a lost one.
        closed_runs = orchestrator.closed_runs
        run_id = self.run_id
        told = closed_runs.subscribe(run_id) if closed_runs is not None else None
        # A time-skipping test environment moves the clock only while someone waits.
        orchestrator.waiting_for_results += 1
        try:
            while True:
                if told is not None:
                    told.clear()
                description = self.describe()
                if description.status.is_closed:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ResultTimeoutError(
                        f"workflow {self.workflow_id} is still {description.status.value} "
                        f"after {timeout}s"
                    )
                if told is not None:
                    told.wait(_LAST_POLL if remaining is None else min(remaining, _LAST_POLL))
                    continue
                time.sleep(pause if remaining is None else min(pause, remaining))
                pause = min(pause * 1.5, _LAST_POLL)
        finally:
            orchestrator.waiting_for_results -= 1
            if closed_runs is not None and told is not None:
                closed_runs.unsubscribe(run_id, told)
        if description.status is RunStatus.CONTINUED_AS_NEW:
            # An entity that continued as new: its result is its last run's.
            self.run_id = description.result["continued_as"]
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            return self.result(timeout=remaining)
        if description.status is not RunStatus.COMPLETED:
            raise WorkflowFailedError(
                workflow_id=self.workflow_id,
                status=description.status.value,
                failure=description.failure,
            )
        registry = self._client._orchestrator.registry
        if registry.has_workflow(description.workflow_type):
            return from_payload(
                description.result, registry.workflow(description.workflow_type).output_type
            )
        return description.result

    def cancel(self, reason: str = "", *, actor: str | None = None) -> bool:
        """Ask the run to cancel (its code gets CancelledError at its next await).

        Returns False if cancellation was already requested; raises RunClosedError
        if the run has closed.
        """
        return self._client._orchestrator.engine.request_cancel(
            self._current_run_id(), reason, actor=actor
        )

    def pause(self, reason: str = "", *, actor: str | None = None) -> bool:
        """Stop the run dispatching anything new; False if it was already paused."""
        return self._client._orchestrator.engine.pause(self._current_run_id(), reason, actor=actor)

    def resume(self, reason: str = "", *, actor: str | None = None) -> bool:
        """Let a paused run go on; False if it was not paused."""
        return self._client._orchestrator.engine.resume(self._current_run_id(), reason, actor=actor)

    def terminate(self, reason: str = "", *, actor: str | None = None) -> None:
        """Close the run at once without running its code (no compensation)."""
        self._client._orchestrator.engine.terminate(self._current_run_id(), reason, actor=actor)

    def _current_run_id(self) -> str:
        """This run, or the run it continued as (an entity's latest run)."""
        run_id = self.run_id
        description = self._client._describe(run_id)
        while description.status is RunStatus.CONTINUED_AS_NEW:
            run_id = description.result["continued_as"]
            description = self._client._describe(run_id)
        return run_id

    def signal(self, name: str, arg: Any = NO_ARG, *, actor: str | None = None) -> None:
        """Send the signal ``name``; signals are delivered in the order they are sent."""
        client = self._client
        engine = client._orchestrator.engine
        run_id = self._current_run_id()
        payload = client._signal_payload(self.describe().workflow_type, name, arg)
        with engine.sessions() as session:
            engine.signal(session, run_id, name, payload, actor=actor)
            engine.commit(session)

    def query(self, name: str, arg: Any = NO_ARG) -> Any:
        """Ask the run's query handler ``name`` (the workflow's code must be registered here)."""
        client = self._client
        registry = client._orchestrator.registry
        defn = registry.workflow(self.describe().workflow_type)
        handler = defn.queries.get(name)
        if handler is None:
            raise UnknownSignalError(
                f"workflow {defn.name} has no query {name!r}; it has: "
                f"{', '.join(sorted(defn.queries)) or 'none'}"
            )
        payload = _handler_payload(handler.takes_input, handler.input_type, arg, name)
        result = client._orchestrator.engine.query(self._current_run_id(), name, payload)
        return from_payload(result, handler.output_type)


def _handler_payload(takes_input: bool, input_type: Any, arg: Any, name: str) -> Any:
    if not takes_input:
        if arg is not NO_ARG:
            raise TypeError(f"{name} takes no argument")
        return None
    if arg is NO_ARG:
        raise TypeError(f"{name} takes an argument")
    try:
        return to_payload(validate_input(arg, input_type), input_type)
    except InvalidPayloadError as exc:
        raise InvalidPayloadError(f"invalid argument for {name}: {exc}") from None


@dataclass(frozen=True)
class _StartRequest:
    workflow_type: str
    payload: Any
    workflow_id: str
    id_reuse_policy: IdReusePolicy
    id_conflict_policy: IdConflictPolicy

    def start(self, engine: Engine, session: Session, *, unread: bool) -> StartResult:
        session.info[UNREAD_START] = unread
        return engine.start(
            session,
            self.workflow_type,
            self.payload,
            workflow_id=self.workflow_id,
            id_reuse_policy=self.id_reuse_policy,
            id_conflict_policy=self.id_conflict_policy,
        )


def _start_alone(orchestrator: Orchestrator, request: _StartRequest) -> StartResult:
    """Start and commit, in one round trip where an open run is not the expected case.

    That start does not read its insert back: if an open run held the id after
    all, the commit fails and the start is made again, reading as it goes, for
    the policies to decide.
    """
    engine = orchestrator.engine
    if request.id_conflict_policy is not IdConflictPolicy.USE_EXISTING:
        try:
            with engine.sessions() as own, pipelined(own, lean=True):
                started = request.start(engine, own, unread=True)
                commit(own)
        except IntegrityError as exc:
            if not _run_row_missing(exc):
                raise
        else:
            if started.created:
                log_started(request.workflow_id, started.run_id, request.workflow_type)
            return started
    with engine.sessions() as own, pipelined(own):
        started = request.start(engine, own, unread=False)
        commit(own)
    return started


def commit_starts(orchestrator: Orchestrator, members: Sequence[Member]) -> None:
    """Commit a group of starts in one transaction (see :mod:`orchestrator.start_group`).

    A group the database refuses, or whose transaction fails before its COMMIT
    is handed over, leaves each start to be made alone; a commit in doubt
    gives each start a :class:`StartInDoubtError`. A lone start goes the way
    of a start of its own.
    """
    if len(members) == 1:
        member = members[0]
        try:
            member.settle(_start_alone(orchestrator, member.request))
        except Exception as exc:
            member.settle(error=exc)
        return
    engine = orchestrator.engine
    started: list[StartResult] = []
    own: Session | None = None
    committed = False

    def done() -> None:
        nonlocal committed
        committed = True

    try:
        with engine.sessions() as own, pipelined(own, lean=True):
            # A group must not wait long on a row lock: the lock's holder may be
            # a thread of this process whose own start waits in the group.
            if not queue_checks(own, [(_GROUP_LOCK_TIMEOUT, {})]) and _postgresql(own):
                own.execute(_GROUP_LOCK_TIMEOUT)
            for member in members:
                started.append(member.request.start(engine, own, unread=True))
            commit(own, committed=done)
    except BaseException as exc:
        if committed:  # the runs exist; what failed came after the commit
            _settle_started(members, started)
        elif own is not None and commit_handed_over(own) and not _refused(exc):
            for member in members:
                member.settle(error=_in_doubt(member, exc))
        else:
            for member in members:
                member.settle(ALONE)
        if not isinstance(exc, Exception):
            raise
        return
    _settle_started(members, started)


_GROUP_LOCK_TIMEOUT = text("SET LOCAL lock_timeout = '2s'")


def _postgresql(session: Session) -> bool:
    return bound_to(session).dialect.name == "postgresql"


def _refused(exc: BaseException) -> bool:
    """Whether the database itself refused the transaction: it did not commit.

    Only an error of severity ERROR says so: a FATAL one (a backend terminated
    while a synchronous standby confirms the COMMIT) can follow a commit.
    """
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return False
    diag = getattr(exc.orig, "diag", None)
    return getattr(diag, "severity_nonlocalized", None) == "ERROR"


def _in_doubt(member: Member, exc: BaseException) -> StartInDoubtError:
    error = StartInDoubtError(
        f"the commit of the start of workflow id {member.request.workflow_id!r} may or may"
        f" not have happened ({type(exc).__name__}: {exc}): look the run up before starting"
        " it again"
    )
    error.__cause__ = exc
    return error


def _settle_started(members: Sequence[Member], started: Sequence[StartResult]) -> None:
    # Every start first, then the log: a start left unsettled would be taken for in doubt.
    for member, result in zip(members, started, strict=True):
        member.settle(result)
    for member, result in zip(members, started, strict=True):
        request = member.request
        log_started(request.workflow_id, result.run_id, request.workflow_type)


def _run_row_missing(exc: IntegrityError) -> bool:
    """A foreign-key violation: rows of a run whose insert an open run prevented."""
    return getattr(exc.orig, "sqlstate", None) == "23503"


def _check_workflow_id(workflow_id: str) -> str:
    if not isinstance(workflow_id, str) or not workflow_id.strip() or len(workflow_id) > 255:
        raise InvalidWorkflowIdError(
            f"workflow id must be a non-empty string of at most 255 characters, got {workflow_id!r}"
        )
    return workflow_id
