"""The API of workflow code: ``from orchestrator import workflow``.

Module-level functions read the running workflow from the event loop they are
called on, so there is no global state. Everything here is deterministic:
``now()``, ``random()`` and ``uuid4()`` come from the history, and the logger is
quiet while the code replays.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from random import Random
from types import TracebackType
from typing import Any, NoReturn, TypeVar, overload

from activities.definition import ActivityDefinition, get_definition
from activities.payload import from_payload, to_payload
from activities.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from orchestrator.definition import define, definition_of, mark_handler, mark_run
from orchestrator.errors import ActivityError, ContinueAsNew, NotInWorkflowError
from orchestrator.history import ActivityScheduled, ChildWorkflowScheduled
from orchestrator.instance import WorkflowInfo, WorkflowInstance, current_instance
from orchestrator.policies import ParentClosePolicy

__all__ = [
    "ChildHandle",
    "ParentClosePolicy",
    "Saga",
    "WorkflowInfo",
    "continue_as_new",
    "defn",
    "deprecate_patch",
    "emit",
    "execute_activity",
    "execute_child",
    "in_workflow",
    "info",
    "logger",
    "now",
    "patched",
    "query",
    "random",
    "run",
    "signal",
    "sleep",
    "start_child",
    "uuid4",
    "wait_condition",
]

C = TypeVar("C", bound=type[Any])
F = TypeVar("F", bound=Callable[..., Any])


class _NoArg:
    def __repr__(self) -> str:
        return "<no argument>"


NO_ARG: Any = _NoArg()


@overload
def defn(cls: C, /) -> C: ...
@overload
def defn(*, name: str | None = None) -> Callable[[C], C]: ...
def defn(cls: C | None = None, /, *, name: str | None = None) -> C | Callable[[C], C]:
    """Declare a workflow class. ``name`` (default: the class name) is its stable type."""

    def wrap(target: C) -> C:
        define(target, name)
        return target

    return wrap(cls) if cls is not None else wrap


def run(fn: F) -> F:
    """Mark the ``async def`` method that runs the workflow."""
    mark_run(fn)
    return fn


@overload
def signal(fn: F, /) -> F: ...
@overload
def signal(*, name: str | None = None) -> Callable[[F], F]: ...
def signal(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a method (sync or async) that handles the signal ``name`` (default: its name).

    Signals are recorded in the history in the order they arrive and delivered in
    that order, also those sent before the code reaches the wait that needs them.
    """

    def wrap(target: F) -> F:
        mark_handler(target, "signal", name)
        return target

    return wrap(fn) if fn is not None else wrap


