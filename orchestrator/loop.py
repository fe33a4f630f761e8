"""An asyncio event loop that does no I/O, for replaying workflow code.

Workflow code runs as ordinary asyncio tasks, so ``asyncio.gather`` and friends
work, but on this loop: callbacks run in the order they were scheduled, time is
whatever the history says, and anything that would reach the outside world
(sockets, threads, subprocesses) is refused: asyncio's base class raises
NotImplementedError for I/O. Timers are handed to the workflow instance, which
turns them into durable timers in the history. The same history
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
        # asyncio.sleep, wait_for and friends end up here: each becomes a durable
        # timer recorded in the history.
        start_timer = getattr(self.owner, "start_timer", None)
        if start_timer is None:
            raise WorkflowSandboxError("timers need a running workflow")
        handle: asyncio.TimerHandle = start_timer(delay, callback, args, context)
        return handle

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_later(when - self._time, callback, *args, context=context)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        # The instance records the cancellation; there is no timer heap to clean.
        pass

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

    def call_in_loop(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` with this loop as the running one (queries read workflow state)."""
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            return fn()
        finally:
            asyncio.events._set_running_loop(previous)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        # A task that died with an error nobody awaited: keep it for the report
        # instead of letting asyncio print it from a garbage collector callback.
        self.unhandled.append(context)
        _log.debug("unhandled error in workflow code: %s", context.get("message"))

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    # -- driving -------------------------------------------------------------------
    def run_until_idle(self, now: float, on_idle: Callable[[], bool] | None = None) -> None:
        """Run every ready callback, and those they schedule, until none is left.

        ``on_idle`` is called whenever the queue runs dry; returning True means it
        scheduled more work (a wait condition came true), so the loop goes on.
        """
        self._time = now
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        self._running = True
        try:
            while True:
                while self._ready:
                    handle = self._ready.popleft()
                    if not handle.cancelled():
                        handle._run()
                if on_idle is None or not on_idle():
                    break
        finally:
            self._running = False
            asyncio.events._set_running_loop(previous)
