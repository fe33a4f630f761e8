"""An asyncio event loop that does no I/O, for replaying workflow code.

Workflow code runs as ordinary asyncio tasks, so ``asyncio.gather`` and friends
work, but on this loop: callbacks run in the order they were scheduled, time is
whatever the history says, and anything that would reach the outside world
(sockets, threads, subprocesses, wall-clock timers) is refused: asyncio's base
class raises NotImplementedError for I/O, and timers raise WorkflowSandboxError. The same history
therefore always drives the code through the same steps.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from outbox.errors import OrchestratorError

_log = logging.getLogger("orchestrator.workflow")


class WorkflowSandboxError(OrchestratorError, RuntimeError):
    """Workflow code tried something only activities may do (I/O, threads, real time)."""


class DeterministicLoop(asyncio.AbstractEventLoop):
    """Runs ready callbacks in FIFO order until none is left; nothing else."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._ready: deque[asyncio.Handle] = deque()
        self._time = 0.0
        self._closed = False
        self._running = False
        self.unhandled: list[dict[str, Any]] = []

    # -- what asyncio's tasks and futures need ------------------------------------
    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        raise WorkflowSandboxError("workflow code cannot be driven from another thread")

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        raise WorkflowSandboxError(
            "asyncio.sleep and wall-clock timers are not available in workflow code; "
            "put waits in activities"
        )

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_later(when - self._time, callback, *args, context=context)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(
        self,
        coro: Any,
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=self, name=name, context=context)

    def time(self) -> float:
        return self._time

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._ready.clear()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        # A task that died with an error nobody awaited: keep it for the report
        # instead of letting asyncio print it from a garbage collector callback.
        self.unhandled.append(context)
        _log.debug("unhandled error in workflow code: %s", context.get("message"))

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    # -- driving -------------------------------------------------------------------
    def run_until_idle(self, now: float) -> None:
        """Run every ready callback, and those they schedule, until none is left."""
        self._time = now
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        self._running = True
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            self._running = False
            asyncio.events._set_running_loop(previous)
