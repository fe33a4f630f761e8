"""Errors raised by the activity layer.

Every class derives from :class:`~outbox.errors.OrchestratorError`; those that
also derive from a built-in error (``TypeError``, ``ValueError``,
``RuntimeError``) do so because callers reasonably catch them by that meaning.
"""

from __future__ import annotations

from typing import Any

from outbox.errors import OrchestratorError

__all__ = [
    "ActivityDefinitionError",
    "ApplicationError",
    "InvalidPayloadError",
    "InvalidRetryPolicyError",
    "NotInActivityError",
    "PayloadError",
    "PayloadTooLargeError",
]


class ActivityDefinitionError(OrchestratorError, TypeError):
    """A function cannot be used as an activity, or is not one."""


class ApplicationError(OrchestratorError):
    """An error raised deliberately by activity code.

    Args:
        message: Human-readable description, kept as the failure's message.
        type: The name retry policies match against; defaults to the class
            name, so a subclass is matched by its own name.
        non_retryable: ``True`` stops retries whatever the retry policy says.
            Defaults to ``False``.
        details: JSON-able data recorded with the failure. Defaults to ``None``.
    """

    message: str
    type: str
    non_retryable: bool
    details: Any

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        non_retryable: bool = False,
        details: Any = None,
    ) -> None:
        # Only the message goes into ``args``: the other attributes live in
        # ``__dict__``, which the default exception pickling restores.
        super().__init__(message)
        self.message = message
        self.type = type if type is not None else self.__class__.__name__
        self.non_retryable = non_retryable
        self.details = details

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.message!r}, type={self.type!r}, "
            f"non_retryable={self.non_retryable!r}, details={self.details!r})"
        )


class InvalidRetryPolicyError(OrchestratorError, ValueError):
    """A retry policy has values that cannot work together."""


class NotInActivityError(OrchestratorError, RuntimeError):
    """An activity-only function was called outside a running activity."""


class PayloadError(OrchestratorError, ValueError):
    """A value cannot be converted to or from its stored JSON form."""


class InvalidPayloadError(PayloadError):
    """A value does not match the type it is declared as."""


class PayloadTooLargeError(PayloadError):
    """A payload's JSON form is larger than the allowed limit.

    Args:
        size: Size of the JSON form in bytes (UTF-8).
        limit: The limit it exceeded, in bytes.
        what: What the payload is, for the message. Defaults to ``"payload"``.
    """

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        super().__init__(f"{what} is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        # ``args`` holds the formatted message, not the constructor arguments,
        # so the default reduction would rebuild it wrongly.
        return (self.__class__, (self.size, self.limit, self.what))


class ActivityCancelledError(ApplicationError):
    """Raised by ``activity.heartbeat()`` when the attempt should stop.

    The workflow was cancelled or closed, or this attempt timed out and another
    took its place. Activity code may catch it to clean up; it is not retried.
    """

    def __init__(self, message: str = "activity cancelled") -> None:
        super().__init__(message, type="ActivityCancelled", non_retryable=True)
