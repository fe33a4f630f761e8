"""The outbox's task publisher against a real RabbitMQ: Celery's messages, one confirm round.

Each test publishes to queues of its own (deleted afterwards) through a Celery app
configured the way the engine configures its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import harness
import pytest
from celery import Celery, signals
from kombu.entity import Queue

from orchestrator.task_publisher import CONFIRM_TIMEOUT, CeleryPublisher
from outbox import OutboxMessage, PublishError

pytestmark = pytest.mark.integration

DEAD_LETTER_EXCHANGE = "orchestrator.dead-letter"


@pytest.fixture
def queues() -> Iterator[dict[str, Queue]]:
    suffix = uuid.uuid4().hex[:8]
    made = {
        "plain": Queue(f"it.publisher.{suffix}", durable=True),
        # Refuses what does not fit: the broker nacks those publishes.
        "tiny": Queue(
            f"it.publisher.tiny.{suffix}",
            durable=True,
            queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        ),
    }
    yield made
    with harness.broker_connection() as connection:
        for queue in made.values():
            queue.bind(connection.default_channel).delete()


@pytest.fixture
def app(queues: dict[str, Queue]) -> Celery:
    app = Celery("it-publisher", broker=harness.BROKER_URL, set_as_current=False)
    app.conf.update(
        task_queues=list(queues.values()),
        task_create_missing_queues=False,
        task_send_sent_event=False,
    )
    return app


def task(queue: Queue, n: int) -> OutboxMessage:
    return OutboxMessage(
        kind="task",
        destination="demo.step",
        queue=queue.name,
        body={"run_id": f"run-{n}", "attempt": n},
        headers={"workflow_id": f"wf-{n}"},
    )


def drain(queue: Queue) -> list[Any]:
    got = []
    with harness.broker_connection() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue.name, no_ack=True)) is not None:
            got.append(message)
    return got


def test_a_batch_goes_out_whole_as_the_messages_send_task_would_send(
    app: Celery, queues: dict[str, Queue]
) -> None:
    queue = queues["plain"]
    publisher = CeleryPublisher(app, dead_letter_exchange=DEAD_LETTER_EXCHANGE)
    batch = [task(queue, n) for n in range(25)]
    publisher.publish(batch)
    ours = drain(queue)
    assert [m.headers["id"] for m in ours] == [message.id for message in batch]

    # The same message through Celery's own send_task, for comparison.
    reference = task(queue, 99)
    with app.connection_for_write() as connection:
        app.send_task(
            reference.destination,
            kwargs=reference.body,
            task_id=reference.id,
            queue=queue.name,
            headers=dict(reference.headers),
            connection=connection,
        )
    [theirs] = drain(queue)

    mine = ours[0]
    assert set(mine.headers) == set(theirs.headers)
    for key in ("lang", "task", "retries", "timelimit", "eta", "expires", "group"):
        assert mine.headers[key] == theirs.headers[key], key
    assert mine.headers["root_id"] == mine.headers["id"] == batch[0].id
    assert mine.headers["workflow_id"] == "wf-0"
    assert "'workflow_id': 'wf-0'" in mine.headers["kwargsrepr"]
    assert mine.properties["correlation_id"] == batch[0].id
    assert mine.properties["delivery_mode"] == theirs.properties["delivery_mode"] == 2
    assert mine.properties["content_type"] == theirs.properties["content_type"]
    args, kwargs, embed = json.loads(mine.body)
    their_args, their_kwargs, their_embed = json.loads(theirs.body)
    assert (args, kwargs) == ([], batch[0].body)
    assert (their_args, their_kwargs) == ([], reference.body)
    assert embed == their_embed


def test_a_refused_message_fails_the_batch_and_the_next_batch_still_goes(
    app: Celery, queues: dict[str, Queue]
) -> None:
    tiny, plain = queues["tiny"], queues["plain"]
    publisher = CeleryPublisher(app, dead_letter_exchange=DEAD_LETTER_EXCHANGE)
    with pytest.raises(PublishError, match="refused 2 message"):
        publisher.publish([task(tiny, n) for n in range(3)])
    # The outbox keeps the whole batch for the relay; the publisher starts afresh.
    publisher.publish([task(plain, 1)])
    assert len(drain(plain)) == 1
    assert len(drain(tiny)) == 1


def test_an_unknown_queue_is_a_publish_error(app: Celery) -> None:
    publisher = CeleryPublisher(app, dead_letter_exchange=DEAD_LETTER_EXCHANGE)
    stray = OutboxMessage(kind="task", destination="demo.step", queue="no-such-queue", body={})
    with pytest.raises(PublishError, match="no-such-queue"):
        publisher.publish([stray])
    with pytest.raises(PublishError, match="cannot publish event"):
        publisher.publish([OutboxMessage(kind="event", destination="demo.happened", body={})])


def test_celery_publish_hooks_see_every_message(app: Celery, queues: dict[str, Queue]) -> None:
    queue = queues["plain"]
    seen: list[str] = []

    def before(headers: dict[str, Any], **_: Any) -> None:
        seen.append(headers["id"])
        headers["traceparent"] = "00-trace"

    signals.before_task_publish.connect(before, weak=False)
    try:
        publisher = CeleryPublisher(app, dead_letter_exchange=DEAD_LETTER_EXCHANGE)
        batch = [task(queue, n) for n in range(3)]
        publisher.publish(batch)
    finally:
        signals.before_task_publish.disconnect(before)
    assert seen == [message.id for message in batch]
    got = drain(queue)
    assert [m.headers["id"] for m in got] == seen
    assert all(m.headers["traceparent"] == "00-trace" for m in got)


@pytest.mark.timeout(180)
def test_a_broker_that_blocks_publishers_fails_the_batch_in_bounded_time(
    app: Celery, queues: dict[str, Queue]
) -> None:
    # A start publishes after its commit, in its caller's request: a broker
    # alarm must cost the caller a bounded wait, not hold it for as long as
    # the alarm lasts (the run is committed; its message waits for the relay).
    queue = queues["plain"]
    before, during, after = task(queue, 1), task(queue, 2), task(queue, 3)
    publisher = CeleryPublisher(app, dead_letter_exchange=DEAD_LETTER_EXCHANGE)
    publisher.publish([before])  # the publisher's connection is up
    waited = harness.blocked_publish_seconds(lambda: publisher.publish([during]))
    assert waited < CONFIRM_TIMEOUT + 5, f"the blocked publish held its caller {waited:.1f}s"
    # Once the alarm clears, the next batch goes out on a fresh connection.
    publisher.publish([after])
    ids = [message.headers["id"] for message in drain(queue)]
    # The blocked message may still arrive (the broker reads what it was sent
    # once the alarm clears): the relay sends it again, and consumers drop
    # the duplicate.
    assert [i for i in ids if i != during.id] == [before.id, after.id]


@pytest.mark.timeout(90)
def test_a_queue_declared_after_a_blocked_publish_gives_up(
    app: Celery, queues: dict[str, Queue]
) -> None:
    # A fresh publisher declares each queue before its first message: the
    # second declaration of this batch follows a publish the broker blocked,
    # and waits for a reply that does not come while the alarm lasts.
    publisher = CeleryPublisher(app, dead_letter_exchange=DEAD_LETTER_EXCHANGE)
    batch = [task(queues["plain"], 1), task(queues["tiny"], 2)]
    waited = harness.blocked_publish_seconds(lambda: publisher.publish(batch))
    assert waited < CONFIRM_TIMEOUT + 5, f"the blocked batch held its caller {waited:.1f}s"
    after = task(queues["plain"], 3)
    publisher.publish([after])
    assert after.id in [message.headers["id"] for message in drain(queues["plain"])]
