"""Durable workflows and sagas on Celery, RabbitMQ and PostgreSQL.

Workflow code imports ``from orchestrator import workflow``; applications build
an :class:`Orchestrator` and start runs through its :class:`Client`.
"""

from __future__ import annotations

from orchestrator import workflow
from orchestrator.app import Orchestrator
from orchestrator.client import Client, RunDescription, WorkflowHandle
from orchestrator.errors import (
    ActivityError,
    ConfigurationError,
    InvalidWorkflowIdError,
    NondeterminismError,
    NotInWorkflowError,
    ResultTimeoutError,
    RunClosedError,
    StartInDoubtError,
    UnknownActivityTypeError,
    UnknownWorkflowTypeError,
    WorkflowAlreadyStartedError,
    WorkflowDefinitionError,
    WorkflowFailedError,
    WorkflowNotFoundError,
)
from orchestrator.history import RecordedEvent
from orchestrator.policies import IdConflictPolicy, IdReusePolicy, RunStatus
from orchestrator.settings import Settings
from outbox.errors import OrchestratorError

__all__ = [
    "ActivityError",
    "Client",
    "ConfigurationError",
    "IdConflictPolicy",
    "IdReusePolicy",
    "InvalidWorkflowIdError",
    "NondeterminismError",
    "NotInWorkflowError",
    "Orchestrator",
    "OrchestratorError",
    "RecordedEvent",
    "ResultTimeoutError",
    "RunClosedError",
    "RunDescription",
    "RunStatus",
    "Settings",
    "StartInDoubtError",
    "UnknownActivityTypeError",
    "UnknownWorkflowTypeError",
    "WorkflowAlreadyStartedError",
    "WorkflowDefinitionError",
    "WorkflowFailedError",
    "WorkflowHandle",
    "WorkflowNotFoundError",
    "workflow",
]
