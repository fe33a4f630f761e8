"""Celery task events: none until a monitor asks, then one set per activity attempt.

A real prefork worker on RabbitMQ, watched by an event receiver on the broker,
as Flower watches it. The worker starts with the default settings (task events
off); the test then broadcasts ``enable_events``, which is what Flower does every
few seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import harness
import pytest
from sqlalchemy.engine import Engine

from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import Orchestrator
from orchestrator.task_events import attempt_task_id

pytestmark = pytest.mark.integration

WORKER = "events-worker"


class Watcher:
    """Every event the broker's event exchange carries, from a receiver thread."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._connection = harness.broker_connection()
        self._receiver = orchestrator.celery.events.Receiver(
            self._connection, handlers={"*": self._keep}
        )
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def _keep(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def _capture(self) -> None:
        self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, hostname: str, prefix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                e
                for e in self.events
                if e.get("hostname") == hostname and e["type"].startswith(prefix)
            ]

    def worker_hostname(self) -> str | None:
        with self._lock:
            for event in self.events:
                if event["type"] == "worker-heartbeat" and event["hostname"].startswith(WORKER):
                    return str(event["hostname"])
        return None

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=10)
        self._connection.release()


@pytest.fixture
def watcher(orchestrator: Orchestrator) -> Iterator[Watcher]:
    with Watcher(orchestrator) as watching:
        yield watching


def fulfil(orchestrator: Orchestrator, db: Engine) -> tuple[str, dict[str, Any]]:
    """Run one order to completion; its run id and its activity rows by type."""
    order = harness.make_order(harness.unique("events"))
    handle = orchestrator.client().start_workflow(
        OrderSaga, order, workflow_id=f"order-{order.order_id}"
    )
    assert handle.result(timeout=60).order_id == order.order_id
    return handle.run_id, harness.activity_rows(db, handle.run_id)


def test_task_events_start_when_a_monitor_asks_and_cover_eager_attempts(
    procs: harness.ProcessGroup, orchestrator: Orchestrator, db: Engine, watcher: Watcher
) -> None:
    worker = procs.worker(WORKER)
    hostname: str = harness.wait_until(
        watcher.worker_hostname, 30, "the worker's heartbeat on the event exchange"
    )

    # Unwatched: the worker runs a whole order and says nothing about its tasks.
    fulfil(orchestrator, db)
    # Task events leave within milliseconds of the step they report (the pool's
    # at the end of its chain, the consumer's at a turn of its loop): a heartbeat
    # the worker sent a second after the order closed comes after any of them.
    closed = time.time()
    harness.wait_until(
        lambda: any(
            e["timestamp"] > closed + 1.0 for e in watcher.of(hostname, "worker-heartbeat")
        ),
        15,
        "a heartbeat sent a second after the order closed",
    )
    assert watcher.of(hostname, "task-") == []

    replies = orchestrator.celery.control.enable_events(destination=[hostname], reply=True)
    assert replies and all("ok" in reply[hostname] for reply in replies), replies
    worker.wait_for_log("task events on", timeout=10)

    run_id, activities = fulfil(orchestrator, db)
    eager_ids = {
        attempt_task_id(run_id, row["activity_id"], row["attempt"]) for row in activities.values()
    }

    def reported() -> dict[str, str] | None:
        # Every attempt of the run, message-borne or eager, by task id: its name.
        names = {
            e["uuid"]: e["name"]
            for e in watcher.of(hostname, "task-received")
            if run_id in str(e.get("kwargs"))
        }
        done = {e["uuid"] for e in watcher.of(hostname, "task-succeeded")}
        return names if set(names.values()) == set(activities) and done >= set(names) else None

    attempts = harness.wait_until(reported, 15, "received and succeeded events of every activity")
    assert len(activities) >= 3, activities
    # The run's first activity travels as a message; the next ones run eagerly.
    assert set(attempts) & eager_ids, "no eager attempt reported"
    assert set(attempts) - eager_ids, "no message-borne attempt reported"


def test_a_failed_message_borne_attempt_is_reported_failed_without_a_traceback(
    procs: harness.ProcessGroup, orchestrator: Orchestrator, db: Engine, watcher: Watcher
) -> None:
    worker = procs.worker(f"{WORKER}-failing", env={"ORCHESTRATOR_TASK_EVENTS": "true"})
    procs.scheduler()
    order = harness.make_order(
        harness.unique("events-fail"), fail_first_attempts={"reserve_inventory": 1}
    )
    handle = orchestrator.client().start_workflow(
        OrderSaga, order, workflow_id=f"order-{order.order_id}"
    )
    # The first attempt fails and its retry (sent again through the broker) succeeds.
    assert handle.result(timeout=60).order_id == order.order_id
    hostname = worker.wait_for_log(r"(\S+@\S+) ready\.").group(1)

    def outcomes() -> tuple[str, str] | None:
        received = [
            e["uuid"]
            for e in watcher.of(hostname, "task-received")
            if e["name"] == "reserve_inventory" and handle.run_id in str(e.get("kwargs"))
        ]
        failed = {e["uuid"] for e in watcher.of(hostname, "task-failed")}
        succeeded = {e["uuid"] for e in watcher.of(hostname, "task-succeeded")}
        if len(received) < 2 or received[0] not in failed or received[1] not in succeeded:
            return None
        return received[0], received[1]

    first, _ = harness.wait_until(outcomes, 15, "a failed and a succeeded reserve_inventory")
    [failed] = [e for e in watcher.of(hostname, "task-failed") if e["uuid"] == first]
    assert "simulated transient failure of reserve_inventory" in failed["exception"]
    # Celery logs an expected error in one line; the attempt's failure has its own log.
    assert "raised expected: AttemptFailedError" in worker.log_text()
    assert "Traceback" not in worker.log_text()
