"""A worker's spare messages (``worker_spare_messages``), seen from the broker.

One worker with one pool process serves the pattern application. The first
run's second activity holds that process for a minute (it heartbeats), while
three more runs wait for their first activity. The broker hands the worker
one message for its busy process plus its spares; the rest stay ready in the
queue, for any other worker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import harness
import pattern_app
import pytest
from pattern_app import ACTIVITY_QUEUE, APP_REF, WORKFLOW_QUEUE, Booking
from sqlalchemy import Engine

from orchestrator import Orchestrator, Settings
from orchestrator.schema import activity_tasks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

QUEUES = (WORKFLOW_QUEUE, ACTIVITY_QUEUE)
WAITING_RUNS = 3
# Long enough for a delivery the broker was going to make to have arrived.
SETTLE_SECONDS = 1.0


@pytest.fixture
def app(database_url: str, db: Engine) -> Iterator[Orchestrator]:
    """A client of the pattern application; its starts schedule the first activity."""
    pattern_app.effects_metadata.create_all(db)
    built = pattern_app.build(
        Settings(
            database_url=database_url,
            broker_url=harness.BROKER_URL,
            workflow_queue=WORKFLOW_QUEUE,
        )
    )
    yield built
    built.close()


def _ready(queue: str) -> int:
    found = harness.queue_state([queue])[queue]
    assert found is not None, f"queue {queue} does not exist"
    return found[0]


@pytest.mark.parametrize(("spare", "held"), [(None, 1), (0, 0), (2, 2)])
def test_a_busy_worker_holds_its_spare_messages_and_no_more(
    procs: harness.ProcessGroup, app: Orchestrator, db: Engine, spare: int | None, held: int
) -> None:
    harness.wait_until(lambda: harness.consumers_of(QUEUES) == 0, 15, "no pattern consumers")
    harness.purge_queues(QUEUES)
    env = {"ORCHESTRATOR_WORKFLOW_QUEUE": WORKFLOW_QUEUE}
    if spare is not None:
        env["ORCHESTRATOR_WORKER_SPARE_MESSAGES"] = str(spare)
    name = f"spare-{spare}"
    worker = procs.start(
        name,
        "--app",
        APP_REF,
        "worker",
        "--queues",
        ",".join(QUEUES),
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "--hostname",
        f"{name}-{uuid.uuid4().hex[:6]}@%h",
        env=env,
    )
    worker.wait_for_log(r" ready\.", timeout=60)
    client = app.client()
    handles = [
        client.start_workflow(Booking, "lamp", workflow_id=harness.unique("spare"))
        for _ in range(1 + WAITING_RUNS)
    ]
    try:
        harness.wait_until(
            lambda: (
                harness.count(
                    db,
                    activity_tasks,
                    activity_tasks.c.run_id.in_([handle.run_id for handle in handles]),
                    activity_tasks.c.activity_type == "hold_until_shipped",
                    activity_tasks.c.status == "STARTED",
                )
                == 1
            ),
            30,
            "one run's long activity to hold the pool process",
        )
        expected = WAITING_RUNS - held
        harness.wait_until(
            lambda: _ready(ACTIVITY_QUEUE) == expected, 10, f"{expected} messages left ready"
        )
        time.sleep(SETTLE_SECONDS)
        assert _ready(ACTIVITY_QUEUE) == expected
        assert worker.alive
    finally:
        for handle in handles:
            handle.terminate("the test is over")
        worker.terminate()
        harness.purge_queues(QUEUES)
