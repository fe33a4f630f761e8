"""The "celery chain" baseline: three no-op tasks chained, not durable.

A plain Celery app as a team would write it without the engine: the ``rpc://``
result backend (results travel back over the broker), Celery's defaults
otherwise (early acks, no publisher confirms, no task events). Its queue name
comes from ``BENCH_CELERY_QUEUE`` so that a benchmark never shares it.

Workers load it with ``celery -A bench.celery_chain worker``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain
from celery.result import AsyncResult

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench.celery-chain")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")

app = Celery("bench-chain", broker=BROKER_URL, backend="rpc://", set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop_one", shared=False)  # type: ignore[untyped-decorator]
def noop_one(_previous: Any = None) -> None:
    """Does nothing."""


@app.task(name="bench.noop_two", shared=False)  # type: ignore[untyped-decorator]
def noop_two(_previous: Any = None) -> None:
    """Does nothing."""


@app.task(name="bench.noop_three", shared=False)  # type: ignore[untyped-decorator]
def noop_three(_previous: Any = None) -> None:
    """Does nothing."""


def start_chain() -> AsyncResult:
    """Send one chain of the three tasks; its result is the last task's."""
    result: AsyncResult = chain(noop_one.s(), noop_two.s(), noop_three.s()).apply_async()
    return result
