"""The in-process broker of the embedded mode: a queue and a few worker threads.

Messages take the same path as in production (outbox row, publish after commit,
the same engine methods on the consuming side); only the transport is a Python
queue instead of RabbitMQ. Nothing survives the process, which is why the
embedded mode re-dispatches unfinished work when it starts.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select

from events import SubscriberRuntime, load_subscriber_modules, subscriptions
from orchestrator import messages
from orchestrator.dead_letters import COMPENSATION_DEAD_LETTER_QUEUE
from orchestrator.schema import activity_tasks, workflow_runs
from outbox.message import OutboxMessage

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator

log = logging.getLogger("orchestrator.embedded")


class EmbeddedBroker:
    """Publisher and consumer in one process, with a scheduler thread for timers."""

    def __init__(self, orchestrator: Orchestrator, *, workers: int = 4) -> None:
        self._orchestrator = orchestrator
        self._queue: queue.Queue[OutboxMessage] = queue.Queue()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._busy = 0
        self._idle = threading.Condition()
        self.started = False
        self._runtime: SubscriberRuntime | None = None

    def publish(self, messages_: Sequence[OutboxMessage]) -> None:
        for message in messages_:
            with self._idle:
                self._busy += 1
            self._queue.put(message)

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self._recover()
        for index in range(self._workers):
            thread = threading.Thread(
                target=self._consume, name=f"orchestrator-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        scheduler = threading.Thread(
            target=self._orchestrator.run_scheduler,
            args=(self._stop,),
            name="orchestrator-scheduler",
            daemon=True,
        )
        scheduler.start()
        self._threads.append(scheduler)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        self.started = False
        self._stop = threading.Event()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every published message has been handled; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def _consume(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._handle(message)
            except Exception:
                log.exception("embedded worker: message %s failed", message.destination)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _handle(self, message: OutboxMessage) -> None:
        engine = self._orchestrator.engine
        body = message.body
        if message.destination == messages.WORKFLOW_TASK:
            engine.workflow_task(body["run_id"])
        elif message.destination == messages.CHILD_CLOSED:
            engine.child_closed(**body)
        elif message.destination == messages.RUN_CONTROL:
            engine.run_control(body["run_id"], body["action"], body["reason"])
        elif message.kind == "event":
            self._deliver_event(message)
        elif message.queue == COMPENSATION_DEAD_LETTER_QUEUE:
            log.warning("compensation dead-lettered: %s", message.body.get("activity_type"))
        elif message.destination == messages.START_WORKFLOW:
            self._orchestrator.start_from_message(
                body["workflow_type"], body["workflow_id"], body.get("input")
            )
        else:
            engine.activity_task(body["run_id"], body["activity_id"], body["attempt"])

    def _deliver_event(self, message: OutboxMessage) -> None:
        """Hand a domain event to this process's subscribers, each group once."""
        runtime = self._subscribers()
        if runtime is None:
            return
        body = json.dumps(message.body)
        for group in runtime.groups:
            outcome = runtime.process(group, body)
            if outcome.action != "ack":
                log.warning("event %s for %s: %s", message.destination, group, outcome.reason)

    def _subscribers(self) -> SubscriberRuntime | None:
        if self._runtime is None:
            load_subscriber_modules()
            if not subscriptions.groups():
                return None
            self._runtime = SubscriberRuntime(
                self._orchestrator.db, "memory://", subscriptions=subscriptions
            )
        return self._runtime

    def _recover(self) -> None:
        """Re-dispatch what a previous process left in flight (its queue died with it)."""
        engine = self._orchestrator.engine
        settings = self._orchestrator.settings
        with engine.sessions() as session:
            runs = session.execute(
                select(workflow_runs.c.run_id, workflow_runs.c.workflow_id).where(
                    workflow_runs.c.closed_at.is_(None),
                    workflow_runs.c.processed_seq < workflow_runs.c.history_length,
                )
            ).all()
            pending = session.execute(
                select(
                    activity_tasks.c.run_id,
                    activity_tasks.c.activity_id,
                    activity_tasks.c.activity_type,
                    activity_tasks.c.attempt,
                    activity_tasks.c.task_queue,
                ).where(activity_tasks.c.status == "SCHEDULED")
            ).all()
        recovered = [messages.workflow_task(r, w, settings.workflow_queue) for r, w in runs]
        recovered += [
            messages.activity_task(
                run_id=run_id,
                workflow_id="",
                activity_id=activity_id,
                activity_type=activity_type,
                attempt=attempt,
                queue=task_queue,
            )
            for run_id, activity_id, activity_type, attempt, task_queue in pending
        ]
        if recovered:
            log.info("embedded broker: re-dispatching %d unfinished messages", len(recovered))
            self.publish(recovered)
