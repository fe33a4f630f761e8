"""Subscribers: handlers of domain events, in groups that each own a queue.

A handler is a plain function decorated with :func:`subscriber`::

    @subscriber("order.*", group="notifications")
    def email_customer(event: OrderCompleted | OrderCompensated, session: Session) -> None:
        ...

It is called with the event and ``session``, the SQLAlchemy session of the
transaction the runtime opened for this delivery. The inbox row that marks the
event as handled by the group is written in that same transaction, so
whatever the handler writes through ``session`` happens once per event, however
often the event is delivered. A handler that declares a third parameter also
gets the :class:`EventEnvelope` (ids, time, producer).

The first parameter's annotation says what the handler receives:

- :class:`EventEnvelope` (or no annotation, or ``Any``): the envelope as it
  came, for any type the pattern matches, known to this process or not;
- :class:`DomainEvent`: the payload decoded into its registered class;
- one or more declared event classes (``A | B``): the payload decoded into that
  class, upcast from an older version if needed;
- a common base class of declared event classes (a :class:`DomainEvent`
  subclass not declared itself): the payload of any declared event deriving
  from it, decoded into its own class.

Event classes in the annotation narrow the pattern: events of other types are
not passed to the handler.

Every handler of a group whose pattern matches an event runs in the same
transaction; if one fails, the delivery is retried as a whole.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import threading
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sqlalchemy.orm import Session

from events.domain import DomainEvent, EventRegistry, is_declared
from events.envelope import EventEnvelope
from events.errors import EventSchemaError, SubscriberError
from events.topology import validate_group_name

__all__ = [
    "MODULES_ENV_VAR",
    "SubscriberRegistry",
    "Subscription",
    "load_subscriber_modules",
    "subscriber",
    "subscriptions",
    "topic_matches",
    "validate_pattern",
]

MODULES_ENV_VAR = "ORCHESTRATOR_SUBSCRIBER_MODULES"
"""Environment variable naming the modules (comma-separated) that declare subscribers."""

F = TypeVar("F", bound=Callable[..., None])

_PATTERN_WORD = re.compile(r"^(\*|#|[a-z0-9][a-z0-9_-]*)$")


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid topic pattern, else raise :class:`SubscriberError`.

    Patterns are dot-separated words as in event type names, where ``*``
    stands for exactly one word and ``#`` for zero or more (``"order.*"``,
    ``"#"``).
    """
    if not isinstance(pattern, str) or not pattern or len(pattern) > 255:
        raise SubscriberError(f"invalid topic pattern {pattern!r}")
    if not all(_PATTERN_WORD.match(word) for word in pattern.split(".")):
        raise SubscriberError(
            f"invalid topic pattern {pattern!r}: use dot-separated lower-case words, "
            "'*' for one word and '#' for any number"
        )
    return pattern


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether ``routing_key`` matches topic ``pattern``, as a topic exchange decides it."""
    return _matches(tuple(pattern.split(".")), tuple(routing_key.split(".")))


@functools.lru_cache(maxsize=4096)
def _matches(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_matches(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head in {"*", words[0]}) and _matches(rest, words[1:])


Mode = Literal["envelope", "any", "classes"]


@dataclass(frozen=True)
class _Spec:
    mode: Mode
    classes: tuple[type[DomainEvent], ...] = ()
    with_envelope: bool = False
    # Undeclared DomainEvent subclasses: every declared event deriving from one is taken.
    bases: tuple[type[DomainEvent], ...] = ()


@dataclass(eq=False)
class Subscription:
    """One handler of one group, bound to a topic pattern.

    Attributes:
        name: Unique name, in logs and dead-letter reasons. Defaults to the
            handler's ``module.qualname``.
        group: The subscriber group, which owns a queue.
        pattern: Topic pattern of the event types it handles.
        handler: The function.
    """

    name: str
    group: str
    pattern: str
    handler: Callable[..., None]
    _spec: _Spec | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def matches(self, event_type: str) -> bool:
        """Whether the pattern matches ``event_type``."""
        return topic_matches(self.pattern, event_type)

    def resolve(self) -> None:
        """Read the handler's signature now (done before the first event anyway).

        Raises:
            SubscriberError: the signature or the first parameter's annotation
                is not one a handler may have.
        """
        self._resolved()

    def _resolved(self) -> _Spec:
        with self._lock:
            if self._spec is None:
                self._spec = _inspect_handler(self.name, self.handler)
            return self._spec

    @property
    def with_envelope(self) -> bool:
        """Whether the handler takes the envelope as a third argument."""
        return self._resolved().with_envelope

    def argument(
        self, envelope: EventEnvelope, events: EventRegistry
    ) -> EventEnvelope | DomainEvent | None:
        """What to pass the handler for ``envelope``, or ``None`` if it does not handle it.

        Raises:
            UnknownEventTypeError: the handler needs the payload decoded and
                the type or version is not registered.
            EventSchemaError: the payload does not fit the class the handler reads.
        """
        spec = self._resolved()
        if spec.mode == "envelope":
            return envelope
        if spec.mode == "any":
            return envelope.decode(registry=events)
        candidates = [cls for cls in spec.classes if envelope.type == cls.EVENT_TYPE]
        if not candidates:
            return self._by_base(spec, envelope, events)
        readable = sorted(
            (cls for cls in candidates if envelope.schema_version <= cls.EVENT_VERSION),
            key=lambda cls: cls.EVENT_VERSION,
        )
        if not readable:
            newest = max(cls.EVENT_VERSION for cls in candidates)
            raise EventSchemaError(
                f"{self.name} reads {envelope.type!r} up to version {newest}; "
                f"the event is version {envelope.schema_version}"
            )
        target = readable[0]
        value = envelope.decode(as_version=target.EVENT_VERSION, registry=events)
        if not isinstance(value, target):
            raise EventSchemaError(
                f"{self.name} reads {envelope.type!r} version {target.EVENT_VERSION} as "
                f"{target.__qualname__}, but the registry has {type(value).__qualname__}"
            )
        return value

    def _by_base(
        self, spec: _Spec, envelope: EventEnvelope, events: EventRegistry
    ) -> DomainEvent | None:
        if not spec.bases:
            return None
        known = [events.get(envelope.type, version) for version in events.versions(envelope.type)]
        # A type none of whose versions derives from a base is simply not this handler's.
        if not any(issubclass(cls, spec.bases) for cls in known):
            return None
        value = envelope.decode(registry=events)
        return value if isinstance(value, spec.bases) else None

    def call(
        self, value: EventEnvelope | DomainEvent, session: Session, envelope: EventEnvelope
    ) -> None:
        """Run the handler."""
        if self.with_envelope:
            self.handler(value, session, envelope)
        else:
            self.handler(value, session)


def _inspect_handler(name: str, handler: Callable[..., None]) -> _Spec:
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise SubscriberError(f"subscriber {name}: cannot read its signature: {exc}") from exc
    parameters = list(signature.parameters.values())
    takes_more = any(parameter.kind == inspect.Parameter.VAR_POSITIONAL for parameter in parameters)
    # Parameters with defaults are the handler's own business; the runtime
    # passes two or three arguments.
    positional = [
        parameter
        for parameter in parameters
        if parameter.kind
        in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        and parameter.default is inspect.Parameter.empty
    ]
    required_keywords = [
        parameter
        for parameter in parameters
        if parameter.kind == inspect.Parameter.KEYWORD_ONLY
        and parameter.default is inspect.Parameter.empty
    ]
    if len(positional) not in (2, 3) or required_keywords or takes_more:
        raise SubscriberError(
            f"subscriber {name} must take (event, session) or (event, session, envelope)"
        )
    annotation = _annotation(name, handler, positional[0])
    with_envelope = len(positional) == 3
    if annotation is inspect.Parameter.empty or annotation is Any or annotation is EventEnvelope:
        return _Spec("envelope", with_envelope=with_envelope)
    if annotation is DomainEvent:
        return _Spec("any", with_envelope=with_envelope)
    members = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    classes: list[type[DomainEvent]] = []
    bases: list[type[DomainEvent]] = []
    for member in members:
        if (
            not (isinstance(member, type) and issubclass(member, DomainEvent))
            or member is DomainEvent
        ):
            raise SubscriberError(
                f"subscriber {name}: its event parameter must be annotated with EventEnvelope, "
                f"DomainEvent or event classes, not {member!r}"
            )
        (classes if is_declared(member) else bases).append(member)
    return _Spec("classes", tuple(classes), with_envelope, tuple(bases))


def _is_union(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union


def _annotation(name: str, handler: Callable[..., None], parameter: inspect.Parameter) -> Any:
    annotation = parameter.annotation
    if not isinstance(annotation, str):
        return annotation
    target = inspect.unwrap(handler)
    namespace = dict(getattr(target, "__globals__", {}))
    try:
        return eval(annotation, namespace)
    except Exception as exc:
        raise SubscriberError(
            f"subscriber {name}: cannot resolve the annotation {annotation!r} of its event "
            f"parameter ({exc}); import the event classes at module level"
        ) from exc


class SubscriberRegistry:
    """Subscriptions by name, grouped by subscriber group. Safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: dict[str, Subscription] = {}

    def add(self, subscription: Subscription) -> Subscription:
        """Add ``subscription``, replacing one of the same name (a reloaded module)."""
        validate_group_name(subscription.group)
        validate_pattern(subscription.pattern)
        with self._lock:
            self._subscriptions[subscription.name] = subscription
        return subscription

    def subscriber(self, pattern: str, *, group: str, name: str | None = None) -> Callable[[F], F]:
        """Decorator registering a handler of ``pattern`` in ``group`` (see :func:`subscriber`)."""
        validate_pattern(pattern)
        validate_group_name(group)

        def decorate(handler: F) -> F:
            subscription = Subscription(
                name=name or f"{handler.__module__}.{handler.__qualname__}",
                group=group,
                pattern=pattern,
                handler=handler,
            )
            # Reject a malformed signature at import when possible; an annotation
            # naming something defined further down the module resolves later.
            try:
                subscription.resolve()
            except SubscriberError as exc:
                if "cannot resolve" not in str(exc):
                    raise
            self.add(subscription)
            return handler

        return decorate

    def all(self) -> list[Subscription]:
        """Every subscription, in the order they were added."""
        with self._lock:
            return list(self._subscriptions.values())

    def groups(self) -> dict[str, list[Subscription]]:
        """Subscriptions by group, groups sorted by name."""
        grouped: dict[str, list[Subscription]] = {}
        for subscription in self.all():
            grouped.setdefault(subscription.group, []).append(subscription)
        return dict(sorted(grouped.items()))

    def group(self, group: str) -> list[Subscription]:
        """The subscriptions of ``group`` (empty if none)."""
        return [s for s in self.all() if s.group == group]

    def remove(self, name: str) -> None:
        """Forget the subscription called ``name``, if any."""
        with self._lock:
            self._subscriptions.pop(name, None)


subscriptions = SubscriberRegistry()
"""The default subscriber registry, which :func:`subscriber` adds to."""


def subscriber(
    pattern: str,
    *,
    group: str,
    name: str | None = None,
    registry: SubscriberRegistry | None = None,
) -> Callable[[F], F]:
    """Declare a handler of the events matching ``pattern`` in subscriber ``group``.

    ``name`` defaults to the handler's ``module.qualname``; ``registry`` to the
    module-level :data:`subscriptions`. See the module documentation for the
    handler's signature.
    """
    return (registry or subscriptions).subscriber(pattern, group=group, name=name)


def load_subscriber_modules(modules: Iterable[str] | None = None) -> list[str]:
    """Import the modules that declare subscribers; return their names.

    ``modules`` defaults to the comma-separated list in
    ``ORCHESTRATOR_SUBSCRIBER_MODULES`` (none if unset).

    Raises:
        SubscriberError: a module cannot be imported.
    """
    if modules is None:
        modules = os.environ.get(MODULES_ENV_VAR, "").split(",")
    names = [name.strip() for name in modules if name and name.strip()]
    for module_name in names:
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            raise SubscriberError(
                f"cannot import subscriber module {module_name!r}: {exc}"
            ) from exc
    return names
