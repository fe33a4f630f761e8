"""What a running activity can learn about itself, and how it reports progress.

The runner (:func:`activities.execute`) installs an activity context in a
context variable for the duration of one attempt; :func:`info` and
:func:`heartbeat` read it. Context variables follow the code into
``async def`` activities, so the same calls work there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from activities.errors import NotInActivityError
from activities.payload import to_payload

__all__ = [
    "ActivityInfo",
    "HeartbeatCallback",
    "activity_scope",
    "heartbeat",
    "in_activity",
    "info",
]

HeartbeatCallback = Callable[[Any], None]
"""Receives the JSON-able details of each :func:`heartbeat` call."""


@dataclass(frozen=True)
class ActivityInfo:
    """Facts about the running activity attempt.

    Attributes:
        activity_id: Identifies the activity within its workflow run.
        activity_type: The activity's registered name.
        workflow_id: The workflow that scheduled it.
        workflow_type: That workflow's registered name.
        run_id: The workflow run.
        attempt: This attempt's number, starting at 1.
        idempotency_key: The same for every attempt of this activity in this
            run; pass it to external systems so that a retry does not repeat a
            side effect.
        task_queue: The queue the attempt was taken from.
        scheduled_at: When the activity was first scheduled.
        started_at: When this attempt started.
        deadline: When this attempt times out, if it does. Advisory: the runner
            does not interrupt the function.
        heartbeat_details: Details of the last heartbeat of a previous attempt,
            to resume from. Defaults to ``None``.
        is_compensation: ``True`` when the activity undoes a completed step of
            a saga. Defaults to ``False``.
    """

    activity_id: str
    activity_type: str
    workflow_id: str
    workflow_type: str
    run_id: str
    attempt: int
    idempotency_key: str
    task_queue: str
    scheduled_at: datetime
    started_at: datetime
    deadline: datetime | None
    heartbeat_details: Any = None
    is_compensation: bool = False


@dataclass(frozen=True)
class _ActivityContext:
    info: ActivityInfo
    heartbeat: HeartbeatCallback | None


_current: ContextVar[_ActivityContext | None] = ContextVar("activity_context", default=None)


@contextmanager
def activity_scope(
    activity_info: ActivityInfo, heartbeat: HeartbeatCallback | None = None
) -> Iterator[None]:
    """Make ``activity_info`` and ``heartbeat`` current for the body of the ``with``.

    Args:
        activity_info: What :func:`info` returns inside.
        heartbeat: Called by :func:`heartbeat` with the details. Defaults to
            ``None``: heartbeats are then accepted and dropped.
    """
    token = _current.set(_ActivityContext(activity_info, heartbeat))
    try:
        yield
    finally:
        _current.reset(token)


def _context() -> _ActivityContext:
    context = _current.get()
    if context is None:
        raise NotInActivityError("not running inside an activity")
    return context


def info() -> ActivityInfo:
    """Return the running activity's :class:`ActivityInfo`.

    Raises:
        NotInActivityError: called outside an activity.
    """
    return _context().info


def heartbeat(details: Any = None) -> None:
    """Report that the activity is alive, with optional progress ``details``.

    The details are converted to JSON-able data first, so that a later attempt
    can receive them as :attr:`ActivityInfo.heartbeat_details`. The runner's
    callback may raise to tell the activity to stop (when it is cancelled, for
    instance); let that error propagate.

    Args:
        details: JSON-able progress. Defaults to ``None``.

    Raises:
        NotInActivityError: called outside an activity.
        PayloadError: ``details`` cannot be stored.
    """
    context = _context()
    # Converted even without a callback, so that unstorable details fail in
    # tests exactly as they would under the engine.
    data = to_payload(details)
    if context.heartbeat is not None:
        context.heartbeat(data)


def in_activity() -> bool:
    """Return whether the caller runs inside an activity."""
    return _current.get() is not None
