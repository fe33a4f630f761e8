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
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any

from celery import Celery

from activities.context import ActivityInfo
from activities.failure import Failure
from orchestrator.flower import task_kwargsrepr

log = logging.getLogger("orchestrator.task_events")

# Task ids of eager attempts: stable per attempt, in the uuid shape Flower expects.
_NAMESPACE = uuid.UUID("5d1f3c4e-8a51-4c43-9d7e-2b0f3f0c6a11")
_BUFFER_LIMIT = 60


def attempt_task_id(info: ActivityInfo) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{info.run_id}/{info.activity_id}/{info.attempt}"))


class TaskEvents:
    """Sends task events for eager attempts over the app's event exchange.

    One dispatcher per thread, made on first use (after a prefork child forked).
    """

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget)

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
        task_id = attempt_task_id(info)
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
        task_id = attempt_task_id(info)
        if failure is None:
            self._send("task-succeeded", uuid=task_id, result="None", runtime=runtime)
        else:
            self._send(
                "task-failed",
                uuid=task_id,
                exception=f"{failure.type}: {failure.message}",
                traceback=failure.stack or "",
            )
