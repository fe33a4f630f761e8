"""When a failed activity attempt is tried again, and after how long."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from activities.errors import InvalidRetryPolicyError
from activities.failure import Failure

__all__ = ["DEFAULT_RETRY_POLICY", "RetryPolicy"]

_FIELDS = (
    "initial_interval",
    "backoff_coefficient",
    "maximum_interval",
    "maximum_attempts",
    "non_retryable_error_types",
)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff between attempts, with optional limits.

    Attributes:
        initial_interval: Wait after the first failed attempt. Defaults to 1 s.
        backoff_coefficient: Factor by which each wait grows; at least 1.
            Defaults to 2.0.
        maximum_interval: Cap on a single wait. Defaults to ``None``, meaning
            100 x ``initial_interval``.
        maximum_attempts: Total attempts allowed, the first included. Defaults
            to 0, meaning unlimited.
        non_retryable_error_types: Failure types (exception class names or
            :attr:`ApplicationError.type`) that are never retried. Defaults to
            none. A list is accepted and stored as a tuple.

    Raises:
        InvalidRetryPolicyError: a value is of the wrong type or out of range.
    """

    initial_interval: timedelta = timedelta(seconds=1)
    backoff_coefficient: float = 2.0
    maximum_interval: timedelta | None = None
    maximum_attempts: int = 0
    non_retryable_error_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.initial_interval, timedelta):
            raise InvalidRetryPolicyError(
                f"initial_interval must be a timedelta, got {self.initial_interval!r}"
            )
        if self.initial_interval <= timedelta(0):
            raise InvalidRetryPolicyError(
                f"initial_interval must be positive, got {self.initial_interval}"
            )
        coefficient = self.backoff_coefficient
        if isinstance(coefficient, bool) or not isinstance(coefficient, int | float):
            raise InvalidRetryPolicyError(
                f"backoff_coefficient must be a number, got {coefficient!r}"
            )
        if not (math.isfinite(coefficient) and coefficient >= 1):
            raise InvalidRetryPolicyError(
                f"backoff_coefficient must be at least 1, got {coefficient!r}"
            )
        # Stored as float so that equality and the JSON form do not depend on
        # whether the caller wrote 2 or 2.0.
        object.__setattr__(self, "backoff_coefficient", float(coefficient))
        if self.maximum_interval is not None:
            if not isinstance(self.maximum_interval, timedelta):
                raise InvalidRetryPolicyError(
                    f"maximum_interval must be a timedelta or None, got {self.maximum_interval!r}"
                )
            if self.maximum_interval < self.initial_interval:
                raise InvalidRetryPolicyError(
                    f"maximum_interval ({self.maximum_interval}) must not be shorter than "
                    f"initial_interval ({self.initial_interval})"
                )
        attempts = self.maximum_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise InvalidRetryPolicyError(f"maximum_attempts must be an int, got {attempts!r}")
        if attempts < 0:
            raise InvalidRetryPolicyError(
                f"maximum_attempts must be 0 (unlimited) or positive, got {attempts}"
            )
        types: Any = self.non_retryable_error_types
        # A bare string would otherwise be taken as a sequence of one-letter names.
        if isinstance(types, str) or not isinstance(types, tuple | list):
            raise InvalidRetryPolicyError(
                f"non_retryable_error_types must be a sequence of type names, got {types!r}"
            )
        if not all(isinstance(name, str) and name for name in types):
            raise InvalidRetryPolicyError(
                f"non_retryable_error_types must hold non-empty type names, got {types!r}"
            )
        object.__setattr__(self, "non_retryable_error_types", tuple(types))

    @property
    def effective_maximum_interval(self) -> timedelta:
        """The cap actually applied: ``maximum_interval`` or 100 x ``initial_interval``."""
        if self.maximum_interval is not None:
            return self.maximum_interval
        return self.initial_interval * 100

    def delay_after(self, attempt: int) -> timedelta:
        """Return the wait after failed attempt ``attempt`` (1-based) before the next.

        That is ``initial_interval * backoff_coefficient ** (attempt - 1)``,
        capped at :attr:`effective_maximum_interval`. Attempt numbers below 1
        are treated as 1.
        """
        initial = self.initial_interval.total_seconds()
        cap = self.effective_maximum_interval.total_seconds()
        steps = max(attempt, 1) - 1
        coefficient = self.backoff_coefficient
        # Compared in log space: the plain power overflows a float long before
        # attempt numbers get unrealistic.
        if coefficient == 1.0 or steps == 0:
            seconds = initial
        elif steps * math.log(coefficient) >= math.log(cap / initial):
            return self.effective_maximum_interval
        else:
            seconds = initial * coefficient**steps
        return min(timedelta(seconds=seconds), self.effective_maximum_interval)

    def should_retry(self, attempt: int, failure: Failure) -> bool:
        """Return whether attempt ``attempt`` (1-based), which failed with ``failure``, is retried.

        No when the failure is marked non-retryable, when its type is listed in
        :attr:`non_retryable_error_types`, or when ``attempt`` has reached
        :attr:`maximum_attempts`.
        """
        if failure.non_retryable or failure.type in self.non_retryable_error_types:
            return False
        return not (self.maximum_attempts and attempt >= self.maximum_attempts)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-able form; intervals are float seconds."""
        return {
            "initial_interval": self.initial_interval.total_seconds(),
            "backoff_coefficient": self.backoff_coefficient,
            "maximum_interval": (
                None if self.maximum_interval is None else self.maximum_interval.total_seconds()
            ),
            "maximum_attempts": self.maximum_attempts,
            "non_retryable_error_types": list(self.non_retryable_error_types),
        }

    @classmethod
    def from_json(cls, data: Any) -> RetryPolicy:
        """Rebuild a policy from :meth:`to_json` output.

        Missing keys take their defaults; unknown keys are ignored so that a
        policy stored by a newer version still loads.

        Raises:
            InvalidRetryPolicyError: ``data`` is not a valid stored policy.
        """
        if not isinstance(data, dict):
            raise InvalidRetryPolicyError(f"a stored retry policy is a dict, got {data!r}")
        kwargs: dict[str, Any] = {key: data[key] for key in _FIELDS if key in data}
        for key in ("initial_interval", "maximum_interval"):
            value = kwargs.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRetryPolicyError(f"{key} must be a number of seconds, got {value!r}")
            try:
                kwargs[key] = timedelta(seconds=value)
            except (OverflowError, ValueError) as exc:
                raise InvalidRetryPolicyError(f"{key} is out of range: {value!r}") from exc
        if kwargs.get("initial_interval", timedelta(seconds=1)) is None:
            raise InvalidRetryPolicyError("initial_interval must be a number of seconds, got None")
        types = kwargs.get("non_retryable_error_types")
        if isinstance(types, list):
            kwargs["non_retryable_error_types"] = tuple(types)
        return cls(**kwargs)


DEFAULT_RETRY_POLICY = RetryPolicy()
"""The policy used when neither the activity nor the call names one."""
