"""Workflows for the pattern tests: timers, signals, queries, entities, children, patches."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from pydantic import BaseModel
from sample_workflows import CALLS, FAST_RETRY, slow

import activities as activity
from activities import ActivityCancelledError, RetryPolicy
from orchestrator import workflow

DAY = 24 * 3600.0


@activity.defn(retry_policy=FAST_RETRY)
def notify(message: str) -> str:
    CALLS.record("notify", message)
    return message


@activity.defn(retry_policy=FAST_RETRY)
def compensate(message: str) -> None:
    CALLS.record("compensate", message)


@workflow.defn
class Napper:
    """Sleeps for days between two steps."""

    @workflow.run
    async def run(self, days: float) -> str:
        started = workflow.now()
        await workflow.sleep(timedelta(days=days))
        await asyncio.sleep(60)
        slept = workflow.now() - started
        return f"slept {slept.total_seconds() / DAY:.0f} days"


class Decision(BaseModel):
    approved: bool
    by: str


@workflow.defn
class Approval:
    """Waits for a decision; reminds after the first timeout, gives up after the second."""

    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.reminded = False

    @workflow.signal
    def decide(self, decision: Decision) -> None:
        self.decisions.append(decision)

    @workflow.query
    def status(self) -> dict[str, object]:
        return {"decisions": len(self.decisions), "reminded": self.reminded}

    @workflow.run
    async def run(self, request: str) -> str:
        async with workflow.Saga() as saga:
            saga.add_compensation(compensate, request)
            try:
                await workflow.wait_condition(lambda: bool(self.decisions), timeout=DAY)
            except TimeoutError:
                self.reminded = True
                await workflow.execute_activity(notify, f"reminder: {request}")
                await workflow.wait_condition(lambda: bool(self.decisions), timeout=2 * DAY)
        first = self.decisions[0]
        return f"{'approved' if first.approved else 'rejected'} by {first.by}"


@workflow.defn
class Mailbox:
    """Does some work first, then reads the two signals it expects, in order."""

    def __init__(self) -> None:
        self.received: list[str] = []

    @workflow.signal
    def post(self, message: str) -> None:
        self.received.append(message)

    @workflow.run
    async def run(self, seconds: float) -> list[str]:
        await workflow.execute_activity(slow, seconds)
        await workflow.wait_condition(lambda: len(self.received) >= 2)
        return self.received


@workflow.defn
class Listener:
    """Takes signals forever; its history only grows."""

    def __init__(self) -> None:
        self.count = 0

    @workflow.signal
    def ping(self) -> None:
        self.count += 1

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)


@workflow.defn
class Counter:
    """An entity: counts signals, continues as new every few of them."""

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


@workflow.defn
class Leaf:
    """A child: runs a few activities at once."""

    @workflow.run
    async def run(self, count: int) -> int:
        results = await asyncio.gather(
            *(
                workflow.execute_activity(notify, f"{workflow.info().workflow_id}:{i}")
                for i in range(count)
            )
        )
        return len(results)


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
class PartialFailures:
    """Gathers children with return_exceptions and counts the failures."""

    @workflow.run
    async def run(self) -> dict[str, int]:
        results = await asyncio.gather(
            workflow.execute_child(Leaf, 1),
            workflow.execute_child("NoSuchChild", None),
            return_exceptions=True,
        )
        return {
            "ok": sum(1 for r in results if r == 1),
            "failed": sum(1 for r in results if isinstance(r, Exception)),
        }


@workflow.defn
class Greedy:
    """Asks for more pending activities than a run may have."""

    @workflow.run
    async def run(self, count: int) -> int:
        await asyncio.gather(*(workflow.execute_activity(notify, str(i)) for i in range(count)))
        return count


@activity.defn(
    retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=20), maximum_attempts=3)
)
def beating(seconds: float) -> str:
    info = activity.info()
    CALLS.record("beating", info.heartbeat_details)
    if info.attempt == 1:
        activity.heartbeat({"progress": 1})
        time.sleep(seconds)  # stops heartbeating: the heartbeat timeout fires
        return "too late"
    return f"resumed from {info.heartbeat_details}"


@activity.defn(retry_policy=FAST_RETRY)
def long_job(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            activity.heartbeat()
            time.sleep(0.02)
    except ActivityCancelledError:
        CALLS.record("long_job", "cancelled")
        raise
    return "finished"


@workflow.defn
class Heartbeats:
    @workflow.run
    async def run(self, seconds: float) -> str:
        result: str = await workflow.execute_activity(
            beating, seconds, heartbeat_timeout=0.3, start_to_close=30
        )
        return result


@workflow.defn
class LongJob:
    @workflow.run
    async def run(self, seconds: float) -> str:
        result: str = await workflow.execute_activity(long_job, seconds, start_to_close=30)
        return result


PATTERN_WORKFLOWS = [
    Napper,
    Approval,
    Mailbox,
    Listener,
    Counter,
    Leaf,
    Tree,
    PartialFailures,
    Greedy,
    Heartbeats,
    LongJob,
]
PATTERN_ACTIVITIES = [notify, compensate, beating, long_job, slow]


@workflow.defn(name="Versioned")
class VersionedV1:
    """The first version: two steps."""

    @workflow.run
    async def run(self) -> list[str]:
        return [
            await workflow.execute_activity(notify, "a"),
            await workflow.execute_activity(notify, "b"),
        ]


@workflow.defn(name="Versioned")
class VersionedV2:
    """A step added between the two, behind a patch."""

    @workflow.run
    async def run(self) -> list[str]:
        steps = [await workflow.execute_activity(notify, "a")]
        if workflow.patched("add-c"):
            steps.append(await workflow.execute_activity(compensate, "c") or "c")
        steps.append(await workflow.execute_activity(notify, "b"))
        return steps


@workflow.defn(name="Versioned")
class VersionedUnpatched:
    """The same change made carelessly: no patch."""

    @workflow.run
    async def run(self) -> list[str]:
        steps = [await workflow.execute_activity(notify, "a")]
        steps.append(await workflow.execute_activity(compensate, "c") or "c")
        steps.append(await workflow.execute_activity(notify, "b"))
        return steps


@workflow.defn(name="Versioned")
class VersionedV3:
    """Every old run has finished: the patch is deprecated, the new step stays."""

    @workflow.run
    async def run(self) -> list[str]:
        steps = [await workflow.execute_activity(notify, "a")]
        workflow.deprecate_patch("add-c")
        steps.append(await workflow.execute_activity(compensate, "c") or "c")
        steps.append(await workflow.execute_activity(notify, "b"))
        return steps


def __getattr__(name: str) -> object:
    # The replay command loads the application by name.
    if name == "V1_APP":
        from orchestrator import Orchestrator

        return Orchestrator(workflows=[VersionedV1], activities=PATTERN_ACTIVITIES)
    raise AttributeError(name)
