"""The application of the pattern tests, run by real worker and scheduler processes.

Workers load it with ``--app tests.integration.pattern_app:orchestrator``. It
keeps to queues of its own: workflow tasks on ``pattern-workflows`` and
activities on ``pattern-activities``, so its workers and the example
application's workers never take each other's messages.

Activities that change something write it to ``it_pattern_effects``, keyed by
their idempotency key: a row per key, and how many attempts reached the write.
The tests read that table to tell "ran more than once" from "took effect once".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert

import activities as activity
from activities import ActivityCancelledError, RetryPolicy
from orchestrator import Orchestrator, Settings, workflow

__all__ = [
    "ACTIVITIES",
    "ACTIVITY_QUEUE",
    "APP_REF",
    "WORKFLOWS",
    "WORKFLOW_QUEUE",
    "build",
    "effects",
    "effects_metadata",
    "orchestrator",
]

WORKFLOW_QUEUE = "pattern-workflows"
ACTIVITY_QUEUE = "pattern-activities"
APP_REF = "tests.integration.pattern_app:orchestrator"

# Short enough that an attempt lost with a killed worker is retried within seconds.
QUICK_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=1),
    maximum_attempts=10,
)
ATTEMPT_SECONDS = timedelta(seconds=3)

effects_metadata = MetaData()
effects = Table(
    "it_pattern_effects",
    effects_metadata,
    Column("idempotency_key", String(600), primary_key=True),
    Column("activity", String(64), nullable=False),
    Column("executions", Integer, nullable=False),
    Column("note", String(255), nullable=False),
)


def _record_effect(note: str) -> str:
    """Write this activity's effect once per idempotency key; count every attempt."""
    info = activity.info()
    statement = pg_insert(effects).values(
        idempotency_key=info.idempotency_key,
        activity=info.activity_type,
        executions=1,
        note=note,
    )
    statement = statement.on_conflict_do_update(
        index_elements=[effects.c.idempotency_key],
        set_={"executions": effects.c.executions + 1, "note": note},
    )
    with orchestrator.db.begin() as conn:
        conn.execute(statement)
    return info.idempotency_key


# ---------------------------------------------------------------------------- activities
@activity.defn(task_queue=ACTIVITY_QUEUE, retry_policy=QUICK_RETRY, start_to_close=ATTEMPT_SECONDS)
def wall_clock() -> float:
    """The worker's clock when the activity ran (seconds since the epoch)."""
    return time.time()


@activity.defn(task_queue=ACTIVITY_QUEUE, retry_policy=QUICK_RETRY, start_to_close=ATTEMPT_SECONDS)
def touch(label: str) -> str:
    """One unit of work with an effect; returns the idempotency key it used."""
    return _record_effect(label)


@activity.defn(task_queue=ACTIVITY_QUEUE, retry_policy=QUICK_RETRY, start_to_close=ATTEMPT_SECONDS)
def reserve(item: str) -> str:
    _record_effect(f"reserved {item}")
    return f"reservation of {item}"


@activity.defn(task_queue=ACTIVITY_QUEUE, retry_policy=QUICK_RETRY, start_to_close=ATTEMPT_SECONDS)
def release(item: str) -> None:
    _record_effect(f"released {item}")


@activity.defn(task_queue=ACTIVITY_QUEUE, retry_policy=QUICK_RETRY, start_to_close=ATTEMPT_SECONDS)
def cancel_hold(item: str) -> None:
    _record_effect(f"hold on {item} cancelled")


@activity.defn(
    task_queue=ACTIVITY_QUEUE,
    retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_attempts=2),
    start_to_close=timedelta(seconds=60),
    heartbeat_timeout=timedelta(seconds=5),
)
def hold_until_shipped(seconds: float) -> str:
    """A slow step that heartbeats, and so learns that its workflow was cancelled."""
    deadline = time.monotonic() + seconds
    beats = 0
    try:
        while time.monotonic() < deadline:
            beats += 1
            activity.heartbeat({"beats": beats})
            time.sleep(0.1)
    except ActivityCancelledError:
        _record_effect(f"stopped after {beats} heartbeats")
        raise
    _record_effect("shipped")
    return "shipped"


