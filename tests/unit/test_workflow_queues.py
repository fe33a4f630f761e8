"""A run's workflow tasks go to the queue of the app that started it, whoever acts on it.

Two apps share one database, each with its own workflow queue. The acting app
(another app's client, its watchdog, an operator's command through it) knows
nothing of the run's workflow type, so it cannot decide the step itself: it
asks for a workflow task, which must reach the workers of the run's own app.
"""

from __future__ import annotations

from typing import Any

from sample_patterns import Listener
from sqlalchemy import select, update

from orchestrator import Orchestrator
from orchestrator.messages import WORKFLOW_TASK
from orchestrator.schema import workflow_runs
from orchestrator.watchdog import redispatch_stalled
from outbox.schema import outbox_messages

OWN_QUEUE = "b-workflows"
OTHER_QUEUE = "a-workflows"


def _task_queues(orchestrator: Orchestrator, run_id: str) -> list[str | None]:
    """The queues of the workflow task messages written for ``run_id``, oldest first."""
    with orchestrator.db.connect() as conn:
        rows = conn.execute(
            select(outbox_messages.c.queue, outbox_messages.c.body)
            .where(
                outbox_messages.c.kind == "task",
                outbox_messages.c.destination == WORKFLOW_TASK,
            )
            .order_by(outbox_messages.c.seq)
        ).all()
    return [queue for queue, body in rows if body["run_id"] == run_id]


def _two_apps(make_orchestrator: Any) -> tuple[Orchestrator, Orchestrator, str]:
    """The run's own app (running a Listener) and another app; the run's id."""
    own = make_orchestrator([Listener], [], workflow_queue=OWN_QUEUE)
    # Its messages stay in the outbox, where the test reads them: nothing of
    # this app would run the run's workflow code anyway.
    other = make_orchestrator([], [], workflow_queue=OTHER_QUEUE, publish_after_commit=False)
    handle = own.client().start_workflow(Listener, workflow_id="listener-1")
    with own.db.connect() as conn:
        stored = conn.execute(
            select(workflow_runs.c.workflow_queue).where(workflow_runs.c.run_id == handle.run_id)
        ).scalar_one()
    assert stored == OWN_QUEUE
    return own, other, handle.run_id


def test_a_signal_from_another_app_asks_the_runs_own_queue(make_orchestrator: Any) -> None:
    _own, other, run_id = _two_apps(make_orchestrator)
    before = len(_task_queues(other, run_id))
    other.client().get_handle("listener-1").signal("ping")
    assert _task_queues(other, run_id)[before:] == [OWN_QUEUE]


def test_the_watchdog_of_another_app_sends_stalled_runs_to_their_own_queue(
    make_orchestrator: Any,
) -> None:
    _own, other, run_id = _two_apps(make_orchestrator)
    other.client().get_handle("listener-1").signal("ping")  # left unpublished: stalled
    before = len(_task_queues(other, run_id))
    assert redispatch_stalled(other.engine, stale_after=0) == 1
    assert _task_queues(other, run_id)[before:] == [OWN_QUEUE]


def test_an_operator_resuming_through_another_app_asks_the_runs_own_queue(
    make_orchestrator: Any,
) -> None:
    _own, other, run_id = _two_apps(make_orchestrator)
    assert other.engine.pause(run_id, "maintenance")
    before = len(_task_queues(other, run_id))
    assert other.engine.resume(run_id, "done")
    assert _task_queues(other, run_id)[before:] == [OWN_QUEUE]


def test_a_run_without_a_stored_queue_goes_to_the_acting_apps_queue(
    make_orchestrator: Any,
) -> None:
    # A row written before the column existed.
    _own, other, run_id = _two_apps(make_orchestrator)
    with other.db.begin() as conn:
        conn.execute(
            update(workflow_runs)
            .where(workflow_runs.c.run_id == run_id)
            .values(workflow_queue=None)
        )
    before = len(_task_queues(other, run_id))
    other.client().get_handle("listener-1").signal("ping")
    assert _task_queues(other, run_id)[before:] == [OTHER_QUEUE]
