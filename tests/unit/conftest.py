"""Embedded-mode fixtures: SQLite in a temporary directory and the in-process broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Orchestrator, Settings
from orchestrator.schema import metadata

OrchestratorFactory = Callable[..., Orchestrator]


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    from sample_workflows import CALLS

    CALLS.seen.clear()


@pytest.fixture
def make_orchestrator(tmp_path: Path) -> Iterator[OrchestratorFactory]:
    """Build embedded orchestrators on one fresh SQLite database; all closed at teardown."""
    built: list[Orchestrator] = []
    url = f"sqlite:///{tmp_path}/engine.db"

    def make(workflows: list[type[Any]], activities: list[Any], **settings: Any) -> Orchestrator:
        orchestrator = Orchestrator(
            workflows=workflows,
            activities=activities,
            settings=Settings(
                database_url=url,
                broker_url="embedded://",
                scheduler_poll_seconds=0.05,
                **settings,
            ),
        )
        metadata.create_all(orchestrator.db)
        built.append(orchestrator)
        return orchestrator

    yield make
    for orchestrator in built:
        orchestrator.close()
