"""Domain event types: payload models registered under stable names and versions.

An event type is a pydantic model (a :class:`DomainEvent`) declared under a
dotted name such as ``"order.completed"`` and a schema version. The name is the
routing key on the broker and never changes; a payload change that old readers
cannot accept gets a new class under the same name and the next version, and an
*upcaster* that turns the previous version's payload into it. Payloads are
read tolerantly: fields a reader does not know are ignored, so adding an
optional field needs no new version.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from events.errors import EventSchemaError, EventTypeError, UnknownEventTypeError

__all__ = [
    "MAX_TYPE_LENGTH",
    "DomainEvent",
    "EventRegistry",
    "Upcaster",
    "event_type",
    "registry",
    "validate_type_name",
]

#: Longest event type name; it is a routing key, which AMQP caps at 255 bytes.
MAX_TYPE_LENGTH = 255

# Dotted lower-case words: the '*' and '#' of topic patterns can never occur in a name.
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")

E = TypeVar("E", bound="DomainEvent")

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the payload of one version of an event type into the payload of the next."""


class DomainEvent(BaseModel):
    """Base class of event payloads: frozen, and tolerant of fields it does not know.

    Declare each subclass with :func:`event_type` (or
    :meth:`EventRegistry.event_type`), which sets :attr:`EVENT_TYPE` and
    :attr:`EVENT_VERSION` and registers it.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    EVENT_TYPE: ClassVar[str]
    EVENT_VERSION: ClassVar[int]


def validate_type_name(name: str) -> str:
    """Return ``name`` if it is a valid event type name, else raise :class:`EventTypeError`.

    A name is dot-separated words of lower-case letters, digits, ``_`` and
    ``-``, starting with a letter, at most :data:`MAX_TYPE_LENGTH` characters.
    """
    if len(name) > MAX_TYPE_LENGTH or not _TYPE_NAME.match(name):
        raise EventTypeError(
            f"invalid event type name {name!r}: use dot-separated lower-case words "
            "such as 'order.completed'"
        )
    return name


def is_declared(cls: type[DomainEvent]) -> bool:
    """Whether ``cls`` itself (not merely a base class) was declared as an event type."""
    return "EVENT_TYPE" in cls.__dict__ and "EVENT_VERSION" in cls.__dict__


class EventRegistry:
    """Event types by name and version, with the upcasters between versions.

    Safe to use from several threads. The module-level :data:`registry` is the
    default everywhere; a separate registry keeps test or tenant types apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._types: dict[str, dict[int, type[DomainEvent]]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    # -- declaring ----------------------------------------------------------------
    def register(self, cls: type[E], name: str, *, version: int = 1) -> type[E]:
        """Register ``cls`` as version ``version`` of event type ``name``; return ``cls``.

        Registering the same class again is a no-op, and so is a class with the
        same module and qualified name (a reloaded module). ``version`` defaults to 1.

        Raises:
            EventTypeError: for an invalid name or version, a class that is not
                a :class:`DomainEvent`, or a different class already registered
                under this name and version.
        """
        validate_type_name(name)
        if not (isinstance(cls, type) and issubclass(cls, DomainEvent)):
            raise EventTypeError(f"{cls!r} is not a DomainEvent subclass")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise EventTypeError(f"event type {name!r}: version must be a positive integer")
        with self._lock:
            versions = self._types.setdefault(name, {})
            existing = versions.get(version)
            if (
                existing is not None
                and existing is not cls
                and _qualname(existing) != _qualname(cls)
            ):
                raise EventTypeError(
                    f"event type {name!r} version {version} is already "
                    f"{_qualname(existing)}; cannot register {_qualname(cls)}"
                )
            if is_declared(cls) and (name, version) != (cls.EVENT_TYPE, cls.EVENT_VERSION):
                raise EventTypeError(
                    f"{_qualname(cls)} is already event type {cls.EVENT_TYPE!r} "
                    f"version {cls.EVENT_VERSION}"
                )
            cls.EVENT_TYPE = name
            cls.EVENT_VERSION = version
            versions[version] = cls
        return cls

    def event_type(self, name: str, *, version: int = 1) -> Callable[[type[E]], type[E]]:
        """Class decorator: register the class as ``name`` at ``version`` (default 1)."""
        validate_type_name(name)

        def decorate(cls: type[E]) -> type[E]:
            return self.register(cls, name, version=version)

        return decorate

    def upcaster(self, name: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: register a function turning a ``from_version`` payload into the next.

        Upcasters chain: a reader of version 3 gets a version 1 event through
        the 1->2 and 2->3 upcasters. They take and return plain JSON dicts.
        """
        validate_type_name(name)

        def decorate(function: Upcaster) -> Upcaster:
            with self._lock:
                self._upcasters[(name, from_version)] = function
            return function

        return decorate

    # -- looking up ---------------------------------------------------------------
    def get(self, name: str, version: int) -> type[DomainEvent]:
        """The class of ``name`` at ``version``; raises :class:`UnknownEventTypeError`."""
        with self._lock:
            cls = self._types.get(name, {}).get(version)
            known = sorted(self._types.get(name, {}))
        if cls is None:
            if not known:
                raise UnknownEventTypeError(f"unknown event type {name!r}")
            raise UnknownEventTypeError(
                f"unknown version {version} of event type {name!r} (known: {known})"
            )
        return cls

    def latest(self, name: str) -> type[DomainEvent]:
        """The class of the newest registered version of ``name``."""
        with self._lock:
            versions = self._types.get(name)
            if not versions:
                raise UnknownEventTypeError(f"unknown event type {name!r}")
            return versions[max(versions)]

    def names(self) -> list[str]:
        """Every registered type name, sorted."""
        with self._lock:
            return sorted(self._types)

    def versions(self, name: str) -> list[int]:
        """The registered versions of ``name``, oldest first (empty if unknown)."""
        with self._lock:
            return sorted(self._types.get(name, {}))

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._types

    # -- reading ------------------------------------------------------------------
    def load(
        self,
        name: str,
        version: int,
        payload: dict[str, Any],
        *,
        as_version: int | None = None,
    ) -> DomainEvent:
        """Validate ``payload`` of ``name`` at ``version`` into its class.

        With ``as_version`` (default: ``version`` itself), the payload is first
        upcast to that version through the registered upcasters.

        Raises:
            UnknownEventTypeError: no class for the target version, or a missing
                upcaster on the way.
            EventSchemaError: the payload does not fit the class, an upcaster
                failed, or ``as_version`` is older than ``version``.
        """
        target = version if as_version is None else as_version
        if target < version:
            raise EventSchemaError(
                f"event {name!r} is version {version}; a reader of version {target} "
                "cannot read it (versions are never downcast)"
            )
        cls = self.get(name, target)
        data = payload
        for step in range(version, target):
            with self._lock:
                upcast = self._upcasters.get((name, step))
            if upcast is None:
                raise UnknownEventTypeError(
                    f"no upcaster from version {step} to {step + 1} of event type {name!r}"
                )
            try:
                data = upcast(dict(data))
            except Exception as exc:
                raise EventSchemaError(
                    f"upcasting {name!r} from version {step} failed: {exc!r}"
                ) from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EventSchemaError(
                f"payload does not match {name!r} version {target}: {_short(exc)}"
            ) from exc


def _qualname(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(item) for item in error["loc"]) or "(payload)"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


registry = EventRegistry()
"""The default registry, which :func:`event_type` declares into.

A module-level registry, like pydantic's model classes themselves: event types
are declarations, made once at import, and every process that imports the
module that declares them knows them.
"""


def event_type(
    name: str, *, version: int = 1, registry: EventRegistry | None = None
) -> Callable[[type[E]], type[E]]:
    """Class decorator declaring a :class:`DomainEvent` subclass as event type ``name``.

    ``version`` defaults to 1; ``registry`` defaults to the module-level
    :data:`registry`::

        @event_type("order.completed", version=1)
        class OrderCompleted(DomainEvent):
            order_id: str
    """
    return (registry or _default()).event_type(name, version=version)


def _default() -> EventRegistry:
    # event_type's own ``registry`` parameter hides the module-level name.
    return registry
