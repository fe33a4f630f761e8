"""Changing workflow code under runs in flight: patches, and the replayer that checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sample_patterns import (
    PATTERN_ACTIVITIES,
    VersionedUnpatched,
    VersionedV1,
    VersionedV2,
    VersionedV3,
)

from orchestrator.cli import main
from orchestrator.replayer import Replayer
from orchestrator.testing import WorkflowEnvironment

pytestmark = pytest.mark.timeout(60)


def record(workflow: type[Any], workflow_id: str) -> dict[str, Any]:
    with WorkflowEnvironment(workflows=[workflow], activities=PATTERN_ACTIVITIES) as env:
        handle = env.client.start_workflow(workflow, workflow_id=workflow_id)
        handle.result(timeout=10)
        return {
            "workflow_id": handle.workflow_id,
            "run_id": handle.run_id,
            "events": [event.to_json() for event in handle.history()],
        }


def replay(workflow: type[Any], history: dict[str, Any]) -> Any:
    return Replayer(workflows=[workflow]).replay(history)


def test_a_patch_keeps_old_histories_replayable_and_new_runs_take_the_new_branch() -> None:
    old = record(VersionedV1, "old")
    assert replay(VersionedV2, old).ok
    new = record(VersionedV2, "new")
    types = [e["type"] for e in new["events"]]
    assert "MarkerRecorded" in types
    scheduled = [
        e["attributes"]["activity_type"] for e in new["events"] if e["type"] == "ActivityScheduled"
    ]
    assert scheduled == ["notify", "compensate", "notify"]
    assert replay(VersionedV2, new).ok


def test_the_same_change_without_a_patch_is_reported() -> None:
    old = record(VersionedV1, "old")
    result = replay(VersionedUnpatched, old)
    assert not result.ok
    assert result.error is not None
    assert "history event 4" in result.error
    assert "ActivityScheduled(activity notify, id 2)" in result.error
    assert "ActivityScheduled(activity compensate, id 2)" in result.error


def test_a_deprecated_patch_accepts_histories_with_its_marker() -> None:
    new = record(VersionedV2, "new")
    assert replay(VersionedV3, new).ok
    # Runs from before the patch must have drained before it is deprecated.
    assert not replay(VersionedV3, record(VersionedV1, "old")).ok


def test_replay_command_reports_each_file(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(record(VersionedV1, "good")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record(VersionedV2, "bad")))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = main(["--app", "sample_patterns:V1_APP", "replay", str(good), str(bad)])
    out = capsys.readouterr().out
    assert code == 1
    assert "ok" in out and "NONDETERMINISM" in out
    code = main(["--json", "--app", "sample_patterns:V1_APP", "replay", str(good)])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data[0]["ok"] is True


def test_replay_of_a_file_that_is_not_a_history_is_an_error(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text('{"nothing": 1}')
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["--app", "sample_patterns:V1_APP", "replay", str(junk)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
