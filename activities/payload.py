"""Conversion between Python values and the JSON-able data that is stored.

Activity and workflow inputs, results and heartbeat details are stored as JSON,
so every value passes through a type adapter for its declared type: out with
:func:`to_payload`, back with :func:`from_payload`. Any type a model field can
have (models, dataclasses, ``TypedDict``, standard containers,
dates, UUIDs, ...) works as a payload type; ``Any`` accepts any JSON-able value.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pydantic
import pydantic_core

from activities.errors import InvalidPayloadError, PayloadError, PayloadTooLargeError

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "adapter_for",
    "from_payload",
    "payload_size",
    "to_payload",
    "type_name",
    "validate_input",
]

DEFAULT_MAX_PAYLOAD_BYTES = 2 * 1024 * 1024
"""Largest JSON form of a payload accepted by default: 2 MiB."""

# Bounded because types defined inside functions are new objects on each call
# and would otherwise be kept alive forever.
_CACHE_SIZE = 1024


def type_name(tp: Any) -> str:
    """Return a readable name of ``tp`` for messages (``"Order"``, ``"list[int]"``)."""
    if tp is Any:
        return "Any"
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_adapter(tp: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(tp)


def _build_adapter(tp: Any) -> pydantic.TypeAdapter[Any]:
    try:
        return _cached_adapter(tp)
    except TypeError as exc:
        # Unhashable type expressions cannot be cache keys; anything else that
        # raised TypeError was raised while building the adapter itself.
        if "unhashable" not in str(exc):
            raise
        return pydantic.TypeAdapter(tp)


def adapter_for(tp: Any) -> pydantic.TypeAdapter[Any]:
    """Return the (cached) type adapter of ``tp``.

    Raises:
        PayloadError: no type adapter can be built for ``tp``.
    """
    try:
        return _build_adapter(tp)
    except (pydantic.PydanticUserError, NameError, TypeError) as exc:
        raise PayloadError(f"values of type {type_name(tp)} cannot be payloads: {exc}") from exc


def payload_size(data: Any) -> int:
    """Return the size in bytes of the compact UTF-8 JSON form of ``data``.

    Raises:
        InvalidPayloadError: ``data`` is not JSON-able (including NaN and infinities,
            which JSON does not have).
    """
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidPayloadError(f"payload is not JSON-able: {exc}") from exc
    return len(text.encode("utf-8"))


def to_payload(value: Any, tp: Any = Any, *, limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Any:
    """Convert ``value`` of type ``tp`` to JSON-able data.

    A value that is not already an instance of ``tp`` (a dict for a model, say)
    is validated as ``tp`` first, so raw data is accepted wherever the typed
    value is.

    Args:
        value: The value to convert.
        tp: Its declared type. Defaults to ``Any``: the value's own runtime type
            decides how it is dumped.
        limit: Largest allowed size of the JSON form, in bytes. Defaults to
            :data:`DEFAULT_MAX_PAYLOAD_BYTES`.

    Raises:
        InvalidPayloadError: ``value`` is not a valid ``tp`` or cannot be dumped.
        PayloadTooLargeError: the JSON form is larger than ``limit``.
        PayloadError: no type adapter can be built for ``tp``.
    """
    adapter = adapter_for(tp)
    try:
        data = adapter.dump_python(value, mode="json", warnings="error")
    except pydantic_core.PydanticSerializationError:
        # The serializer only knows instances of ``tp``; raw data is checked
        # and converted to one before giving up.
        try:
            data = adapter.dump_python(adapter.validate_python(value), mode="json")
        except pydantic.ValidationError as exc:
            raise _invalid(tp, exc) from exc
        except pydantic_core.PydanticSerializationError as exc:
            raise InvalidPayloadError(f"value cannot be stored as {type_name(tp)}: {exc}") from exc
    size = payload_size(data)
    if size > limit:
        raise PayloadTooLargeError(size, limit)
    return data


def from_payload(data: Any, tp: Any = Any) -> Any:
    """Convert stored JSON-able ``data`` back to a value of type ``tp``.

    Args:
        data: Data as produced by :func:`to_payload`.
        tp: The type to produce. Defaults to ``Any``, which returns ``data``
            unchanged.

    Raises:
        InvalidPayloadError: ``data`` is not a valid ``tp``; the message names the
            type and each validation error.
        PayloadError: no type adapter can be built for ``tp``.
    """
    adapter = adapter_for(tp)
    try:
        return adapter.validate_python(data)
    except pydantic.ValidationError as exc:
        raise _invalid(tp, exc) from exc


def validate_input(value: Any, tp: Any) -> Any:
    """Check an input before anything is written, and return it as a ``tp``.

    ``value`` may be an instance of ``tp`` (returned as is) or raw data such as
    a dict (validated into one). The result must also be storable, so a value
    that validates but cannot be dumped is rejected here rather than later.

    Raises:
        InvalidPayloadError: ``value`` is not a valid ``tp`` or is not storable.
        PayloadError: no type adapter can be built for ``tp``.
    """
    validated = from_payload(value, tp)
    adapter = adapter_for(tp)
    try:
        adapter.dump_python(validated, mode="json", warnings="error")
    except pydantic_core.PydanticSerializationError as exc:
        raise InvalidPayloadError(f"value cannot be stored as {type_name(tp)}: {exc}") from exc
    return validated


def _invalid(tp: Any, exc: pydantic.ValidationError) -> InvalidPayloadError:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )
    return InvalidPayloadError(f"expected {type_name(tp)}: {problems}")
