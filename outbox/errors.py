"""The root of the project's error hierarchy.

Every error the project raises derives from :class:`OrchestratorError`. The root
lives in the lowest layer (the outbox) because every other package builds on it;
``orchestrator`` re-exports it, which is where users import it from.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error raised by this project."""


class OutboxError(OrchestratorError):
    """A message could not be written to or relayed from the outbox."""


class PublishError(OutboxError):
    """The broker did not confirm a publish; the message stays in the outbox."""
