"""The stored form of an error raised by an activity (or a workflow)."""

from __future__ import annotations

import traceback
from typing import Any

import pydantic

from activities.errors import ApplicationError, InvalidPayloadError
from activities.payload import to_payload

__all__ = ["MAX_STACK_CHARS", "Failure"]

MAX_STACK_CHARS = 8 * 1024
"""Longest stored traceback text; longer ones keep their end, where the raise is."""

# Details are stored next to the failure, so they get a budget of the same order
# as the traceback rather than the full payload limit.
_MAX_DETAILS_BYTES = 64 * 1024


class Failure(pydantic.BaseModel):
    """An error in a form that can be stored as JSON and inspected later.

    Attributes:
        type: The exception's class name, or :attr:`ApplicationError.type`.
        message: The error message.
        non_retryable: ``True`` when retrying cannot help. Defaults to ``False``.
        details: JSON-able data attached by :class:`ApplicationError`.
            Defaults to ``None``.
        stack: Formatted traceback, at most :data:`MAX_STACK_CHARS` characters.
            Defaults to ``None``.
        cause: The failure this one was raised from (``raise ... from``), one
            level deep. Defaults to ``None``.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="ignore")

    type: str
    message: str
    non_retryable: bool = False
    details: Any = None
    stack: str | None = None
    cause: Failure | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> Failure:
        """Capture ``exc`` and its direct ``__cause__``. Never raises."""
        cause = exc.__cause__
        return cls._capture(exc, None if cause is None else cls._capture(cause, None))

    @classmethod
    def _capture(cls, exc: BaseException, cause: Failure | None) -> Failure:
        if isinstance(exc, ApplicationError):
            return cls(
                type=exc.type,
                message=exc.message,
                non_retryable=exc.non_retryable,
                details=_storable_details(exc.details),
                stack=_stack(exc),
                cause=cause,
            )
        return cls(
            type=exc.__class__.__name__,
            message=_message(exc),
            stack=_stack(exc),
            cause=cause,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-able form, as accepted by :meth:`from_json`."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Any) -> Failure:
        """Rebuild a failure from :meth:`to_json` output.

        Raises:
            InvalidPayloadError: ``data`` is not a stored failure.
        """
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as exc:
            raise InvalidPayloadError(f"not a stored failure: {exc}") from exc


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        # A broken ``__str__`` must not lose the failure itself.
        return f"<unprintable {exc.__class__.__name__}>"


def _stack(exc: BaseException) -> str | None:
    if exc.__traceback__ is None:
        return None
    # The cause is captured separately, so its traceback is left out here.
    text = "".join(traceback.format_exception(exc, chain=False))
    if len(text) <= MAX_STACK_CHARS:
        return text
    marker = f"[{len(text) - MAX_STACK_CHARS} characters truncated]\n"
    return marker + text[-MAX_STACK_CHARS:]


def _storable_details(details: Any) -> Any:
    if details is None:
        return None
    try:
        return to_payload(details, limit=_MAX_DETAILS_BYTES)
    except Exception as exc:
        # Losing the details is better than losing the failure.
        return {"unstorable_details": _repr(details)[:1024], "reason": _message(exc)}


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {value.__class__.__name__}>"
