"""A live workflow object driven by its history.

The instance applies recorded events one at a time, runs the workflow code until
it blocks after each, and collects the commands the code issues. Commands that the
history already records are matched against it (a mismatch is a
:class:`NondeterminismError`); the rest are new and become the next events. The
same instance can be kept between workflow tasks and fed only the new events.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from activities.errors import ApplicationError
from activities.failure import Failure
from activities.payload import from_payload, to_payload
from orchestrator.definition import WorkflowDefinition
from orchestrator.errors import (
    ActivityError,
    ChildWorkflowError,
    ContinueAsNew,
    NondeterminismError,
    PendingLimitError,
    RunClosedError,
    UnknownSignalError,
)
from orchestrator.history import (
    CLOSING_EVENTS,
    ActivityCompleted,
    ActivityFailed,
    ActivityScheduled,
    CancelRequested,
    ChildWorkflowClosed,
    ChildWorkflowScheduled,
    EventEmitted,
    HistoryEvent,
    MarkerRecorded,
    RecordedEvent,
    SignalReceived,
    TimerCancelled,
    TimerFired,
    TimerStarted,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowCompleted,
    WorkflowContinuedAsNew,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowTerminated,
)
from orchestrator.loop import DeterministicLoop

if TYPE_CHECKING:
    from orchestrator.runs import LockedRun


@dataclass(frozen=True)
class WorkflowInfo:
    """What a workflow knows about its own run."""

    workflow_id: str
    run_id: str
    workflow_type: str
    history_length: int
    is_replaying: bool
    continue_as_new_suggested: bool


@dataclass(frozen=True)
class ActivityDefaults:
    """Engine-wide settings the instance applies to the commands it issues."""

    start_to_close: float
    max_payload_bytes: int
    max_pending: int = 2000
    history_warn_events: int = 10_240


class _DurableTimer(asyncio.TimerHandle):
    """A timer handle whose cancellation is recorded in the history."""

    def __init__(
        self,
        instance: WorkflowInstance,
        timer_id: str,
        *,
        when: float,
        callback: Callable[..., object],
        args: Sequence[Any],
        context: contextvars.Context | None,
    ) -> None:
        super().__init__(when, callback, args, instance.loop, context)
        self.timer_id = timer_id
        self._instance = instance
        self._fire_callback = callback
        self._fire_args = tuple(args)
        self._fire_context = context

    def cancel(self) -> None:
        if not self.cancelled():
            self._instance.timer_cancelled(self.timer_id)
        super().cancel()

    def fire(self) -> None:
        if not self.cancelled():
            self._instance.loop.call_soon(
                self._fire_callback, *self._fire_args, context=self._fire_context
            )


class WorkflowInstance:
    """One run's workflow object, its deterministic loop and its pending commands."""

    def __init__(
        self,
        defn: WorkflowDefinition,
        *,
        run_id: str,
        workflow_id: str,
        defaults: ActivityDefaults,
    ) -> None:
        self.defn = defn
        self.run_id = run_id
        self.workflow_id = workflow_id
        self.defaults = defaults
        self.loop = DeterministicLoop(self)  # type: ignore[abstract]
        self.applied_seq = 0
        # The run row as the last transaction of this process that advanced
        # this instance committed it (set by the engine; see InstanceCache.known_run).
        self.known_run: LockedRun | None = None
        self.is_replaying = False
        self.closed = False
        self.random = random.Random(0)
        self.now = datetime.fromtimestamp(0, UTC)
        self.compensations_run = 0
        self.compensation_failures: list[str] = []
        self.saga_compensated = False
        self._pending: deque[HistoryEvent] = deque()
        self._activities: dict[str, asyncio.Future[Any]] = {}
        self._children: dict[str, asyncio.Future[Any]] = {}
        # Whether the code ever started a child: a run that did not has none to
        # cancel or terminate when it closes.
        self.started_children = False
        self._timers: dict[str, _DurableTimer] = {}
        self._conditions: list[tuple[Callable[[], bool], asyncio.Future[bool]]] = []
        self._counters: dict[str, int] = {}
        self._history_markers: set[str] = set()
        self._patches: dict[str, bool] = {}
        self._main: asyncio.Task[None] | None = None
        self._closing_issued = False
        self.carried_signals: list[SignalReceived] = []
        self._obj: Any = None

    # -- used by the workflow API ------------------------------------------------
    def info(self) -> WorkflowInfo:
        return WorkflowInfo(
            workflow_id=self.workflow_id,
            run_id=self.run_id,
            workflow_type=self.defn.name,
            history_length=self.applied_seq,
            is_replaying=self.is_replaying,
            continue_as_new_suggested=self.applied_seq >= self.defaults.history_warn_events,
        )

    @property
    def may_have_open_work(self) -> bool:
        """Whether an activity or a timer of this run may still be open in the store.

        Every attempt, retry timer and workflow timer belongs to an activity or
        timer the code is still waiting for; once all have resolved, the store
        holds nothing open for the run.
        """
        return bool(self._activities or self._timers)

    def next_id(self, kind: str) -> str:
        """The next id of a kind of command; activities use bare numbers."""
        self._counters[kind] = self._counters.get(kind, 0) + 1
        number = self._counters[kind]
        return str(number) if kind == "activity" else f"{kind[0]}{number}"

    def next_activity_id(self) -> str:
        return self.next_id("activity")

    def _check_pending_limit(self) -> None:
        if len(self._activities) + len(self._children) >= self.defaults.max_pending:
            raise PendingLimitError(
                f"run {self.run_id} already has {self.defaults.max_pending} pending "
                "activities and child workflows; wait for some before starting more"
            )

    def _check_open(self) -> None:
        if self._closing_issued:
            raise RunClosedError(
                f"run {self.run_id} has already decided to close; nothing more can start"
            )

    def schedule_activity(self, command: ActivityScheduled) -> asyncio.Future[Any]:
        self._check_open()
        self._check_pending_limit()
        future = self.loop.create_future()
        self._activities[command.activity_id] = future
        self._pending.append(command)
        return future

    def start_child(self, command: ChildWorkflowScheduled) -> asyncio.Future[Any]:
        self._check_open()
        self._check_pending_limit()
        future = self.loop.create_future()
        self._children[command.child_id] = future
        self.started_children = True
        self._pending.append(command)
        return future

    def start_timer(
        self,
        delay: float,
        callback: Callable[..., object],
        args: Sequence[Any],
        context: contextvars.Context | None,
    ) -> asyncio.TimerHandle:
        self._check_open()
        timer_id = self.next_id("timer")
        seconds = max(float(delay), 0.0)
        handle = _DurableTimer(
            self,
            timer_id,
            when=self.loop.time() + seconds,
            callback=callback,
            args=args,
            context=context,
        )
        self._timers[timer_id] = handle
        self._pending.append(TimerStarted(timer_id=timer_id, seconds=seconds))
        return handle

    def timer_cancelled(self, timer_id: str) -> None:
        if self._timers.pop(timer_id, None) is not None:
            self._pending.append(TimerCancelled(timer_id=timer_id))

    def emit(self, event: Any) -> None:
        """Record a domain event; the engine publishes it with this transition."""
        from events import EventEnvelope

        self._check_open()
        envelope = EventEnvelope.wrap(
            event,
            correlation_id=self.workflow_id,
            causation_id=self.run_id,
            producer=self.defn.name,
            occurred_at=self.now,
            # Deterministic: a replay derives the same id, and the consumer's
            # inbox recognises a redelivery of the same event.
            event_id=f"{self.run_id}:{self.next_id('event')}",
            max_payload_bytes=self.defaults.max_payload_bytes,
        )
        self._pending.append(
            EventEmitted(event_type=envelope.type, envelope=envelope.model_dump(mode="json"))
        )

    def wait_condition(self, predicate: Callable[[], bool]) -> asyncio.Future[bool]:
        future = self.loop.create_future()
        self._conditions.append((predicate, future))
        return future

    def patched(self, patch_id: str, *, deprecated: bool = False) -> bool:
        """See ``workflow.patched``: new code records a marker, old histories lack it."""
        if patch_id in self._patches:
            return self._patches[patch_id]
        if patch_id in self._history_markers or (not self.is_replaying and not deprecated):
            self._pending.append(MarkerRecorded(patch_id=patch_id))
            taken = True
        else:
            taken = deprecated
        self._patches[patch_id] = taken
        return taken

    def query(self, name: str, arg: Any) -> Any:
        handler = self.defn.queries.get(name)
        if handler is None:
            raise UnknownSignalError(f"workflow {self.defn.name} has no query {name!r}")
        method = getattr(self._obj, handler.method)
        value = from_payload(arg, handler.input_type) if handler.takes_input else None
        result = self.loop.call_in_loop(lambda: method(value) if handler.takes_input else method())
        return to_payload(result, handler.output_type, limit=self.defaults.max_payload_bytes)

    # -- driven by the engine -------------------------------------------------------
    def advance(self, events: Sequence[RecordedEvent], processed_seq: int) -> list[HistoryEvent]:
        """Apply ``events`` (the next ones after ``applied_seq``); return new commands.

        Events up to ``processed_seq`` were seen by an earlier workflow task, so the
        code is replaying them (the logger stays quiet, ``patched`` looks at history).
        """
        self._history_markers.update(
            e.event.patch_id for e in events if isinstance(e.event, MarkerRecorded)
        )
        for recorded in events:
            if recorded.seq != self.applied_seq + 1:
                raise RuntimeError(
                    f"history gap in run {self.run_id}: expected event "
                    f"{self.applied_seq + 1}, got {recorded.seq}"
                )
            self.is_replaying = recorded.seq <= processed_seq
            self.now = recorded.created_at
            event = recorded.event
            if event.IS_COMMAND:
                self._match(recorded.seq, event)
            else:
                self._apply(event)
                self.loop.run_until_idle(self.now.timestamp(), self._check_conditions)
            self.applied_seq = recorded.seq
        self.is_replaying = False
        return list(self._pending)

    def recorded(self, commands: int) -> None:
        """The engine appended the first ``commands`` pending commands to the history."""
        for _ in range(commands):
            event = self._pending.popleft()
            if event.TYPE in CLOSING_EVENTS:
                self.closed = True
        self.applied_seq += commands

    def close(self) -> None:
        """Drop the instance: cancel what is left so nothing lingers in memory. Once."""
        if self.loop.is_closed():
            return  # a second cancel would run the code's teardown again
        if self._main is not None and not self._main.done():
            self._main.cancel()
            # The code may raise while being torn down; it is gone anyway.
            with contextlib.suppress(Exception):
                self.loop.run_until_idle(self.now.timestamp())
        self.loop.close()

    # -- internals ------------------------------------------------------------------
    def _match(self, seq: int, recorded: HistoryEvent) -> None:
        if not self._pending:
            raise NondeterminismError(
                run_id=self.run_id, seq=seq, recorded=recorded.describe(), issued="no command"
            )
        issued = self._pending.popleft()
        if not _same_command(recorded, issued):
            raise NondeterminismError(
                run_id=self.run_id, seq=seq, recorded=recorded.describe(), issued=issued.describe()
            )
        if issued.TYPE in CLOSING_EVENTS:
            self.closed = True

    def _apply(self, event: HistoryEvent) -> None:
        if isinstance(event, WorkflowStarted):
            self.random = random.Random(event.seed)
            self._obj = self.defn.cls()
            self._main = self.loop.create_task(self._run_main(event.input), name="workflow")
        elif isinstance(event, ActivityCompleted):
            self._resolve(self._activities, event.activity_id, result=event.result)
        elif isinstance(event, ActivityFailed):
            failure = Failure.from_json(event.failure)
            error = ActivityError(
                activity_type=event.activity_type, activity_id=event.activity_id, failure=failure
            )
            error.__cause__ = ApplicationError(
                failure.message,
                type=failure.type,
                non_retryable=failure.non_retryable,
                details=failure.details,
            )
            self._resolve(self._activities, event.activity_id, error=error)
        elif isinstance(event, TimerFired):
            timer = self._timers.pop(event.timer_id, None)
            if timer is not None:
                timer.fire()
        elif isinstance(event, SignalReceived):
            self._deliver_signal(event)
        elif isinstance(event, ChildWorkflowClosed):
            if event.status == "COMPLETED":
                self._resolve(self._children, event.child_id, result=event.result)
            else:
                self._resolve(
                    self._children,
                    event.child_id,
                    error=ChildWorkflowError(
                        workflow_id=event.workflow_id,
                        status=event.status,
                        failure=Failure.from_json(event.failure) if event.failure else None,
                    ),
                )
        elif isinstance(event, CancelRequested):
            if self._main is not None and not self._main.done():
                self._main.cancel(event.reason or "cancel requested")
        elif isinstance(event, WorkflowTerminated):
            self.closed = True
            self._closing_issued = True

    @staticmethod
    def _resolve(
        futures: dict[str, asyncio.Future[Any]],
        key: str,
        *,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        future = futures.pop(key, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _deliver_signal(self, event: SignalReceived) -> None:
        if self._closing_issued:
            # The code has already decided to close; a continue-as-new hands these
            # on to the next run.
            self.carried_signals.append(event)
            return
        handler = self.defn.signals.get(event.name)
        if handler is None:
            return  # refused at the client; a renamed handler ignores old signals
        method = getattr(self._obj, handler.method)

        async def run() -> None:
            try:
                value = from_payload(event.input, handler.input_type)
                outcome = method(value) if handler.takes_input else method()
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception as exc:
                # A broken signal handler fails the run, as the main code would.
                self._issue_closing(WorkflowFailed(failure=Failure.from_exception(exc).to_json()))
                if self._main is not None and not self._main.done():
                    self._main.cancel()

        self.loop.create_task(run(), name=f"signal {event.name}")

    def _check_conditions(self) -> bool:
        progressed = False
        for entry in list(self._conditions):
            predicate, future = entry
            if future.done():
                self._conditions.remove(entry)
                continue
            if predicate():
                self._conditions.remove(entry)
                future.set_result(True)
                progressed = True
        return progressed

    def _issue_closing(self, command: HistoryEvent) -> None:
        if not self._closing_issued:
            self._closing_issued = True
            self._pending.append(command)

    async def _run_main(self, payload: Any) -> None:
        method = getattr(self._obj, self.defn.run_method)
        limit = self.defaults.max_payload_bytes
        try:
            if self.defn.takes_input:
                result = await method(from_payload(payload, self.defn.input_type))
            else:
                result = await method()
            command: HistoryEvent = WorkflowCompleted(
                result=to_payload(result, self.defn.output_type, limit=limit)
            )
        except ContinueAsNew as request:
            command = WorkflowContinuedAsNew(input=request.input)
        except asyncio.CancelledError:
            command = WorkflowCancelled(compensations=self.compensations_run)
        except Exception as exc:
            failure = Failure.from_exception(exc)
            if self.saga_compensated and not self.compensation_failures:
                command = WorkflowCompensated(
                    failure=failure.to_json(), compensations=self.compensations_run
                )
            else:
                if self.compensation_failures:
                    failure = failure.model_copy(
                        update={
                            "message": failure.message
                            + "; compensations failed: "
                            + "; ".join(self.compensation_failures)
                        }
                    )
                command = WorkflowFailed(failure=failure.to_json())
        self._issue_closing(command)


def _same_command(recorded: HistoryEvent, issued: HistoryEvent) -> bool:
    if recorded.TYPE != issued.TYPE:
        return False
    if isinstance(recorded, ActivityScheduled) and isinstance(issued, ActivityScheduled):
        return (
            recorded.activity_id == issued.activity_id
            and recorded.activity_type == issued.activity_type
            and recorded.is_compensation == issued.is_compensation
        )
    if isinstance(recorded, TimerStarted | TimerCancelled) and isinstance(
        issued, TimerStarted | TimerCancelled
    ):
        return recorded.timer_id == issued.timer_id
    if isinstance(recorded, MarkerRecorded) and isinstance(issued, MarkerRecorded):
        return recorded.patch_id == issued.patch_id
    if isinstance(recorded, EventEmitted) and isinstance(issued, EventEmitted):
        return recorded.event_type == issued.event_type
    if isinstance(recorded, ChildWorkflowScheduled) and isinstance(issued, ChildWorkflowScheduled):
        return recorded.child_id == issued.child_id and (
            recorded.workflow_type == issued.workflow_type
        )
    return True


def current_instance() -> WorkflowInstance | None:
    """The instance whose code is running on this thread, if any."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    if isinstance(loop, DeterministicLoop) and isinstance(loop.owner, WorkflowInstance):
        return loop.owner
    return None
