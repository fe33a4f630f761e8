"""The workflows and activities one orchestrator knows, by their stable names."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from activities.definition import ActivityDefinition, get_definition
from orchestrator.definition import WorkflowDefinition, definition_of
from orchestrator.errors import (
    ConfigurationError,
    UnknownActivityTypeError,
    UnknownWorkflowTypeError,
)


class Registry:
    """Lookup of workflow and activity definitions; names must be unique."""

    def __init__(
        self,
        workflows: Iterable[type[Any]] = (),
        activities: Iterable[Callable[..., Any] | ActivityDefinition] = (),
    ) -> None:
        self._workflows: dict[str, WorkflowDefinition] = {}
        self._activities: dict[str, ActivityDefinition] = {}
        for cls in workflows:
            wf = definition_of(cls)
            if wf.name in self._workflows:
                raise ConfigurationError(f"two workflows are named {wf.name!r}")
            self._workflows[wf.name] = wf
        for fn in activities:
            act = get_definition(fn)
            if act.name in self._activities:
                raise ConfigurationError(f"two activities are named {act.name!r}")
            self._activities[act.name] = act

    @property
    def workflows(self) -> dict[str, WorkflowDefinition]:
        return dict(self._workflows)

    @property
    def activities(self) -> dict[str, ActivityDefinition]:
        return dict(self._activities)

    def workflow(self, ref: str | type[Any]) -> WorkflowDefinition:
        """A workflow by type name or class; UnknownWorkflowTypeError if not registered."""
        name = ref if isinstance(ref, str) else definition_of(ref).name
        try:
            return self._workflows[name]
        except KeyError:
            raise UnknownWorkflowTypeError(name, list(self._workflows)) from None

    def has_workflow(self, name: str) -> bool:
        return name in self._workflows

    @property
    def activity_types(self) -> list[str]:
        return list(self._activities)

    def has_activity(self, name: str) -> bool:
        return name in self._activities

    def activity(self, name: str) -> ActivityDefinition:
        try:
            return self._activities[name]
        except KeyError:
            raise UnknownActivityTypeError(name) from None
