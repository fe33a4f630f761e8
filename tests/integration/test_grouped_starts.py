"""Concurrent starts on PostgreSQL and RabbitMQ: queued starts commit in one transaction.

The first start is held at its commit by a row lock the test keeps (its workflow
id is taken by the test's uncommitted run), so the starts made meanwhile queue
behind it and commit together once the test lets go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import harness
import pytest
from sqlalchemy import Engine, text

from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import IdConflictPolicy, IdReusePolicy, Orchestrator, WorkflowAlreadyStartedError

pytestmark = pytest.mark.timeout(60)


def xmins(db: Engine, workflow_ids: list[str]) -> dict[str, str]:
    """Each run's inserting transaction, by workflow id."""
    with db.connect() as conn:
        rows = conn.execute(
            text("SELECT workflow_id, xmin::text FROM workflow_runs WHERE workflow_id = ANY(:ids)"),
            {"ids": workflow_ids},
        ).all()
    return {row[0]: row[1] for row in rows}


class Starts:
    """Client starts, each in a thread of its own; what each got, by workflow id."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.client = orchestrator.client()
        self.outcomes: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []

    def start(self, workflow_id: str) -> None:
        def one() -> None:
            try:
                order = harness.make_order(workflow_id)
                self.outcomes[workflow_id] = self.client.start_workflow(
                    OrderSaga, order, workflow_id=workflow_id
                )
            except BaseException as exc:
                self.outcomes[workflow_id] = exc

        thread = threading.Thread(target=one)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive()


@pytest.fixture
def held(detoured: Orchestrator) -> Iterator[tuple[str, Callable[[], None]]]:
    """A workflow id held by the test's uncommitted run, and how to let it go."""
    workflow_id = harness.unique("held")
    engine = detoured.engine
    session = engine.sessions()
    engine.start(
        session,
        "OrderSaga",
        harness.make_order(workflow_id).model_dump(mode="json"),
        workflow_id=workflow_id,
        id_reuse_policy=IdReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=IdConflictPolicy.FAIL,
    )
    session.flush()
    yield workflow_id, session.rollback
    session.close()


def queue_behind_a_held_leader(
    detoured: Orchestrator, held: tuple[str, Callable[[], None]], workflow_ids: list[str]
) -> Starts:
    held_id, let_go = held
    starts = Starts(detoured)
    group = detoured.start_group
    starts.start(held_id)  # leads, and waits at its commit for the test's transaction
    harness.wait_until(lambda: group._leading, 20, "the first start to lead")
    for workflow_id in workflow_ids:
        starts.start(workflow_id)
    harness.wait_until(lambda: len(group._queue) == len(workflow_ids), 20, "the starts to queue")
    let_go()
    starts.join()
    return starts


def test_starts_queued_behind_a_commit_commit_in_one_transaction(
    db: Engine,
    detoured: Orchestrator,
    private_queue: harness.PrivateQueue,
    held: tuple[str, Callable[[], None]],
) -> None:
    queued = [harness.unique(f"grouped-{i}") for i in range(6)]
    starts = queue_behind_a_held_leader(detoured, held, queued)

    handles = starts.outcomes
    assert all(not isinstance(handle, BaseException) for handle in handles.values()), handles
    inserted_by = xmins(db, [held[0], *queued])
    assert len({inserted_by[workflow_id] for workflow_id in queued}) == 1
    assert inserted_by[held[0]] != inserted_by[queued[0]]
    # Every run's first message went out, each naming its own run.
    sent = private_queue.drain()
    assert sorted(task.kwargs["run_id"] for task in sent) == sorted(
        handle.run_id for handle in handles.values()
    )
    harness.wait_until(
        lambda: all(harness.unpublished(db, wid) == [] for wid in [held[0], *queued]),
        5,
        "the publish marks",
    )


def test_a_taken_workflow_id_fails_its_own_start_only(
    db: Engine,
    detoured: Orchestrator,
    private_queue: harness.PrivateQueue,
    held: tuple[str, Callable[[], None]],
) -> None:
    taken = harness.unique("taken")
    first = detoured.client().start_workflow(
        OrderSaga, harness.make_order(taken), workflow_id=taken
    )
    queued = [harness.unique(f"beside-{i}") for i in range(3)]
    starts = queue_behind_a_held_leader(detoured, held, [queued[0], taken, *queued[1:]])

    refused = starts.outcomes[taken]
    assert isinstance(refused, WorkflowAlreadyStartedError)
    assert refused.run_id == first.run_id
    assert harness.run_ids_of(db, taken) == [first.run_id]
    for workflow_id in queued:
        assert harness.run_ids_of(db, workflow_id) == [starts.outcomes[workflow_id].run_id]
    # The group was refused whole and each start was made again alone.
    assert len(set(xmins(db, queued).values())) == len(queued)
    sent = private_queue.drain()
    assert sorted(task.kwargs["run_id"] for task in sent) == sorted(
        [first.run_id, starts.outcomes[held[0]].run_id]
        + [starts.outcomes[workflow_id].run_id for workflow_id in queued]
    )


def test_a_start_queued_behind_a_lock_its_own_thread_holds_goes_alone(
    db: Engine,
    detoured: Orchestrator,
    private_queue: harness.PrivateQueue,
    held: tuple[str, Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator import start_group

    monkeypatch.setattr(start_group, "PATIENCE", 0.5)
    held_id, let_go = held
    starts = Starts(detoured)
    starts.start(held_id)  # leads, and waits for this thread's transaction
    harness.wait_until(lambda: detoured.start_group._leading, 20, "the first start to lead")
    # This thread, its transaction still open, starts another run: it must not
    # wait for the leader that waits for it.
    mine = harness.unique("mine")
    began = time.monotonic()
    handle = detoured.client().start_workflow(OrderSaga, harness.make_order(mine), workflow_id=mine)
    assert time.monotonic() - began < 10
    assert harness.run_ids_of(db, mine) == [handle.run_id]
    let_go()
    starts.join()
    assert not isinstance(starts.outcomes[held_id], BaseException), starts.outcomes
    assert len(private_queue.drain()) == 2


def test_a_group_waiting_on_a_row_lock_gives_up_and_goes_alone(
    db: Engine, detoured: Orchestrator, held: tuple[str, Callable[[], None]]
) -> None:
    from orchestrator.client import _StartRequest, commit_starts
    from orchestrator.start_group import ALONE, Member

    held_id, let_go = held
    other = harness.unique("beside-held")
    group = [
        Member(
            _StartRequest(
                "OrderSaga",
                harness.make_order(workflow_id).model_dump(mode="json"),
                workflow_id,
                IdReusePolicy.ALLOW_DUPLICATE,
                IdConflictPolicy.FAIL,
            )
        )
        for workflow_id in (held_id, other)
    ]
    began = time.monotonic()
    commit_starts(detoured, group)  # the held id's insert waits for this test's transaction
    assert time.monotonic() - began < 10
    assert [member.result() for member in group] == [ALONE, ALONE]
    assert harness.run_ids_of(db, other) == []
    let_go()
