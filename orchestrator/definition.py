"""Workflow definitions: what ``@workflow.defn`` and ``@workflow.run`` record."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import WorkflowDefinitionError

_RUN_MARK = "__workflow_run__"
_DEFN_ATTR = "__workflow_definition__"


@dataclass(frozen=True)
class WorkflowDefinition:
    """A workflow class, its type name and its run method's input and output types."""

    name: str
    cls: type[Any]
    run_method: str
    takes_input: bool
    input_type: Any
    output_type: Any


def mark_run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a method as the workflow's entry point."""
    if not inspect.iscoroutinefunction(fn):
        raise WorkflowDefinitionError(
            f"@workflow.run method {fn.__qualname__} must be an 'async def'"
        )
    setattr(fn, _RUN_MARK, True)
    return fn


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
    defn = WorkflowDefinition(
        name=name or cls.__name__,
        cls=cls,
        run_method=runs[0],
        takes_input=bool(params),
        input_type=input_type,
        output_type=hints.get("return", Any),
    )
    setattr(cls, _DEFN_ATTR, defn)
    return defn


def definition_of(obj: Any) -> WorkflowDefinition:
    """The definition of a ``@workflow.defn`` class."""
    defn = getattr(obj, _DEFN_ATTR, None) if isinstance(obj, type) else None
    if not isinstance(defn, WorkflowDefinition) or defn.cls is not obj:
        raise WorkflowDefinitionError(f"{obj!r} is not a workflow: decorate it with @workflow.defn")
    return defn