@overload
def query(fn: F, /) -> F: ...
@overload
def query(*, name: str | None = None) -> Callable[[F], F]: ...
def query(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a plain method that answers the query ``name``; it must not change state."""

    def wrap(target: F) -> F:
        mark_handler(target, "query", name)
        return target

    return wrap(fn) if fn is not None else wrap


def _instance() -> WorkflowInstance:
    instance = current_instance()
    if instance is None:
        raise NotInWorkflowError("this function can only be called from workflow code")
    return instance


def in_workflow() -> bool:
    """True inside workflow code."""
    return current_instance() is not None


def info() -> WorkflowInfo:
    """The running workflow's ids, type and history length."""
    return _instance().info()


def now() -> datetime:
    """The workflow's current time: the time of the event being processed (UTC)."""
    return _instance().now


def random() -> Random:
    """A random generator seeded from the run's history: replays draw the same numbers."""
    return _instance().random


def uuid4() -> uuid.UUID:
    """A UUID that replays return unchanged."""
    return uuid.UUID(int=_instance().random.getrandbits(128), version=4)


async def sleep(duration: timedelta | float) -> None:
    """Wait durably: a timer in the database, fired by the scheduler (``asyncio.sleep`` too)."""
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    _instance()
    await asyncio.sleep(seconds)


def emit(event: Any) -> None:
    """Publish a domain event (a declared ``events.DomainEvent``) from workflow code.

    It is recorded in the history and goes out through the outbox when this step
    commits; replays record it again but never publish it twice. Its envelope
    carries the workflow id as correlation id and the run id as causation id.
    """
    _instance().emit(event)


async def wait_condition(
    predicate: Callable[[], bool], *, timeout: timedelta | float | None = None
) -> None:
    """Wait until ``predicate()`` is true (checked whenever the code is idle).

    With ``timeout``, raise ``TimeoutError`` if it is still false after that long
    (a durable timer).
    """
    instance = _instance()
    if predicate():
        return
    future = instance.wait_condition(predicate)
    seconds = _seconds(timeout)
    if seconds is None:
        await future
    else:
        await asyncio.wait_for(future, seconds)


def patched(patch_id: str) -> bool:
    """True where the run should take the new branch of a code change.

    New runs (and runs that reach this point after the deploy) take it and record
    a marker; runs that passed this point under the old code replay without the
    marker and get False, so they keep their recorded commands.
    """
    return _instance().patched(patch_id)


def deprecate_patch(patch_id: str) -> None:
    """The old branch of ``patch_id`` is gone: accept histories with or without its marker."""
    _instance().patched(patch_id, deprecated=True)


def continue_as_new(input: Any = NO_ARG) -> NoReturn:
    """Close this run and start a fresh one of the same workflow id with ``input``.

    Keeps an entity's history bounded: ``workflow.info().continue_as_new_suggested``
    says when it is time.
    """
    instance = _instance()
    defn = instance.defn
    payload = (
        to_payload(input, defn.input_type, limit=instance.defaults.max_payload_bytes)
        if defn.takes_input
        else None
    )
    raise ContinueAsNew(payload)


class ChildHandle:
    """A child run started by ``workflow.start_child``; await ``result()``."""

    def __init__(self, workflow_id: str, future: asyncio.Future[Any], output_type: Any) -> None:
        self.workflow_id = workflow_id
        self._future = future
        self._output_type = output_type

    async def result(self) -> Any:
        """The child's result; raises ChildWorkflowError if it did not complete."""
        return from_payload(await self._future, self._output_type)


async def start_child(
    workflow: type[Any] | str,
    input: Any = NO_ARG,
    *,
    workflow_id: str | None = None,
    parent_close_policy: ParentClosePolicy = ParentClosePolicy.TERMINATE,
) -> ChildHandle:
    """Start a child run; returns once its start is recorded.

    ``workflow_id`` defaults to ``<parent workflow id>/<child id>``; the parent
    close policy (default TERMINATE) says what happens to the child if the parent
    closes first.
    """
    instance = _instance()
    limit = instance.defaults.max_payload_bytes
    if isinstance(workflow, str):
        name, input_type, output_type, takes_input = workflow, Any, Any, input is not NO_ARG
    else:
        child = definition_of(workflow)
        name, input_type, output_type = child.name, child.input_type, child.output_type
        takes_input = child.takes_input
    payload = to_payload(input, input_type, limit=limit) if takes_input else None
    child_id = instance.next_id("child")
    command = ChildWorkflowScheduled(
        child_id=child_id,
        workflow_type=name,
        workflow_id=workflow_id or f"{instance.workflow_id}/{child_id}",
        input=payload,
        parent_close_policy=ParentClosePolicy(parent_close_policy).value,
    )
    future = instance.start_child(command)
    return ChildHandle(command.workflow_id, future, output_type)


async def execute_child(
    workflow: type[Any] | str,
    input: Any = NO_ARG,
    *,
    workflow_id: str | None = None,
    parent_close_policy: ParentClosePolicy = ParentClosePolicy.TERMINATE,
) -> Any:
    """Run a child workflow and return its result (ChildWorkflowError if it fails)."""
    handle = await start_child(
        workflow, input, workflow_id=workflow_id, parent_close_policy=parent_close_policy
    )
    return await handle.result()


def _seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


async def execute_activity(
    activity: Callable[..., Any] | ActivityDefinition,
    arg: Any = NO_ARG,
    *,
    retry: RetryPolicy | None = None,
    start_to_close: timedelta | float | None = None,
    schedule_to_close: timedelta | float | None = None,
    heartbeat_timeout: timedelta | float | None = None,
    task_queue: str | None = None,
) -> Any:
    """Run an activity and return its result; raise :class:`ActivityError` if it fails for good.

    Options left out come from the activity's ``@activity.defn``, then from the
    engine: retry policy ``RetryPolicy()`` (unlimited attempts), start-to-close
    ``ORCHESTRATOR_DEFAULT_START_TO_CLOSE_SECONDS`` (60 s), no schedule-to-close.
    """
    return await _execute(
        activity,
        arg,
        retry=retry,
        start_to_close=start_to_close,
        schedule_to_close=schedule_to_close,
        heartbeat_timeout=heartbeat_timeout,
        task_queue=task_queue,
        is_compensation=False,
    )


async def _execute(
    activity: Callable[..., Any] | ActivityDefinition,
    arg: Any,
    *,
    retry: RetryPolicy | None,
    start_to_close: timedelta | float | None,
    schedule_to_close: timedelta | float | None,
    task_queue: str | None,
    is_compensation: bool,
    heartbeat_timeout: timedelta | float | None = None,
) -> Any:
    instance = _instance()
    definition = get_definition(activity)
    limit = instance.defaults.max_payload_bytes
    if definition.takes_input:
        if arg is NO_ARG:
            raise TypeError(f"activity {definition.name} takes an argument")
        payload = to_payload(arg, definition.input_type, limit=limit)
    elif arg is not NO_ARG:
        raise TypeError(f"activity {definition.name} takes no argument")
    else:
        payload = None
    policy = retry or definition.retry_policy or DEFAULT_RETRY_POLICY
    command = ActivityScheduled(
        activity_id=instance.next_activity_id(),
        activity_type=definition.name,
        task_queue=task_queue or definition.task_queue,
        input=payload,
        retry_policy=policy.to_json(),
        start_to_close=_seconds(start_to_close)
        or _seconds(definition.start_to_close)
        or instance.defaults.start_to_close,
        schedule_to_close=_seconds(schedule_to_close) or _seconds(definition.schedule_to_close),
        heartbeat_timeout=_seconds(heartbeat_timeout) or _seconds(definition.heartbeat_timeout),
        is_compensation=is_compensation,
    )
    result = await instance.schedule_activity(command)
    return from_payload(result, definition.output_type)


@dataclass
class _Compensation:
    activity: Callable[..., Any] | ActivityDefinition
    arg: Any
    options: dict[str, Any] = field(default_factory=dict)


class Saga:
    """Compensations registered before each step, run in reverse order on failure.

    Use it as ``async with workflow.Saga() as saga:``; call
    ``saga.add_compensation(undo_activity, arg)`` *before* the step it undoes, so a
    step that fails half-way is undone too (compensations must therefore tolerate
    having nothing to undo). If the block raises (an activity failed for good, or
    the run was cancelled), every registered compensation runs as an activity, last
    registered first, with its own retry policy; the error is then re-raised and
    the run ends ``COMPENSATED`` (``CANCELLED`` for a cancellation) keeping the
    original cause. A compensation that fails for good does not stop the others;
    the run then ends ``FAILED`` naming it.
    """

    def __init__(self) -> None:
        self._compensations: list[_Compensation] = []

    def add_compensation(
        self,
        activity: Callable[..., Any] | ActivityDefinition,
        arg: Any = NO_ARG,
        *,
        retry: RetryPolicy | None = None,
        start_to_close: timedelta | float | None = None,
        schedule_to_close: timedelta | float | None = None,
        task_queue: str | None = None,
    ) -> None:
        """Register the activity that undoes the next step (options as execute_activity)."""
        get_definition(activity)  # fail at registration, not during compensation
        self._compensations.append(
            _Compensation(
                activity,
                arg,
                {
                    "retry": retry,
                    "start_to_close": start_to_close,
                    "schedule_to_close": schedule_to_close,
                    "task_queue": task_queue,
                },
            )
        )

    async def compensate(self) -> None:
        """Run the registered compensations, last first; each runs once."""
        instance = _instance()
        while self._compensations:
            step = self._compensations.pop()
            try:
                await _execute(step.activity, step.arg, is_compensation=True, **step.options)
            except ActivityError as exc:
                instance.compensation_failures.append(f"{exc.activity_type}: {exc.failure.message}")
            instance.compensations_run += 1
        instance.saga_compensated = True

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is not None:
            await self.compensate()
        return False


class _ReplayAwareLogger(logging.LoggerAdapter[logging.Logger]):
    """Logs with the run's ids, and not at all while the code replays old events."""

    def isEnabledFor(self, level: int) -> bool:
        instance = current_instance()
        if instance is not None and instance.is_replaying:
            return False
        return self.logger.isEnabledFor(level)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        instance = current_instance()
        if instance is not None:
            extra = dict(kwargs.get("extra") or {})
            extra.setdefault("workflow_id", instance.workflow_id)
            extra.setdefault("run_id", instance.run_id)
            extra.setdefault("workflow_type", instance.defn.name)
            kwargs["extra"] = extra
        return msg, kwargs


logger = _ReplayAwareLogger(logging.getLogger("orchestrator.workflow"), {})
"""A logger for workflow code: it adds the run's ids and stays quiet on replay."""