# ----------------------------------------------------------------------------- workflows
@workflow.defn
class Sleeper:
    """Sleeps durably, then runs one activity; reports when each happened."""

    @workflow.run
    async def run(self, seconds: float) -> dict[str, float]:
        before = workflow.now()
        await workflow.sleep(timedelta(seconds=seconds))
        after = workflow.now()
        ran_at: float = await workflow.execute_activity(wall_clock)
        return {"before": before.timestamp(), "after": after.timestamp(), "ran_at": ran_at}


class Decision(BaseModel):
    approved: bool
    by: str


class Verdict(BaseModel):
    request: str
    approved: bool
    by: str
    comments: list[str]
    receipt: str


@workflow.defn
class Approval:
    """Collects comments until a decision arrives, then records the verdict."""

    def __init__(self) -> None:
        self.comments: list[str] = []
        self.decision: Decision | None = None

    @workflow.signal
    def comment(self, text: str) -> None:
        self.comments.append(text)

    @workflow.signal
    def decide(self, decision: Decision) -> None:
        if self.decision is None:
            self.decision = decision

    @workflow.query
    def status(self) -> dict[str, Any]:
        return {
            "comments": len(self.comments),
            "last": self.comments[-1] if self.comments else None,
            "decided": self.decision is not None,
        }

    @workflow.query
    def comment_at(self, index: int) -> str:
        return self.comments[index]

    @workflow.run
    async def run(self, request: str) -> Verdict:
        await workflow.wait_condition(lambda: self.decision is not None)
        decision = self.decision
        assert decision is not None
        outcome = "approved" if decision.approved else "rejected"
        receipt: str = await workflow.execute_activity(
            touch, f"{request} {outcome} by {decision.by}"
        )
        return Verdict(
            request=request,
            approved=decision.approved,
            by=decision.by,
            comments=list(self.comments),
            receipt=receipt,
        )


@workflow.defn
class Leaf:
    """A child: runs its activities all at once."""

    @workflow.run
    async def run(self, count: int) -> int:
        prefix = workflow.info().workflow_id
        keys = await asyncio.gather(
            *(workflow.execute_activity(touch, f"{prefix}:{i}") for i in range(count))
        )
        return len(set(keys))


class FanSpec(BaseModel):
    children: int
    activities: int


@workflow.defn
class Tree:
    """The fan-out layout: children x activities each."""

    @workflow.run
    async def run(self, spec: FanSpec) -> int:
        counts = await asyncio.gather(
            *(workflow.execute_child(Leaf, spec.activities) for _ in range(spec.children))
        )
        return sum(counts)


@workflow.defn
class Booking:
    """A saga: reserve, then hold until shipped; undone step by step when cancelled."""

    @workflow.run
    async def run(self, item: str) -> str:
        async with workflow.Saga() as saga:
            saga.add_compensation(release, item)
            await workflow.execute_activity(reserve, item)
            saga.add_compensation(cancel_hold, item)
            shipped: str = await workflow.execute_activity(hold_until_shipped, 60.0)
        return shipped


@workflow.defn
class Counter:
    """An entity: adds up the amounts it is sent, continuing as new every three."""

    def __init__(self) -> None:
        self.total = 0
        self.pending: list[int] = []
        self.done = False

    @workflow.signal
    def add(self, amount: int) -> None:
        self.pending.append(amount)

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def value(self) -> int:
        return self.total + sum(self.pending)

    @workflow.run
    async def run(self, total: int) -> int:
        self.total = total
        handled = 0
        while True:
            await workflow.wait_condition(lambda: bool(self.pending) or self.done)
            while self.pending:
                self.total += self.pending.pop(0)
                handled += 1
            if self.done:
                return self.total
            if handled >= 3:
                workflow.continue_as_new(self.total)


WORKFLOWS: list[type[Any]] = [Sleeper, Approval, Leaf, Tree, Booking, Counter]
ACTIVITIES: list[Callable[..., Any]] = [
    wall_clock,
    touch,
    reserve,
    release,
    cancel_hold,
    hold_until_shipped,
]


def build(settings: Settings | None = None) -> Orchestrator:
    """An orchestrator of this application (on its own workflow queue by default)."""
    return Orchestrator(
        workflows=WORKFLOWS,
        activities=ACTIVITIES,
        settings=settings or Settings(workflow_queue=WORKFLOW_QUEUE),
    )


# What the worker processes load. Settings not given here come from the environment.
orchestrator = build()
