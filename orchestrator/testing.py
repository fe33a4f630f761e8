"""A test environment for users' workflows: in-process, on SQLite, with time skipping.

::

    with WorkflowEnvironment(workflows=[Reminder], activities=[send_email]) as env:
        handle = env.client.start_workflow(Reminder, "ann@example.com")
        assert handle.result(timeout=5) == "sent"   # a 30-day sleep takes milliseconds

While a test waits in ``handle.result()`` and nothing else can run (no message in
flight, no activity running), the environment's clock jumps to the next timer or
deadline. Activities can be replaced by test doubles: register a function under
the same activity name, ``@activity.defn(name="send_email")``.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from activities.definition import ActivityDefinition
from orchestrator.app import Orchestrator
from orchestrator.client import Client
from orchestrator.schema import metadata
from orchestrator.settings import Settings

__all__ = ["WorkflowEnvironment"]


class WorkflowEnvironment:
    """An embedded orchestrator whose clock skips ahead when only timers are left.

    ``database_url`` defaults to a SQLite file in a temporary directory;
    ``skip_time`` (default True) turns automatic skipping on.
    """

    def __init__(
        self,
        *,
        workflows: Iterable[type[Any]] = (),
        activities: Iterable[Callable[..., Any] | ActivityDefinition] = (),
        database_url: str | None = None,
        skip_time: bool = True,
        **settings: Any,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if database_url is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="workflow-env-")
            database_url = f"sqlite:///{Path(self._tmp.name) / 'env.db'}"
        self._offset = timedelta(0)
        self._lock = threading.Lock()
        self.orchestrator = Orchestrator(
            workflows=workflows,
            activities=activities,
            settings=Settings(
                database_url=database_url,
                broker_url="embedded://",
                scheduler_poll_seconds=settings.pop("scheduler_poll_seconds", 0.02),
                **settings,
            ),
            clock=self.now,
        )
        self._skip_time = skip_time
        self._stop = threading.Event()
        self._skipper: threading.Thread | None = None
        self._client: Client | None = None

    # -- the clock -------------------------------------------------------------------
    def now(self) -> datetime:
        """The environment's current time (real time plus everything skipped)."""
        with self._lock:
            return datetime.now(UTC) + self._offset

    def sleep(self, duration: timedelta | float) -> None:
        """Move the clock forward by ``duration`` and fire what falls due."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
        with self._lock:
            self._offset += timedelta(seconds=seconds)
        self.orchestrator.engine.fire_due()
        self.orchestrator.wait_idle(10)

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("use the environment as a context manager first")
        return self._client

    def __enter__(self) -> WorkflowEnvironment:
        metadata.create_all(self.orchestrator.db)
        self._client = self.orchestrator.client()
        if self._skip_time:
            self._skipper = threading.Thread(
                target=self._skip_loop, name="workflow-env-time-skipper", daemon=True
            )
            self._skipper.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._skipper is not None:
            self._skipper.join(5)
        self.orchestrator.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _skip_loop(self) -> None:
        orchestrator = self.orchestrator
        while not self._stop.wait(0.005):
            if orchestrator.waiting_for_results <= 0:
                continue
            # Only when nothing can run: no message in flight, no activity running.
            if not orchestrator.wait_idle(0):
                continue
            due = orchestrator.engine.timers.next_due()
            if due is None:
                continue
            now = self.now()
            if due > now:
                with self._lock:
                    self._offset += due - now
            orchestrator.engine.fire_due()
