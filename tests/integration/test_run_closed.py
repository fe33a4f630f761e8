"""handle.result() on PostgreSQL: told when the run closes, polling only as a safety net.

An in-process broker over the real database: the worker's close rings the
outbox's doorbell after its commit, and the waiting client's listening
connection wakes it. The polls are slowed down here, so that only a
notification can end a wait quickly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import harness
import pytest

import activities as activity
from orchestrator import Orchestrator, Settings, workflow
from orchestrator import client as client_module
from orchestrator.run_closed import RUN_CLOSED_CHANNEL, ClosedRuns

pytestmark = pytest.mark.integration

RELEASE = threading.Event()


@activity.defn(task_queue="it-run-closed")
def held(word: str) -> str:
    # Keeps the run open until the test has started waiting for it.
    assert RELEASE.wait(20)
    return word + "!"


@workflow.defn(name="ItRunClosed")
class Held:
    @workflow.run
    async def run(self, word: str) -> str:
        return await workflow.execute_activity(held, word)


@pytest.fixture
def orchestrator(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Orchestrator]:
    # A poll would take five seconds: a quick result can only come from a notification.
    monkeypatch.setattr(client_module, "_FIRST_POLL", 5.0)
    monkeypatch.setattr(client_module, "_LAST_POLL", 5.0)
    RELEASE.clear()
    orchestrator = Orchestrator(
        workflows=[Held],
        activities=[held],
        settings=Settings(database_url=database_url, broker_url="embedded://"),
    )
    yield orchestrator
    RELEASE.set()
    orchestrator.close()


def result_after_release(orchestrator: Orchestrator) -> tuple[Any, float]:
    """Start a run, release its activity once the wait began; the result and how long it took."""
    handle = orchestrator.client().start_workflow(Held, "go", workflow_id=harness.unique("closed"))

    def release_once_waiting() -> None:
        # result() counts itself as waiting once it has subscribed (or given up
        # listening): only then may the run close.
        harness.wait_until(
            lambda: orchestrator.waiting_for_results > 0, 20, "result() to wait", interval=0.01
        )
        RELEASE.set()

    threading.Thread(target=release_once_waiting, daemon=True).start()
    began = time.monotonic()
    result = handle.result(timeout=30)
    return result, time.monotonic() - began


def test_a_waiting_result_is_told_when_the_run_closes(orchestrator: Orchestrator) -> None:
    result, took = result_after_release(orchestrator)
    assert result == "go!"
    # Released as the wait began, then the notification: far from a five-second poll.
    assert took < 3.0, took
    closed_runs = orchestrator.closed_runs
    assert closed_runs is not None
    listener = closed_runs._thread
    assert listener is not None and listener.is_alive()
    # Closing the orchestrator stops listening: no connection outlives it.
    orchestrator.close()
    assert not listener.is_alive()


def test_without_a_listening_connection_the_wait_falls_back_to_polling(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "_FIRST_POLL", 0.2)
    monkeypatch.setattr(client_module, "_LAST_POLL", 0.2)

    def refuse(_self: ClosedRuns) -> Any:
        raise OSError("no listening today")

    monkeypatch.setattr(ClosedRuns, "_connect", refuse)
    result, took = result_after_release(orchestrator)
    assert result == "go!"
    # Released as the wait began, with polls of 0.2 s: the failed listening did
    # not hold the wait up (it used to, for two seconds).
    assert took < 1.5, took
    closed_runs = orchestrator.closed_runs
    assert closed_runs is not None
    # Listening failed; for a while, waiters do not even try.
    assert closed_runs.subscribe("any-run") is None


def test_the_close_is_announced_after_its_commit(
    orchestrator: Orchestrator, database_url: str
) -> None:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(RUN_CLOSED_CHANNEL)))
        RELEASE.set()
        handle = orchestrator.client().start_workflow(
            Held, "go", workflow_id=harness.unique("announced")
        )
        assert handle.result(timeout=30) == "go!"
        notes = list(listener.notifies(timeout=5, stop_after=1))
        # Sent after the commit: whoever hears it finds the run closed.
        status = listener.execute(
            "SELECT status FROM workflow_runs WHERE run_id = %s", (handle.run_id,)
        ).fetchone()
    assert [(note.channel, note.payload) for note in notes] == [(RUN_CLOSED_CHANNEL, handle.run_id)]
    assert status == ("COMPLETED",)
