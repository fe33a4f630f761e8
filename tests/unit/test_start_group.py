"""Concurrent starts commit as a group: who leads, who waits, and what each start gets."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from sample_workflows import ALL_ACTIVITIES, ALL_WORKFLOWS, Job, Pipeline
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

import orchestrator.client as client_module
from orchestrator import (
    IdConflictPolicy,
    IdReusePolicy,
    StartInDoubtError,
    WorkflowAlreadyStartedError,
)
from orchestrator import pipeline as orchestrator_pipeline
from orchestrator.client import commit_starts
from orchestrator.engine import StartResult
from orchestrator.schema import workflow_runs
from orchestrator.start_group import ALONE, MAX_GROUP, Member, StartGroup

pytestmark = pytest.mark.timeout(30)


class Committer:
    """A commit_group that records its groups; the first one waits for the test's word."""

    def __init__(self, settle: Callable[[Member], None] | None = None) -> None:
        self.groups: list[list[Any]] = []
        self.first_entered = threading.Event()
        self.release_first = threading.Event()
        self._settle = settle or (lambda member: member.settle(f"done {member.request}"))

    def __call__(self, members: Sequence[Member]) -> None:
        self.groups.append([member.request for member in members])
        if len(self.groups) == 1:
            self.first_entered.set()
            assert self.release_first.wait(10)
        for member in members:
            self._settle(member)


def queued(group: StartGroup) -> int:
    with group._lock:
        return len(group._queue)


