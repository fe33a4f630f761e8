"""The Celery side: the app, its queues and its tasks (the publisher is in task_publisher).

Settings follow what durable work on RabbitMQ needs: a message is acked only after
its task ran (acks_late), requeued if the worker dies (reject on worker lost), one
prefetched for each pool process plus ``worker_spare_messages``, and every publish
waits for the broker's confirm. Tasks are named after what they run, so Flower
shows an activity by its name. Messages a worker cannot decode or accept are
rejected into a dead-letter queue instead of being dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_init
from celery.worker.consumer import Consumer
from kombu.entity import Exchange, Queue

from activities.errors import PayloadError
from orchestrator import messages
from orchestrator.errors import AttemptFailedError, InvalidWorkflowIdError, UnknownWorkflowTypeError
from orchestrator.task_events import TaskEvents, events_follower
from outbox.errors import PublishError

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator

log = logging.getLogger("orchestrator.celery")

DEAD_LETTER_QUEUE = "orchestrator.dead-letter"


# Where the app's configuration carries ``Settings.worker_spare_messages`` to its consumer.
SPARE_MESSAGES_KEY = "orchestrator_spare_messages"


class WorkerConsumer(Consumer):  # type: ignore[misc]
    """A worker's consumer: it dead-letters what it cannot decode, and holds spare messages.

    Undecodable messages are rejected into the dead-letter queue instead of acked.

    Spare messages: with late acks and one message per pool process, a process
    that finishes a task waits while its ack reaches the broker, the broker's
    next delivery comes back and this consumer hands it over. The broker may
    deliver ``worker_spare_messages`` more, so that the next task is already
    here and only the hand-over is left. A spare waits for a pool process of
    this worker to be free.
    """

    initial_prefetch_count: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.initial_prefetch_count:  # 0 is no limit at all
            self.initial_prefetch_count += self._spare

    @property
    def _spare(self) -> int:
        return int(self.app.conf.get(SPARE_MESSAGES_KEY) or 0)

    @property
    def max_prefetch_count(self) -> int:
        # Celery's own count (pool processes times the multiplier), which it
        # restores after a reconnect.
        return int(super().max_prefetch_count) + self._spare

    def _update_prefetch_count(self, index: int = 0) -> Any:
        # The pool grew or shrank (autoscale): Celery recounts without the spares.
        updated = super()._update_prefetch_count(index)
        if self.initial_prefetch_count and self.pool.num_processes:
            self.initial_prefetch_count = self.max_prefetch_count
        return updated

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        log.error("undecodable message sent to the dead-letter queue: %s", exc)
        message.reject(requeue=False)


def _queue(name: str, dead_letter_exchange: str) -> Queue:
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={"x-dead-letter-exchange": dead_letter_exchange},
    )


def dead_letter_queue(dead_letter_exchange: str) -> Queue:
    return Queue(
        DEAD_LETTER_QUEUE,
        Exchange(dead_letter_exchange, type="fanout", durable=True),
        durable=True,
    )


def queue_names(orchestrator: Orchestrator) -> list[str]:
    """The workflow queue and every activity task queue, in a stable order."""
    names = [orchestrator.settings.workflow_queue]
    for defn in orchestrator.registry.activities.values():
        if defn.task_queue not in names:
            names.append(defn.task_queue)
    return names


def create_celery(orchestrator: Orchestrator) -> Celery:
    """The Celery app of ``orchestrator``: its queues and one task per workflow/activity type."""
    settings = orchestrator.settings
    broker = "memory://" if settings.embedded else settings.broker_url
    app = Celery("orchestrator", broker=broker, set_as_current=False)
    dlx = settings.dead_letter_exchange
    app.conf.update(
        task_acks_late=True,
        # A failed attempt's task raises AttemptFailedError after recording it:
        # its message is done with, not for the dead-letter exchange.
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        **{SPARE_MESSAGES_KEY: settings.worker_spare_messages},
        broker_connection_retry_on_startup=True,
        # Off, a worker sends task events once a monitor asks (see task_events).
        worker_send_task_events=settings.task_events,
        # No task-sent events: one more publish per message on the hot path, and
        # Flower lists a task from its worker's task-received event anyway.
        task_send_sent_event=False,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=[_queue(name, dlx) for name in queue_names(orchestrator)],
        task_default_queue=settings.workflow_queue,
        task_create_missing_queues=False,
        worker_consumer="orchestrator.celery_app:WorkerConsumer",
        worker_hijack_root_logger=False,
        event_queue_exclusive=True,
        control_queue_exclusive=True,
    )

    @app.task(name=messages.WORKFLOW_TASK, shared=False)  # type: ignore[untyped-decorator]
    def workflow_task(run_id: Any = None, **extra: Any) -> None:
        if not isinstance(run_id, str) or extra:
            raise Reject(f"malformed workflow task: run_id={run_id!r} {extra}", requeue=False)
        orchestrator.engine.workflow_task(run_id)

    @app.task(name=messages.START_WORKFLOW, shared=False)  # type: ignore[untyped-decorator]
    def start_workflow(
        workflow_type: Any = None, workflow_id: Any = None, input: Any = None, **extra: Any
    ) -> None:
        if not isinstance(workflow_type, str) or not isinstance(workflow_id, str) or extra:
            raise Reject("malformed start request", requeue=False)
        try:
            orchestrator.start_from_message(workflow_type, workflow_id, input)
        except (UnknownWorkflowTypeError, PayloadError, InvalidWorkflowIdError) as exc:
            # A request no retry can fix: keep it for an operator, not in a loop.
            raise Reject(f"start request refused: {exc}", requeue=False) from exc

    @app.task(name=messages.CHILD_CLOSED, shared=False)  # type: ignore[untyped-decorator]
    def child_closed(**body: Any) -> None:
        try:
            orchestrator.engine.child_closed(**body)
        except TypeError as exc:
            raise Reject(f"malformed child outcome: {exc}", requeue=False) from exc

    @app.task(name=messages.RUN_CONTROL, shared=False)  # type: ignore[untyped-decorator]
    def run_control(run_id: Any = None, action: Any = None, reason: Any = "") -> None:
        if not isinstance(run_id, str) or action not in ("terminate", "cancel"):
            raise Reject("malformed run control message", requeue=False)
        orchestrator.engine.run_control(run_id, action, str(reason))

    for defn in orchestrator.registry.activities.values():
        _register_activity(app, orchestrator, defn.name, defn.task_queue)

    observers: list[TaskEvents] = []

    def serve_locally(sender: Any = None, **_kwargs: Any) -> None:
        # After -Q is applied and before the pool forks: the children inherit it.
        if sender is None or sender.app is not app:
            return
        celery_app: Celery = sender.app
        observer = TaskEvents(celery_app, sender.hostname, on=bool(sender.task_events))
        observers[:] = [observer]
        orchestrator.serve_queues_locally(celery_app.amqp.queues.consume_from, observer)

    worker_init.connect(serve_locally, weak=False)
    app.steps["consumer"].add(events_follower(lambda: observers[0] if observers else None))
    return app


def _register_activity(app: Celery, orchestrator: Orchestrator, name: str, queue: str) -> None:
    def run_activity(
        run_id: Any = None, activity_id: Any = None, attempt: Any = None, **extra: Any
    ) -> None:
        if (
            not isinstance(run_id, str)
            or not isinstance(activity_id, str)
            or not isinstance(attempt, int)
            or extra
        ):
            raise Reject(f"malformed activity task for {name}", requeue=False)
        failure = orchestrator.engine.activity_task(run_id, activity_id, attempt)
        if failure is not None:
            raise AttemptFailedError(failure)

    run_activity.__name__ = name.replace(".", "_")
    # An expected error: Celery records the task as failed and logs one line
    # without a traceback (the attempt's own failure is logged and recorded).
    app.task(name=name, queue=queue, shared=False, throws=(AttemptFailedError,))(run_activity)


def send_start_request(
    broker_url: str,
    workflow_type: str,
    workflow_id: str,
    payload: Any,
    *,
    queue: str = "workflows",
    dead_letter_exchange: str = "orchestrator.dead-letter",
) -> None:
    """Ask the orchestrator's workers to start a workflow, over the broker only.

    For applications that share the broker but not the database. The start is
    de-duplicated by workflow id: sending the same request twice starts one run.
    The input is validated by the worker; a request it refuses goes to the
    dead-letter queue.
    """
    app = Celery("orchestrator-client", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"confirm_publish": True},
        task_queues=[_queue(queue, dead_letter_exchange)],
        task_create_missing_queues=False,
    )
    try:
        app.send_task(
            messages.START_WORKFLOW,
            kwargs=messages.start_request(workflow_type, workflow_id, payload),
            task_id=f"start-{workflow_id}",
            queue=queue,
        )
    except Exception as exc:
        raise PublishError(f"could not send the start request: {exc}") from exc
    finally:
        app.close()
