"""The Orchestrator: one object that wires settings, registry, database and broker.

Everything is built lazily, so that importing an application module (as Celery's
``-A`` does) connects to nothing, and a forked worker child builds its own
connections.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine as DbEngine

from activities.definition import ActivityDefinition
from activities.payload import to_payload, validate_input
from orchestrator.activity_runner import EagerObserver
from orchestrator.db import create_db_engine, utcnow
from orchestrator.engine import Engine
from orchestrator.errors import WorkflowAlreadyStartedError
from orchestrator.policies import IdConflictPolicy, IdReusePolicy
from orchestrator.registry import Registry
from orchestrator.run_closed import ClosedRuns, can_listen
from orchestrator.settings import Settings
from orchestrator.start_group import StartGroup
from orchestrator.writes import write
from outbox.errors import OrchestratorError, PublishError
from outbox.message import OutboxMessage
from outbox.publisher import Publisher
from outbox.relay import Relay
from outbox.writer import OutboxWriter

if TYPE_CHECKING:
    from celery import Celery

    from orchestrator.client import Client
    from orchestrator.embedded import EmbeddedBroker

log = logging.getLogger("orchestrator")


class PublisherByKind:
    """One publisher per message kind: Celery tasks and domain events."""

    def __init__(self, publishers: dict[str, Publisher]) -> None:
        self._publishers = publishers

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        for kind, publisher in self._publishers.items():
            batch = [message for message in messages if message.kind == kind]
            if batch:
                publisher.publish(batch)
        unknown = {m.kind for m in messages} - set(self._publishers)
        if unknown:
            raise PublishError(f"no publisher for message kinds {sorted(unknown)}")


class Orchestrator:
    """The workflows and activities of an application, and how to reach its services.

    ``settings`` defaults to ``Settings()``, read from ``ORCHESTRATOR_*``
    environment variables; with none set it runs embedded (SQLite, in-process broker).
    """

    def __init__(
        self,
        *,
        workflows: Iterable[type[Any]] = (),
        activities: Iterable[Callable[..., Any] | ActivityDefinition] = (),
        settings: Settings | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.clock = clock or utcnow
        # Set by the testing environment: how many callers wait for a result now.
        self.waiting_for_results = 0
        self.registry = Registry(workflows, activities)
        self._lock = threading.RLock()
        self._db: DbEngine | None = None
        self._engine: Engine | None = None
        self._celery: Celery | None = None
        self._publisher: Publisher | None = None
        self._embedded: EmbeddedBroker | None = None
        self._local_queues: frozenset[str] = frozenset()
        self._eager_observer: EagerObserver | None = None
        self._closed_runs: ClosedRuns | None = None
        self._start_group: StartGroup | None = None

    # -- lazily built parts -------------------------------------------------------
    @property
    def db(self) -> DbEngine:
        with self._lock:
            if self._db is None:
                self._db = create_db_engine(self.settings.database_url)
            return self._db

    @property
    def closed_runs(self) -> ClosedRuns | None:
        """Who waits here for runs to close, told when one does; None where runs are polled."""
        db = self.db
        with self._lock:
            if self._closed_runs is None and can_listen(db):
                self._closed_runs = ClosedRuns(db)
            return self._closed_runs

    @property
    def start_group(self) -> StartGroup:
        """Where this process's starts in their own transactions meet to commit together."""
        with self._lock:
            if self._start_group is None:
                from orchestrator.client import commit_starts

                self._start_group = StartGroup(partial(commit_starts, self))
            return self._start_group

    @property
    def celery(self) -> Celery:
        """The Celery app (``celery -A module:attribute worker`` works on it too)."""
        with self._lock:
            if self._celery is None:
                from orchestrator.celery_app import create_celery

                self._celery = create_celery(self)
            return self._celery

    @property
    def publisher(self) -> Publisher:
        with self._lock:
            if self._publisher is None:
                if self.settings.embedded:
                    from orchestrator.embedded import EmbeddedBroker

                    self._embedded = EmbeddedBroker(self)
                    self._publisher = self._embedded
                else:
                    from events import EventPublisher
                    from events.config import EventSettings
                    from orchestrator.task_publisher import CeleryPublisher

                    self._publisher = PublisherByKind(
                        {
                            "task": CeleryPublisher(
                                self.celery,
                                dead_letter_exchange=self.settings.dead_letter_exchange,
                            ),
                            "event": EventPublisher(
                                self.settings.broker_url,
                                exchange=EventSettings().events_exchange,
                            ),
                        }
                    )
            return self._publisher

    @property
    def _relay_only_kinds(self) -> frozenset[str]:
        # Events go out only through the relay, which keeps each workflow's events
        # in commit order; the in-process broker has a single queue, so no need.
        return frozenset() if self.settings.embedded else frozenset({"event"})

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = Engine(
                    registry=self.registry,
                    settings=self.settings,
                    db=self.db,
                    outbox=OutboxWriter(
                        self.db,
                        self.publisher,
                        publish_after_commit=self.settings.publish_after_commit,
                        relay_only_kinds=self._relay_only_kinds,
                        batch_marks=not self.settings.embedded,
                        # In a pipeline, the insert skips SQLAlchemy's execution.
                        insert=write,
                    ),
                    clock=self.clock,
                )
                self._engine.serve_locally(self._local_queues, self._eager_observer)
            return self._engine

    def serve_queues_locally(
        self, queues: Iterable[str], observer: EagerObserver | None = None
    ) -> None:
        """This process is a worker consuming ``queues``: run activities decided on them here.

        Called when a Celery worker starts (see ``eager_max_steps``); ``observer``
        hears of every attempt that runs so, without a message of its own.
        """
        with self._lock:
            self._local_queues = frozenset(queues)
            self._eager_observer = observer
            if self._engine is not None:
                self._engine.serve_locally(self._local_queues, observer)

    def client(self) -> Client:
        """A client for starting and inspecting runs (starts the embedded workers if embedded)."""
        from orchestrator.client import Client

        if self.settings.embedded:
            self.start_embedded()
        return Client(self)

    # -- processes ------------------------------------------------------------------
    def relay(self) -> Relay:
        return Relay(
            self.db,
            self.publisher,
            grace=self.settings.relay_grace_seconds,
            poll_interval=self.settings.relay_poll_seconds,
            relay_only_kinds=self._relay_only_kinds,
        )

    def run_scheduler(self, stop: threading.Event) -> None:
        """Fire timers and expire deadlines until ``stop`` is set (survives database outages)."""
        from orchestrator.scheduler import run_scheduler

        run_scheduler(
            self.engine,
            stop,
            poll=self.settings.scheduler_poll_seconds,
            stale_after=self.settings.redispatch_after_seconds,
        )

    def start_embedded(self) -> None:
        """Start the in-process workers and scheduler (embedded mode only)."""
        if not self.settings.embedded:
            raise OrchestratorError("start_embedded() needs ORCHESTRATOR_BROKER_URL=embedded://")
        self.engine  # noqa: B018 - builds the publisher, which is the embedded broker
        assert self._embedded is not None
        self._embedded.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Embedded mode: wait until every message published so far is handled."""
        return self._embedded.wait_idle(timeout) if self._embedded else True

    def close(self) -> None:
        """Stop embedded workers and release connections."""
        if self._embedded is not None:
            self._embedded.stop()
        if self._engine is not None:
            self._engine.cache.clear()
            self._engine.outbox.close()
        if self._closed_runs is not None:
            self._closed_runs.close()
            self._closed_runs = None
        if self._db is not None:
            self._db.dispose()

    # -- used by the broker-only start path --------------------------------------
    def start_from_message(self, workflow_type: str, workflow_id: str, payload: Any) -> None:
        """Start a run asked for over the broker; a repeat with the same id is a no-op."""
        defn = self.registry.workflow(workflow_type)
        value = validate_input(payload, defn.input_type) if defn.takes_input else None
        data = (
            to_payload(value, defn.input_type, limit=self.settings.max_payload_bytes)
            if defn.takes_input
            else None
        )
        engine = self.engine
        with engine.sessions() as session:
            try:
                engine.start(
                    session,
                    defn.name,
                    data,
                    workflow_id=workflow_id,
                    id_reuse_policy=IdReusePolicy.REJECT_DUPLICATE,
                    id_conflict_policy=IdConflictPolicy.USE_EXISTING,
                )
            except WorkflowAlreadyStartedError:
                # A redelivered request for a run that has already closed.
                log.info("start request for %s already served", workflow_id)
                return
            session.commit()
