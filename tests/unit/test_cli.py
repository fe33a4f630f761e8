"""The command line: readable and JSON output, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main

pytestmark = pytest.mark.timeout(60)
APP = "sample_workflows:CLI_APP"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("ORCHESTRATOR_DATABASE_URL", url)
    monkeypatch.setenv("ORCHESTRATOR_BROKER_URL", "embedded://")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["db", "upgrade"]) == 0
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--app", APP, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_db_upgrade_reports_the_revision(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["--json", "db", "current"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["up_to_date"] is True and data["revision"] == data["head"]


def test_start_show_history_in_text_and_json(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "start", "Pipeline", "--input", '[{"name": "cli"}]', "--id", "cli-1", "--wait", "10"
    )
    assert code == 0
    assert "COMPLETED" in out and "cli-1" in out
    code, out, _ = run(capsys, "--json", "show", "cli-1")
    assert code == 0
    shown = json.loads(out)
    assert shown["status"] == "COMPLETED" and shown["result"] == ["cli:done"]
    code, out, _ = run(capsys, "history", "cli-1")
    assert code == 0
    assert "ActivityScheduled" in out and "step" in out
    code, out, _ = run(capsys, "--json", "history", "cli-1")
    events = json.loads(out)["events"]
    assert events[0]["type"] == "WorkflowStarted"
    assert events[-1]["type"] == "WorkflowCompleted"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["start", "NoSuchType", "--input", "{}"], "unknown workflow type 'NoSuchType'"),
        (["start", "Pipeline", "--input", "{not json"], "--input is not valid JSON"),
        (["start", "Pipeline", "--input", '[{"name": 5}]'], "Pipeline"),
        (["show", "missing-id"], "no run of workflow 'missing-id'"),
        (["cancel", "missing-id"], "no run of workflow 'missing-id'"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    env: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in err


def test_cancel_of_a_finished_run_is_an_error(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "start", "Pipeline", "--input", "[]", "--id", "done", "--wait", "10")
    code, _, err = run(capsys, "cancel", "done")
    assert code == 2 and "already COMPLETED" in err


def test_bad_flags_exit_2_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "start"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_unknown_app_is_a_clear_error(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--app", "no_such_module:app", "show", "x"])
    err: Any = capsys.readouterr().err
    assert code == 2 and "cannot import application module 'no_such_module'" in err


def test_readme_lists_every_setting_with_its_default() -> None:
    from events.config import EventSettings
    from orchestrator.settings import Settings

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    fields = {**Settings.model_fields, **EventSettings.model_fields}
    for name, field in fields.items():
        variable = f"`ORCHESTRATOR_{name.upper()}`"
        assert variable in readme or f"`ORCHESTRATOR_{name.upper()}` /" in readme, variable
        row = next(line for line in readme.splitlines() if variable in line)
        default = field.default
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, float) and default.is_integer():
            shown = str(int(default))
        else:
            shown = str(default)
        if default is not None:
            assert shown in row, (variable, shown, row)


def test_json_may_follow_the_command(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "start", "Pipeline", "--input", "[]", "--id", "j1", "--wait", "10")
    code, out, _ = run(capsys, "show", "j1", "--json")
    assert code == 0 and json.loads(out)["status"] == "COMPLETED"


def test_an_unmigrated_database_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_DATABASE_URL", f"sqlite:///{tmp_path}/empty.db")
    assert main(["ls"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: database ") and "orchestrator db upgrade" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
