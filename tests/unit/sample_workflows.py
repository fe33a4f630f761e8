"""Small workflows and activities shared by the engine's unit tests."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

import activities as activity
from activities import ApplicationError, RetryPolicy
from orchestrator import workflow


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=20), maximum_attempts=5)


class Calls:
    """What activities saw, shared with the test that drives them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []

    def record(self, name: str, value: Any = None) -> None:
        info = activity.info()
        with self.lock:
            self.seen.append(
                {
                    "name": name,
                    "attempt": info.attempt,
                    "key": info.idempotency_key,
                    "value": value,
                    "compensation": info.is_compensation,
                }
            )

    def names(self) -> list[str]:
        with self.lock:
            return [call["name"] for call in self.seen]


CALLS = Calls()


class Job(BaseModel):
    name: str
    fail_times: int = 0
    non_retryable: bool = False
    sleep_first_attempt: float = 0.0


@activity.defn(retry_policy=FAST_RETRY)
def step(job: Job) -> str:
    CALLS.record("step", job.name)
    info = activity.info()
    if info.attempt == 1 and job.sleep_first_attempt:
        time.sleep(job.sleep_first_attempt)
    if info.attempt <= job.fail_times:
        raise ApplicationError(
            f"{job.name} failed on attempt {info.attempt}",
            type="Flaky",
            non_retryable=job.non_retryable,
        )
    return f"{job.name}:done"


@activity.defn(retry_policy=FAST_RETRY)
def undo(job: Job) -> None:
    CALLS.record("undo", job.name)


@activity.defn(retry_policy=FAST_RETRY)
def slow(seconds: float) -> float:
    CALLS.record("slow", seconds)
    time.sleep(seconds)
    return seconds


@workflow.defn
class Pipeline:
    """Runs its jobs one by one inside a saga; each registers its undo first."""

    @workflow.run
    async def run(self, jobs: list[Job]) -> list[str]:
        results = []
        async with workflow.Saga() as saga:
            for job in jobs:
                saga.add_compensation(undo, job)
                results.append(await workflow.execute_activity(step, job))
        return results


@workflow.defn
class FanOut:
    """Runs its jobs at once with asyncio.gather."""

    @workflow.run
    async def run(self, jobs: list[Job]) -> list[str]:
        return list(await asyncio.gather(*(workflow.execute_activity(step, j) for j in jobs)))


@workflow.defn
class Deterministic:
    """Returns values that must survive replay unchanged."""

    @workflow.run
    async def run(self) -> dict[str, str]:
        first = str(workflow.uuid4())
        number = workflow.random().randint(0, 10**9)
        await workflow.execute_activity(step, Job(name="x"))
        return {
            "uuid": first,
            "number": str(number),
            "now": workflow.now().isoformat(),
            "workflow_id": workflow.info().workflow_id,
        }


@workflow.defn
class Sleeper:
    """Waits on a slow activity inside a saga (cancellation tests)."""

    @workflow.run
    async def run(self, seconds: float) -> float:
        async with workflow.Saga() as saga:
            saga.add_compensation(undo, Job(name="sleeper"))
            result: float = await workflow.execute_activity(slow, seconds, start_to_close=30)
            return result


@workflow.defn
class Broken:
    """Raises an ordinary error: the run fails with it."""

    @workflow.run
    async def run(self) -> None:
        raise ValueError("bad workflow code")


@workflow.defn
class UsesAsyncioSleep:
    """Waits with plain asyncio.sleep, which becomes a durable timer."""

    @workflow.run
    async def run(self) -> None:
        await asyncio.sleep(0.2)


ALL_WORKFLOWS = [Pipeline, FanOut, Deterministic, Sleeper, Broken, UsesAsyncioSleep]
ALL_ACTIVITIES = [step, undo, slow]


def _cli_app() -> Any:
    # Built from the environment when the CLI tests load it by name.
    from orchestrator import Orchestrator

    return Orchestrator(workflows=ALL_WORKFLOWS, activities=ALL_ACTIVITIES)


def __getattr__(name: str) -> Any:
    if name == "CLI_APP":
        return _cli_app()
    raise AttributeError(name)


@activity.defn(retry_policy=FAST_RETRY)
def listing() -> Any:
    return {"items": [1, 2]}


@workflow.defn
class Mutator:
    """Changes the value an activity returned, then acts on it."""

    @workflow.run
    async def run(self) -> int:
        found = await workflow.execute_activity(listing)
        found["items"].append(3)
        for item in found["items"]:
            await workflow.execute_activity(step, Job(name=str(item)))
        return len(found["items"])


@workflow.defn
class Leaky:
    """Returns while a background task of its own still wants to run an activity."""

    @workflow.run
    async def run(self) -> str:
        async def late() -> None:
            await asyncio.sleep(0)
            await workflow.execute_activity(step, Job(name="too-late"))

        asyncio.get_running_loop().create_task(late())
        return "done"


@workflow.defn
class LeavesWorkOpen:
    """Returns while an activity of its own still runs and a timer still waits."""

    @workflow.run
    async def run(self) -> str:
        loop = asyncio.get_running_loop()
        self.left_open = [
            loop.create_task(
                workflow.execute_activity(step, Job(name="held", sleep_first_attempt=1))
            ),
            loop.create_task(asyncio.sleep(3600)),
        ]
        await workflow.execute_activity(step, Job(name="quick"))
        return "done"


@workflow.defn
class Wide:
    """Many activities at once, to be terminated half-way."""

    @workflow.run
    async def run(self, count: int) -> None:
        await asyncio.gather(*(workflow.execute_activity(slow, 0.3) for _ in range(count)))


ALL_WORKFLOWS += [Mutator, Leaky, Wide]
ALL_ACTIVITIES += [listing]
