"""Workflow definitions: what ``@workflow.defn`` and ``@workflow.run`` record."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import WorkflowDefinitionError

_RUN_MARK = "__workflow_run__"
_SIGNAL_MARK = "__workflow_signal__"
_QUERY_MARK = "__workflow_query__"
_DEFN_ATTR = "__workflow_definition__"


@dataclass(frozen=True)
class HandlerDefinition:
    """A signal or query handler: its name, method and argument type."""

    name: str
    method: str
    takes_input: bool
    input_type: Any
    output_type: Any
    is_async: bool


@dataclass(frozen=True)
class WorkflowDefinition:
    """A workflow class, its type name and its run method's input and output types."""

    name: str
    cls: type[Any]
    run_method: str
    takes_input: bool
    input_type: Any
    output_type: Any
    signals: dict[str, HandlerDefinition]
    queries: dict[str, HandlerDefinition]


def mark_run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method as the workflow's entry point."""
    if not inspect.iscoroutinefunction(fn):
        raise WorkflowDefinitionError(
            f"@workflow.run method {fn.__qualname__} must be an 'async def'"
        )
    setattr(fn, _RUN_MARK, True)
    return fn


def mark_handler(fn: Callable[..., Any], kind: str, name: str | None) -> Callable[..., Any]:
    """Mark a method as a signal or query handler under ``name`` (default: its own)."""
    if kind == "query" and inspect.iscoroutinefunction(fn):
        raise WorkflowDefinitionError(f"query {fn.__qualname__} must be a plain 'def'")
    setattr(fn, _SIGNAL_MARK if kind == "signal" else _QUERY_MARK, name or fn.__name__)
    return fn


def _handler(cls: type[Any], attr: str, name: str) -> HandlerDefinition:
    method = getattr(cls, attr)
    params = [
        p
        for p in list(inspect.signature(method).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) > 1:
        raise WorkflowDefinitionError(
            f"{cls.__qualname__}.{attr} takes {len(params)} arguments; handlers take at most one"
        )
    hints = typing.get_type_hints(method)
    return HandlerDefinition(
        name=name,
        method=attr,
        takes_input=bool(params),
        input_type=hints.get(params[0].name, Any) if params else None,
        output_type=hints.get("return", Any),
        is_async=inspect.iscoroutinefunction(method),
    )


def define(cls: type[Any], name: str | None) -> WorkflowDefinition:
    """Build and attach the definition of a workflow class."""
    runs = [
        attr
        for attr, value in vars(cls).items()
        if callable(value) and getattr(value, _RUN_MARK, False)
    ]
    if len(runs) != 1:
        raise WorkflowDefinitionError(
            f"workflow {cls.__qualname__} needs exactly one @workflow.run method, found {len(runs)}"
        )
    method = getattr(cls, runs[0])
    params = [
        p
        for p in list(inspect.signature(method).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) > 1:
        raise WorkflowDefinitionError(
            f"{cls.__qualname__}.{runs[0]} takes {len(params)} arguments; a workflow "
            "takes at most one (use a model to pass several values)"
        )
    try:
        hints = typing.get_type_hints(method)
    except Exception as exc:  # a forward reference that cannot be resolved
        raise WorkflowDefinitionError(
            f"cannot resolve the type hints of {cls.__qualname__}.{runs[0]}: {exc}"
        ) from exc
    input_type = hints.get(params[0].name, Any) if params else None
    signals: dict[str, HandlerDefinition] = {}
    queries: dict[str, HandlerDefinition] = {}
    for attr in dir(cls):
        value = getattr(cls, attr, None)
        if not callable(value):
            continue
        signal_name = getattr(value, _SIGNAL_MARK, None)
        query_name = getattr(value, _QUERY_MARK, None)
        if signal_name:
            signals[signal_name] = _handler(cls, attr, signal_name)
        if query_name:
            queries[query_name] = _handler(cls, attr, query_name)
    defn = WorkflowDefinition(
        name=name or cls.__name__,
        cls=cls,
        run_method=runs[0],
        takes_input=bool(params),
        input_type=input_type,
        output_type=hints.get("return", Any),
        signals=signals,
        queries=queries,
    )
    setattr(cls, _DEFN_ATTR, defn)
    return defn


def definition_of(obj: Any) -> WorkflowDefinition:
    """The definition of a ``@workflow.defn`` class."""
    defn = getattr(obj, _DEFN_ATTR, None) if isinstance(obj, type) else None
    if not isinstance(defn, WorkflowDefinition) or defn.cls is not obj:
        raise WorkflowDefinitionError(f"{obj!r} is not a workflow: decorate it with @workflow.defn")
    return defn
