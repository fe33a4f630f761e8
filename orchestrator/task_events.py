"""Celery task events for the activities a worker runs eagerly, so Flower lists them.

An activity that a worker runs right after deciding it (eager dispatch) never
travels as a Celery message, so Celery sends no task events for it. This sends
the events a worker would have sent for it (received, started, succeeded or
failed), from the process that runs it, with the same task name and ``kwargs``
rendering as a message-borne attempt: operators see every attempt in Flower
either way.

The events of one chain of eager attempts go out together, as one message, when
the chain ends (or every ``_BUFFER_LIMIT`` events): a publish per event would
cost more than the attempt itself. While a chain runs, Flower shows the task
that began it as started. Events are monitoring only: a failure to send them is
logged and never stops a step.

Task events cost the worker and the broker more than a no-op step's database
work, so, as in Celery, they are sent only while someone watches: from the start
with ``ORCHESTRATOR_TASK_EVENTS``, or once a monitor broadcasts
``enable_events`` (Flower does every five seconds) until the worker restarts or
reconnects to the broker (its consumer then starts a new event dispatcher).
The consumer process receives that broadcast; ``EventsFollower`` copies what its
event dispatcher then does into a flag the pool's children share.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps

from activities.context import ActivityInfo
from activities.failure import Failure
from orchestrator.flower import task_kwargsrepr

log = logging.getLogger("orchestrator.task_events")

# Task ids of eager attempts: stable per attempt, in the uuid shape Flower expects.
_NAMESPACE = uuid.UUID("5d1f3c4e-8a51-4c43-9d7e-2b0f3f0c6a11")
_BUFFER_LIMIT = 60
# How often the consumer copies its dispatcher's state into the shared flag.
_FOLLOW_SECONDS = 1.0


def attempt_task_id(run_id: str, activity_id: str, attempt: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{run_id}/{activity_id}/{attempt}"))


class TaskEvents:
    """Sends task events for eager attempts over the app's event exchange.

    One dispatcher per thread, made on first use (after a prefork child forked).
    Made before the pool forks, so that the children share its on/off flag.
    """

    def __init__(self, app: Celery, hostname: str, *, on: bool) -> None:
        self.app = app
        self.hostname = hostname
        self._local = threading.local()
        self._on = multiprocessing.RawValue(ctypes.c_bool, on)
        os.register_at_fork(after_in_child=self._forget)

    @property
    def on(self) -> bool:
        """Whether this worker sends task events now."""
        return bool(self._on.value)

    def follow(self, dispatcher: Any) -> None:
        """Turn events on or off as the consumer's event ``dispatcher`` sends its own."""
        groups = getattr(dispatcher, "groups", None)
        on = bool(
            dispatcher is not None and dispatcher.enabled and (not groups or "task" in groups)
        )
        if on != self._on.value:
            self._on.value = on
            log.info("task events %s", "on" if on else "off")

    def _forget(self) -> None:
        self._local = threading.local()

    def _dispatcher(self) -> Any:
        dispatcher = getattr(self._local, "dispatcher", None)
        if dispatcher is None:
            dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(),
                hostname=self.hostname,
                enabled=True,
                buffer_group={"task"},
                buffer_limit=_BUFFER_LIMIT,
            )
            self._local.dispatcher = dispatcher
        return dispatcher

    def _send(self, kind: str, **fields: Any) -> None:
        try:
            self._dispatcher().send(kind, **fields)
        except Exception as exc:
            self._drop(exc)

    def flush(self) -> None:
        """Send what is buffered: the chain of eager attempts has ended."""
        dispatcher = getattr(self._local, "dispatcher", None)
        if dispatcher is None:
            return
        try:
            dispatcher.flush()
        except Exception as exc:
            self._drop(exc)

    def _drop(self, exc: Exception) -> None:
        log.debug("could not send task events: %s", exc)
        dispatcher = getattr(self._local, "dispatcher", None)
        self._local.dispatcher = None
        if dispatcher is not None:
            try:
                dispatcher.close()
            except Exception:
                log.debug("closing the event dispatcher failed", exc_info=True)

    def started(self, info: ActivityInfo) -> None:
        # Decided once per attempt, so that an attempt is never half reported.
        self._local.sending = sending = self.on
        if not sending:
            return
        task_id = attempt_task_id(info.run_id, info.activity_id, info.attempt)
        body = {"run_id": info.run_id, "activity_id": info.activity_id, "attempt": info.attempt}
        self._send(
            "task-received",
            uuid=task_id,
            name=info.activity_type,
            args="()",
            kwargs=task_kwargsrepr(body, {"workflow_id": info.workflow_id}),
            root_id=task_id,
            parent_id=None,
            retries=info.attempt - 1,
            eta=None,
            expires=None,
        )
        self._send("task-started", uuid=task_id)

    def finished(self, info: ActivityInfo, failure: Failure | None, runtime: float) -> None:
        if not getattr(self._local, "sending", False):
            return
        task_id = attempt_task_id(info.run_id, info.activity_id, info.attempt)
        if failure is None:
            self._send("task-succeeded", uuid=task_id, result="None", runtime=runtime)
        else:
            self._send(
                "task-failed",
                uuid=task_id,
                exception=f"{failure.type}: {failure.message}",
                traceback=failure.stack or "",
            )


def events_follower(observer: Callable[[], TaskEvents | None]) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that keeps ``observer()``'s flag in step with the consumer."""

    class EventsFollower(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = ("celery.worker.consumer.events:Events",)

        def __init__(self, consumer: Any, **kwargs: Any) -> None:
            super().__init__(consumer, **kwargs)
            self._timer: Any = None

        def start(self, consumer: Any) -> None:
            events = observer()
            if events is None:
                return

            def follow() -> None:
                events.follow(consumer.event_dispatcher)

            follow()
            self.stop(consumer)
            self._timer = consumer.timer.call_repeatedly(_FOLLOW_SECONDS, follow)

        def stop(self, consumer: Any) -> None:
            # The consumer starts its steps again after a lost connection.
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    return EventsFollower
