"""The worker consumer's prefetch count: one message per pool process, plus the spares.

The broker's side (what a busy worker is handed) is tested with a real worker
in ``tests/integration/test_worker_prefetch.py``; here, the counts Celery keeps
across a pool that grows (autoscale) and a reconnect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery

from orchestrator import Orchestrator, Settings
from orchestrator.celery_app import WorkerConsumer, create_celery

AppFactory = Callable[..., Celery]


@dataclass
class Pool:
    num_processes: int
    is_green: bool = False


@dataclass
class QoS:
    """Celery's QoS as far as a pool change touches it."""

    value: int
    changes: list[int] = field(default_factory=list)

    def increment_eventually(self, n: int = 1) -> None:
        self.changes.append(n)

    def decrement_eventually(self, n: int = 1) -> None:
        self.changes.append(-n)


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[AppFactory]:
    built: list[Orchestrator] = []

    def make(**settings: int) -> Celery:
        orchestrator = Orchestrator(
            settings=Settings(
                database_url=f"sqlite:///{tmp_path}/x.db", broker_url="embedded://", **settings
            )
        )
        built.append(orchestrator)
        return create_celery(orchestrator)

    yield make
    for orchestrator in built:
        orchestrator.close()


def consumer(app: Celery, processes: int, multiplier: int = 1) -> WorkerConsumer:
    # What Celery's worker passes: one message per process, times the multiplier.
    return WorkerConsumer(
        lambda request: None,
        app=app,
        pool=Pool(processes),
        initial_prefetch_count=processes * multiplier,
        prefetch_multiplier=multiplier,
        controller=SimpleNamespace(use_eventloop=False),
    )


def test_a_worker_holds_one_spare_message_by_default(make_app: AppFactory) -> None:
    made = consumer(make_app(), processes=2)
    assert made.initial_prefetch_count == 3
    assert made.max_prefetch_count == 3


@pytest.mark.parametrize(("spare", "multiplier", "expected"), [(0, 1, 4), (2, 1, 6), (1, 3, 13)])
def test_the_spares_come_on_top_of_celery_s_count(
    make_app: AppFactory, spare: int, multiplier: int, expected: int
) -> None:
    made = consumer(make_app(worker_spare_messages=spare), processes=4, multiplier=multiplier)
    assert made.initial_prefetch_count == expected
    # What Celery restores after a reconnect that reduced the count.
    assert made.max_prefetch_count == expected


def test_a_pool_that_grows_or_shrinks_keeps_its_spares(make_app: AppFactory) -> None:
    made = consumer(make_app(worker_spare_messages=2), processes=2)
    made.qos = QoS(made.initial_prefetch_count)

    made.pool.num_processes = 5
    made._update_prefetch_count(3)
    assert made.initial_prefetch_count == 7
    made.pool.num_processes = 4
    made._update_prefetch_count(-1)
    assert made.initial_prefetch_count == 6
    # The broker's count moves by the processes added or taken away.
    assert made.qos.changes == [3, -1]


def test_a_negative_number_of_spares_is_refused() -> None:
    with pytest.raises(ValueError, match="worker_spare_messages"):
        Settings(worker_spare_messages=-1)
