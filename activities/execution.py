"""Running one attempt of an activity, with no database and no broker.

The engine wraps :func:`execute` in its own transactions: it loads the input,
calls :func:`execute`, and records the :class:`Outcome`. Keeping this part free
of storage makes the attempt itself easy to test and to reason about.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from activities.context import ActivityInfo, HeartbeatCallback, activity_scope
from activities.definition import ActivityDefinition
from activities.errors import PayloadError
from activities.failure import Failure
from activities.payload import DEFAULT_MAX_PAYLOAD_BYTES, from_payload, to_payload

__all__ = ["Outcome", "execute"]


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: either a JSON-able result or a failure.

    Attributes:
        result: The function's return value as JSON-able data. Defaults to
            ``None``.
        failure: Why the attempt failed. Defaults to ``None`` (it succeeded).
    """

    result: Any = None
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        """Whether the attempt succeeded."""
        return self.failure is None


def execute(
    defn: ActivityDefinition,
    info: ActivityInfo,
    payload: Any,
    *,
    heartbeat: HeartbeatCallback | None = None,
    limit: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Outcome:
    """Run one attempt of ``defn`` with ``info`` current, and capture its outcome.

    The stored ``payload`` is converted to the input type, the function called
    (``async def`` ones in a fresh event loop), and its result converted back
    to JSON-able data. Errors raised by the function become a failure;
    ``BaseException``s that are not ``Exception``s (interrupts, exits) propagate.
    An input or result that cannot be converted gives a non-retryable failure,
    since running the same code on the same data again cannot fix it.

    Args:
        defn: The activity.
        info: What :func:`activities.info` returns during the attempt.
        payload: The stored input; ignored when the activity takes none.
        heartbeat: Receives the details of each :func:`activities.heartbeat`.
            Defaults to ``None`` (heartbeats are dropped).
        limit: Largest allowed JSON size of the result, in bytes. Defaults to
            :data:`DEFAULT_MAX_PAYLOAD_BYTES`.
    """
    with activity_scope(info, heartbeat):
        args: tuple[Any, ...] = ()
        if defn.takes_input:
            try:
                args = (from_payload(payload, defn.input_type),)
            except PayloadError as exc:
                return Outcome(failure=_non_retryable(exc))
        try:
            result = defn.fn(*args)
            if inspect.isawaitable(result):
                # Also covers sync wrappers that return a coroutine.
                result = _run_awaitable(result)
        except Exception as exc:
            return Outcome(failure=Failure.from_exception(exc))
        try:
            return Outcome(result=to_payload(result, defn.output_type, limit=limit))
        except PayloadError as exc:
            return Outcome(failure=_non_retryable(exc))


def _non_retryable(exc: BaseException) -> Failure:
    return Failure.from_exception(exc).model_copy(update={"non_retryable": True})


def _run_awaitable(awaitable: Awaitable[Any]) -> Any:
    coroutine = awaitable if inspect.iscoroutine(awaitable) else _await(awaitable)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # Called from code that already runs an event loop, where a second loop
    # cannot start: run it on a thread of its own, keeping the context so that
    # the activity still sees its info.
    return _run_in_thread(coroutine)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _run_in_thread(coroutine: Coroutine[Any, Any, Any]) -> Any:
    context = contextvars.copy_context()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = context.run(asyncio.run, coroutine)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="activity-attempt")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
