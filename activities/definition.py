"""Declaring activities: the :func:`defn` decorator and what it records."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, overload

from activities.errors import ActivityDefinitionError, PayloadError
from activities.payload import adapter_for, type_name
from activities.retry import RetryPolicy

__all__ = ["DEFAULT_TASK_QUEUE", "ActivityDefinition", "defn", "get_definition"]

DEFAULT_TASK_QUEUE = "activities"
"""Queue activities run on unless they name another."""

_ATTRIBUTE = "__activity_definition__"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ActivityDefinition:
    """Everything the engine needs to know to schedule and run an activity.

    Attributes:
        name: Registered name, unique among a worker's activities.
        fn: The function, exactly as written.
        input_type: Type hint of the single parameter, ``Any`` when it has
            none, and ``None`` when the function takes no parameter (see
            :attr:`takes_input`). A parameter annotated ``None`` gets
            ``NoneType``, so the two cases stay distinct.
        output_type: Return type hint, ``Any`` when missing, ``NoneType`` for
            ``-> None``. For ``async def`` functions, the awaited type.
        is_async: Whether ``fn`` is an ``async def`` function.
        task_queue: Queue the activity runs on. Defaults to ``"activities"``.
        retry_policy: Defaults to ``None``, meaning the engine's default.
        start_to_close: Longest duration of one attempt. Defaults to ``None``
            (no limit).
        schedule_to_close: Longest duration of all attempts together, waits
            included. Defaults to ``None`` (no limit).
        heartbeat_timeout: Longest time between heartbeats before an attempt is
            considered lost. Defaults to ``None`` (heartbeats not required).

    Raises:
        ActivityDefinitionError: a name, queue, policy or timeout is invalid.
    """

    name: str
    fn: Callable[..., Any]
    input_type: Any
    output_type: Any
    is_async: bool
    task_queue: str = DEFAULT_TASK_QUEUE
    retry_policy: RetryPolicy | None = None
    start_to_close: timedelta | None = None
    schedule_to_close: timedelta | None = None
    heartbeat_timeout: timedelta | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ActivityDefinitionError(
                f"activity name must be a non-empty string, got {self.name!r}"
            )
        if not isinstance(self.task_queue, str) or not self.task_queue:
            raise ActivityDefinitionError(
                f"task_queue of activity {self.name!r} must be a non-empty string, "
                f"got {self.task_queue!r}"
            )
        if self.retry_policy is not None and not isinstance(self.retry_policy, RetryPolicy):
            raise ActivityDefinitionError(
                f"retry_policy of activity {self.name!r} must be a RetryPolicy or None, "
                f"got {self.retry_policy!r}"
            )
        for label in ("start_to_close", "schedule_to_close", "heartbeat_timeout"):
            value = getattr(self, label)
            if value is not None and (not isinstance(value, timedelta) or value <= timedelta(0)):
                raise ActivityDefinitionError(
                    f"{label} of activity {self.name!r} must be a positive timedelta or None, "
                    f"got {value!r}"
                )

    @property
    def takes_input(self) -> bool:
        """Whether the function takes its single parameter (the input)."""
        return self.input_type is not None


@overload
def defn(fn: F) -> F: ...


@overload
def defn(
    fn: None = None,
    *,
    name: str | None = None,
    task_queue: str = DEFAULT_TASK_QUEUE,
    retry_policy: RetryPolicy | None = None,
    start_to_close: timedelta | None = None,
    schedule_to_close: timedelta | None = None,
    heartbeat_timeout: timedelta | None = None,
) -> Callable[[F], F]: ...


def defn(
    fn: F | None = None,
    *,
    name: str | None = None,
    task_queue: str = DEFAULT_TASK_QUEUE,
    retry_policy: RetryPolicy | None = None,
    start_to_close: timedelta | None = None,
    schedule_to_close: timedelta | None = None,
    heartbeat_timeout: timedelta | None = None,
) -> F | Callable[[F], F]:
    """Declare a function as an activity; use as ``@defn`` or ``@defn(...)``.

    The function is returned unchanged, so tests can still call it directly; the
    definition is attached as its ``__activity_definition__`` attribute. It may
    be ``def`` or ``async def`` and takes zero or one positional parameter (the
    input); the type hints of the parameter and the return value decide how
    input and result are validated and stored.

    Args:
        fn: The function, when used without parentheses.
        name: Registered name. Defaults to ``fn.__name__``.
        task_queue: Defaults to ``"activities"``.
        retry_policy: Defaults to ``None``, meaning the engine's default.
        start_to_close: Defaults to ``None`` (no limit per attempt).
        schedule_to_close: Defaults to ``None`` (no overall limit).
        heartbeat_timeout: Defaults to ``None`` (heartbeats not required).

    Raises:
        ActivityDefinitionError: the function cannot be an activity, or an
            option is invalid.
    """

    def decorate(function: F) -> F:
        definition = _define(
            function,
            name=name,
            task_queue=task_queue,
            retry_policy=retry_policy,
            start_to_close=start_to_close,
            schedule_to_close=schedule_to_close,
            heartbeat_timeout=heartbeat_timeout,
        )
        setattr(function, _ATTRIBUTE, definition)
        return function

    if fn is None:
        return decorate
    return decorate(fn)


def get_definition(
    target: Callable[..., Any] | ActivityDefinition | str,
    *,
    registry: Mapping[str, ActivityDefinition] | None = None,
) -> ActivityDefinition:
    """Return the :class:`ActivityDefinition` of a decorated function.

    An :class:`ActivityDefinition` is returned as is. A name is looked up in
    ``registry``; names are only meaningful to a worker that registered the
    activities, so there is no process-wide registry.

    Args:
        target: A function decorated with :func:`defn`, a definition, or a name.
        registry: Definitions by name, used for names. Defaults to ``None``.

    Raises:
        ActivityDefinitionError: ``target`` is not an activity, or the name is
            unknown.
    """
    if isinstance(target, ActivityDefinition):
        return target
    if isinstance(target, str):
        if registry is None:
            raise ActivityDefinitionError(
                f"cannot resolve activity name {target!r} without a registry: "
                "pass the decorated function instead"
            )
        try:
            return registry[target]
        except KeyError:
            raise ActivityDefinitionError(f"no activity is registered as {target!r}") from None
    definition = getattr(target, _ATTRIBUTE, None)
    if not isinstance(definition, ActivityDefinition):
        label = getattr(target, "__qualname__", None) or repr(target)
        raise ActivityDefinitionError(
            f"{label} is not an activity: decorate it with @activity.defn"
        )
    return definition


def _define(
    fn: Callable[..., Any],
    *,
    name: str | None,
    task_queue: str,
    retry_policy: RetryPolicy | None,
    start_to_close: timedelta | None,
    schedule_to_close: timedelta | None,
    heartbeat_timeout: timedelta | None,
) -> ActivityDefinition:
    if not inspect.isfunction(fn):
        # Attributes cannot be set on built-ins, and methods or partials would
        # hide parameters the engine cannot supply.
        raise ActivityDefinitionError(
            f"an activity must be a plain def or async def function, got {fn!r}"
        )
    label = fn.__qualname__
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ActivityDefinitionError(
            f"{label} is a generator function; an activity must return its result"
        )
    parameter = _single_parameter(fn, label)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise ActivityDefinitionError(
            f"cannot resolve the type hints of {label}: {exc} (define the types at module level)"
        ) from exc
    input_type = None if parameter is None else hints.get(parameter.name, Any)
    output_type = hints.get("return", Any)
    for role, tp in (("input", input_type), ("output", output_type)):
        if tp is None:
            continue
        try:
            adapter_for(tp)
        except PayloadError as exc:
            raise ActivityDefinitionError(
                f"{label} has an unusable {role} type {type_name(tp)}: {exc}"
            ) from exc
    return ActivityDefinition(
        name=fn.__name__ if name is None else name,
        fn=fn,
        input_type=input_type,
        output_type=output_type,
        is_async=inspect.iscoroutinefunction(fn),
        task_queue=task_queue,
        retry_policy=retry_policy,
        start_to_close=start_to_close,
        schedule_to_close=schedule_to_close,
        heartbeat_timeout=heartbeat_timeout,
    )


def _single_parameter(fn: Callable[..., Any], label: str) -> inspect.Parameter | None:
    parameters = list(inspect.signature(fn).parameters.values())
    if not parameters:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    first = parameters[0]
    if len(parameters) > 1 or first.kind not in positional:
        listed = ", ".join(str(parameter) for parameter in parameters)
        raise ActivityDefinitionError(
            f"{label}({listed}) cannot be an activity: it must take zero or one "
            "positional parameter (put several values in one model or dataclass)"
        )
    return first
