"""The root of the project's error hierarchy.

Every error the project raises derives from :class:`OrchestratorError`. The root
lives in the lowest layer (the outbox) because every other package builds on it;
``orchestrator`` re-exports it, which is where users import it from.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error raised by this project."""

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (Celery results, worker logs); subclasses
        # take keyword arguments, so rebuild from the instance's state instead.
        return (_restore, (type(self), self.args, self.__dict__))


def _restore(
    cls: type[OrchestratorError], args: tuple[object, ...], state: dict[str, object]
) -> OrchestratorError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class OutboxError(OrchestratorError):
    """A message could not be written to or relayed from the outbox."""


class PublishError(OutboxError):
    """The broker did not confirm a publish; the message stays in the outbox."""


class BrokerUnavailableError(PublishError):
    """The broker could not be reached, or did not answer in time (a memory or disk alarm).

    Unlike a refusal of one message, it is likely to say nothing about the
    message: the next ones would wait and fail the same way.
    """