def wait_for(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def starts() -> Iterator[Callable[[StartGroup, list[Any]], dict[Any, Any]]]:
    """Start each request in a thread of its own; the outcomes (or errors) by request.

    Every call returns the same dictionary, which the threads fill in.
    """
    threads: list[threading.Thread] = []
    outcomes: dict[Any, Any] = {}

    def start(group: StartGroup, requests: list[Any]) -> dict[Any, Any]:
        def one(request: Any) -> None:
            try:
                outcomes[request] = group.start(request)
            except BaseException as exc:
                outcomes[request] = exc

        for request in requests:
            thread = threading.Thread(target=one, args=(request,))
            thread.start()
            threads.append(thread)
        return outcomes

    yield start
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def test_a_lone_start_goes_at_once_in_a_group_of_its_own() -> None:
    committer = Committer()
    committer.release_first.set()
    group = StartGroup(committer)
    assert group.start("a") == "done a"
    assert group.start("b") == "done b"
    assert committer.groups == [["a"], ["b"]]


def test_starts_queued_while_one_commits_commit_together_in_order(starts: Any) -> None:
    committer = Committer()
    group = StartGroup(committer)
    outcomes = starts(group, ["lead"])
    assert committer.first_entered.wait(10)
    for name in ("b", "c", "d"):  # one by one, so that the queue's order is known
        starts(group, [name])
        wait_for(lambda n=name: n in [m.request for m in group._queue])
    committer.release_first.set()
    wait_for(lambda: len(outcomes) == 4)
    assert committer.groups == [["lead"], ["b", "c", "d"]]
    assert outcomes == {name: f"done {name}" for name in ("lead", "b", "c", "d")}
    assert not group._leading


def test_a_group_holds_at_most_max_group_starts(starts: Any) -> None:
    committer = Committer()
    group = StartGroup(committer)
    outcomes = starts(group, ["lead"])
    assert committer.first_entered.wait(10)
    starts(group, list(range(MAX_GROUP + 6)))
    wait_for(lambda: queued(group) == MAX_GROUP + 6)
    committer.release_first.set()
    wait_for(lambda: len(outcomes) == MAX_GROUP + 7)
    assert [len(members) for members in committer.groups] == [1, MAX_GROUP, 6]
    assert all(outcomes[n] == f"done {n}" for n in range(MAX_GROUP + 6))


def test_each_start_gets_its_own_outcome_or_error(starts: Any) -> None:
    def settle(member: Member) -> None:
        if member.request == "bad":
            member.settle(error=WorkflowAlreadyStartedError("bad", "r1", "RUNNING"))
        else:
            member.settle(member.request.upper())

    committer = Committer(settle)
    group = StartGroup(committer)
    outcomes = starts(group, ["lead"])
    assert committer.first_entered.wait(10)
    starts(group, ["x", "bad", "y"])
    wait_for(lambda: queued(group) == 3)
    committer.release_first.set()
    wait_for(lambda: len(outcomes) == 4)
    assert isinstance(outcomes["bad"], WorkflowAlreadyStartedError)
    assert (outcomes["lead"], outcomes["x"], outcomes["y"]) == ("LEAD", "X", "Y")


def test_a_commit_that_breaks_off_leaves_its_starts_alone_and_the_lead_passes_on(
    starts: Any,
) -> None:
    calls: list[list[Any]] = []
    entered, release = threading.Event(), threading.Event()

    def commit_group(members: Sequence[Member]) -> None:
        calls.append([member.request for member in members])
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
            raise RuntimeError("the leader's commit broke off")
        for member in members:
            member.settle("ok")

    group = StartGroup(commit_group)
    outcomes = starts(group, ["lead"])
    assert entered.wait(10)
    # The leader's group is only itself: queue two, so the lead passes to them.
    starts(group, ["b", "c"])
    wait_for(lambda: queued(group) == 2)
    release.set()
    wait_for(lambda: len(outcomes) == 3)
    assert isinstance(outcomes["lead"], RuntimeError)
    assert outcomes["b"] == outcomes["c"] == "ok"
    assert calls == [["lead"], ["b", "c"]]
    assert not group._leading


def test_unsettled_members_of_a_broken_group_are_told_their_start_is_in_doubt() -> None:
    def commit_group(members: Sequence[Member]) -> None:
        members[0].settle("first")
        raise KeyboardInterrupt

    group = StartGroup(commit_group)
    member = Member("x")
    group._queue = [Member("first"), member]
    group._leading = True
    with pytest.raises(KeyboardInterrupt):
        group._lead()
    assert member.done.is_set()
    with pytest.raises(StartInDoubtError, match="broke off"):
        member.result()
    assert not group._leading


def test_a_forked_child_starts_without_its_parents_leader() -> None:
    committer = Committer()
    group = StartGroup(committer)
    leader = threading.Thread(target=group.start, args=("parent",))
    leader.start()
    assert committer.first_entered.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: the parent's leader does not exist here
        code = 1
        try:
            committer.release_first.set()
            code = 0 if group.start("child") == "done child" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    committer.release_first.set()
    leader.join(10)
    assert os.waitstatus_to_exitcode(status) == 0


# ----------------------------------------------------------------- the client's groups
@pytest.fixture
def orchestrator(make_orchestrator: Any) -> Any:
    return make_orchestrator(ALL_WORKFLOWS, ALL_ACTIVITIES)


def members(*workflow_ids: str, workflow_type: str = "Pipeline") -> list[Member]:
    return [
        Member(
            client_module._StartRequest(
                workflow_type, [], workflow_id, IdReusePolicy.ALLOW_DUPLICATE, IdConflictPolicy.FAIL
            )
        )
        for workflow_id in workflow_ids
    ]


def run_count(orchestrator: Any) -> int:
    with orchestrator.engine.sessions() as session:
        return int(session.execute(select(func.count()).select_from(workflow_runs)).scalar_one())


def test_a_group_of_starts_commits_each_run(orchestrator: Any) -> None:
    group = members("g1", "g2", "g3")
    commit_starts(orchestrator, group)
    results = [member.result() for member in group]
    assert all(isinstance(result, StartResult) and result.created for result in results)
    client = orchestrator.client()
    for workflow_id, result in zip(("g1", "g2", "g3"), results, strict=True):
        handle = client.get_handle(workflow_id)
        assert handle.run_id == result.run_id
        assert handle.result(timeout=10) == []


def test_a_group_with_a_taken_workflow_id_writes_nothing_and_goes_alone(
    orchestrator: Any,
) -> None:
    client = orchestrator.client()
    held = client.start_workflow(
        Pipeline, [Job(name="slow", sleep_first_attempt=1.0)], workflow_id="taken-open"
    )
    before = run_count(orchestrator)
    group = members("a", "taken-open", "b")
    commit_starts(orchestrator, group)
    assert run_count(orchestrator) == before
    assert [member.result() for member in group] == [ALONE, ALONE, ALONE]
    held.result(timeout=10)


def test_a_start_that_fails_before_the_commit_sends_the_group_alone(orchestrator: Any) -> None:
    group = members("ok", "unstorable")
    group[1].request = replace(group[1].request, payload=[{"name": object()}])
    before = run_count(orchestrator)
    commit_starts(orchestrator, group)
    assert run_count(orchestrator) == before
    assert [member.result() for member in group] == [ALONE, ALONE]
    # Alone, each meets its own fate.
    assert client_module._start_alone(orchestrator, group[0].request).created
    with pytest.raises(Exception, match="object"):
        client_module._start_alone(orchestrator, group[1].request)
    assert run_count(orchestrator) == before + 1


class ServerError(Exception):
    """What psycopg raises for an error the server reports."""

    sqlstate = "40001"

    class diag:
        severity_nonlocalized = "ERROR"


class ServerFatal(ServerError):
    class diag:
        severity_nonlocalized = "FATAL"


def _failing_commit(error: BaseException, *, handed_over: bool) -> Callable[[Any], None]:
    def commit(session: Any, committed: Any = None) -> None:
        if handed_over:  # as pipeline.commit notes a COMMIT that may have reached the server
            session.info[orchestrator_pipeline._COMMIT_HANDED_OVER] = True
        session.rollback()
        raise error

    return commit


@pytest.mark.parametrize(
    "lost",
    [
        DBAPIError("COMMIT", None, Exception("lost"), connection_invalidated=True),
        # FATAL, not ERROR: the backend went away, maybe after committing.
        DBAPIError("COMMIT", None, ServerFatal("terminating connection")),
    ],
    ids=["connection-lost", "fatal"],
)
def test_a_commit_in_doubt_gives_every_start_a_start_in_doubt_error(
    orchestrator: Any, monkeypatch: pytest.MonkeyPatch, lost: DBAPIError
) -> None:
    monkeypatch.setattr(client_module, "commit", _failing_commit(lost, handed_over=True))
    group = members("d1", "d2")
    commit_starts(orchestrator, group)
    errors = []
    for member in group:
        with pytest.raises(StartInDoubtError, match="may or may not") as caught:
            member.result()
        assert caught.value.__cause__ is lost
        errors.append(caught.value)
    assert errors[0] is not errors[1]  # each thread raises its own


@pytest.mark.parametrize(
    ("error", "handed_over"),
    [
        # The database refused the COMMIT: nothing was committed.
        (DBAPIError("COMMIT", None, ServerError("refused")), True),
        # Lost before the COMMIT was handed over: nothing was committed.
        (DBAPIError("COMMIT", None, Exception("lost"), connection_invalidated=True), False),
        # A value that cannot be sent fails before anything is sent.
        (TypeError("not JSON serializable"), False),
    ],
    ids=["refused", "lost-before-the-commit", "unsendable"],
)
def test_a_group_that_surely_did_not_commit_goes_alone(
    orchestrator: Any, monkeypatch: pytest.MonkeyPatch, error: Exception, handed_over: bool
) -> None:
    monkeypatch.setattr(client_module, "commit", _failing_commit(error, handed_over=handed_over))
    group = members("r1", "r2")
    commit_starts(orchestrator, group)
    assert [member.result() for member in group] == [ALONE, ALONE]


def test_a_follower_that_waits_too_long_leaves_the_queue_and_goes_alone(
    starts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import start_group

    monkeypatch.setattr(start_group, "PATIENCE", 0.2)
    committer = Committer()
    group = StartGroup(committer)
    outcomes = starts(group, ["lead"])
    assert committer.first_entered.wait(10)
    starts(group, ["impatient"])
    wait_for(lambda: "impatient" in outcomes)
    assert outcomes["impatient"] is ALONE
    assert queued(group) == 0
    committer.release_first.set()
    wait_for(lambda: "lead" in outcomes)
    assert committer.groups == [["lead"]]
    assert not group._leading


def test_an_interrupted_follower_leaves_the_queue_and_passes_on_the_lead() -> None:
    committer = Committer()
    committer.release_first.set()
    group = StartGroup(committer)
    # Handed the lead, then interrupted before it led: the next start leads.
    first, second = Member("first"), Member("second")
    group._queue = [first, second]
    group._leading = True
    first.leads = True
    group._abandon(first)
    assert group._queue == [second] and second.leads and second.done.is_set()
    # Interrupted while queued behind another: simply gone from the queue.
    third = Member("third")
    group._queue.append(third)
    group._abandon(third)
    assert group._queue == [second] and not third.leads
    group._queue.clear()
    group._abandon(second)
    assert group._leading  # second was no longer queued: nothing to pass on


def test_concurrent_client_starts_all_run(orchestrator: Any) -> None:
    client = orchestrator.client()
    handles: list[Any] = []
    errors: list[BaseException] = []

    def start(index: int) -> None:
        try:
            handles.append(client.start_workflow(Pipeline, [], workflow_id=f"c{index}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors
    assert sorted(handle.workflow_id for handle in handles) == sorted(f"c{i}" for i in range(16))
    assert all(handle.result(timeout=10) == [] for handle in handles)
