"""Prometheus metrics (embedded): counts read from the tables, durations observed in-process.

Also Flower's command line, which needs no services to be checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sample_workflows import ALL_ACTIVITIES, ALL_WORKFLOWS, Job, Pipeline, step, wait_for
from sqlalchemy import text

import activities as activity
from activities import ApplicationError, RetryPolicy
from orchestrator import Orchestrator, Settings, WorkflowFailedError, metrics, workflow
from orchestrator.db import utcnow
from orchestrator.errors import ConfigurationError
from orchestrator.flower import (
    BASIC_AUTH_ENV,
    broker_api_url,
    flower_argv,
    parse_basic_auth,
    run_flower,
    task_kwargsrepr,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ------------------------------------------------------------------------- helpers
def parse(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def durations(orchestrator: Orchestrator) -> Samples:
    """This process's histograms only (no database reads)."""
    return scrape(metrics.build_registry(orchestrator, system=False))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return (value(after, name, **labels) or 0.0) - (value(before, name, **labels) or 0.0)


# A compensation that cannot be done: it runs out of retries and is dead-lettered.
@activity.defn(
    name="metrics_broken_undo",
    retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=10), maximum_attempts=2),
)
def broken_undo(job: Job) -> None:
    raise ApplicationError(f"cannot undo {job.name}", type="UndoFailed")


@workflow.defn(name="MetricsBlockedSaga")
class BlockedSaga:
    @workflow.run
    async def run(self, job: Job) -> None:
        async with workflow.Saga() as saga:
            saga.add_compensation(broken_undo, job)
            await workflow.execute_activity(step, job)


@pytest.fixture
def orchestrator(make_orchestrator: Any) -> Orchestrator:
    built: Orchestrator = make_orchestrator(
        [*ALL_WORKFLOWS, BlockedSaga], [*ALL_ACTIVITIES, broken_undo]
    )
    return built


def run_three_pipelines(orchestrator: Orchestrator) -> None:
    """Completed (2 steps), compensated (3rd step fails for good), completed after 2 retries."""
    client = orchestrator.client()
    done = client.start_workflow(Pipeline, [Job(name="a"), Job(name="b")], workflow_id="m-ok")
    undone = client.start_workflow(
        Pipeline,
        [Job(name="a"), Job(name="b"), Job(name="c", fail_times=9, non_retryable=True)],
        workflow_id="m-compensated",
    )
    flaky = client.start_workflow(Pipeline, [Job(name="f", fail_times=2)], workflow_id="m-flaky")
    assert done.result(timeout=10) == ["a:done", "b:done"]
    with pytest.raises(WorkflowFailedError):
        undone.result(timeout=10)
    assert flaky.result(timeout=10) == ["f:done"]
    assert orchestrator.wait_idle(5)


# ----------------------------------------------------------------- system metrics
def test_counts_of_runs_activities_and_compensations_come_from_the_tables(
    orchestrator: Orchestrator,
) -> None:
    run_three_pipelines(orchestrator)
    samples = scrape(metrics.build_registry(orchestrator))

    assert value(samples, "orchestrator_metrics_source_up", source="database") == 1
    # Embedded: no broker to ask for queue depths.
    assert value(samples, "orchestrator_metrics_source_up", source="broker") is None

    runs = "orchestrator_workflow_runs"
    assert value(samples, f"{runs}_started_total", workflow_type="Pipeline") == 3
    assert value(samples, f"{runs}_closed_total", workflow_type="Pipeline", status="COMPLETED") == 2
    closed = value(samples, f"{runs}_closed_total", workflow_type="Pipeline", status="COMPENSATED")
    assert closed == 1
    # Known types and statuses are reported at zero, so that increase() works from the start.
    assert value(samples, f"{runs}_closed_total", workflow_type="Pipeline", status="FAILED") == 0
    assert value(samples, f"{runs}_started_total", workflow_type="FanOut") == 0
    assert value(samples, f"{runs}_open", workflow_type="Pipeline", status="RUNNING") == 0
    assert value(samples, f"{runs}_task_failing", workflow_type="Pipeline") == 0
    assert value(samples, f"{runs}_behind", workflow_type="Pipeline") == 0

    # step: a, b | a, b, c (fails at once) | f (fails twice, then completes).
    assert value(samples, "orchestrator_activities_scheduled_total", activity_type="step") == 6
    assert value(samples, "orchestrator_activity_executions_total", activity_type="step") == 8
    assert value(samples, "orchestrator_activity_failures_total", activity_type="step") == 3
    assert value(samples, "orchestrator_activity_retries_total", activity_type="step") == 2
    closed_steps = {
        status: value(
            samples, "orchestrator_activities_closed_total", activity_type="step", status=status
        )
        for status in ("COMPLETED", "FAILED")
    }
    assert closed_steps == {"COMPLETED": 5, "FAILED": 1}
    # The compensated run undid c, b and a.
    assert value(samples, "orchestrator_compensations_total", activity_type="undo") == 3
    assert value(samples, "orchestrator_compensations_total", activity_type="step") == 0
    assert value(samples, "orchestrator_activity_executions_total", activity_type="undo") == 3
    assert value(samples, "orchestrator_compensation_failures_total", activity_type="undo") == 0
    for status in ("SCHEDULED", "STARTED", "BACKOFF"):
        assert (
            value(samples, "orchestrator_activities_open", activity_type="step", status=status) == 0
        )

    assert value(samples, "orchestrator_timers_pending") == 0
    assert value(samples, "orchestrator_timers_overdue_seconds") == 0
    assert value(samples, "orchestrator_outbox_backlog_messages", kind="task") is not None
    assert value(samples, "orchestrator_outbox_oldest_message_age_seconds", kind="task") is not None


def test_a_compensation_that_runs_out_of_retries_is_a_failure_and_an_open_dead_letter(
    orchestrator: Orchestrator,
) -> None:
    job = Job(name="boom", fail_times=9, non_retryable=True)
    orchestrator.client().start_workflow(BlockedSaga, job, workflow_id="m-blocked")
    registry = metrics.build_registry(orchestrator)

    def dead_lettered() -> Samples | None:
        samples = scrape(registry)
        found = value(
            samples,
            "orchestrator_dead_letters_open",
            kind="compensation",
            activity_type="metrics_broken_undo",
        )
        return samples if found == 1 else None

    wait_for(lambda: dead_lettered() is not None, timeout=10)
    samples = dead_lettered()
    assert samples is not None
    failures = value(
        samples, "orchestrator_compensation_failures_total", activity_type="metrics_broken_undo"
    )
    assert failures == 1
    assert (
        value(
            samples,
            "orchestrator_activity_failures_total",
            activity_type="metrics_broken_undo",
        )
        == 2
    )
    assert (
        value(
            samples,
            "orchestrator_activities_open",
            activity_type="metrics_broken_undo",
            status="DEAD_LETTERED",
        )
        == 1
    )
    blocked = value(
        samples,
        "orchestrator_workflow_runs_open",
        workflow_type="MetricsBlockedSaga",
        status="COMPENSATION_BLOCKED",
    )
    assert blocked == 1


def test_an_unreachable_database_is_reported_not_raised(tmp_path: Path) -> None:
    unreachable = Orchestrator(
        settings=Settings(
            database_url=f"sqlite:///{tmp_path}/missing/dir/x.db", broker_url="embedded://"
        )
    )
    try:
        samples = scrape(metrics.build_registry(unreachable))
    finally:
        unreachable.close()
    assert value(samples, "orchestrator_metrics_source_up", source="database") == 0
    assert value(samples, "orchestrator_workflow_runs_started_total", workflow_type="x") is None


# ---------------------------------------------------------------------- durations
def test_activity_attempts_and_runs_are_timed(orchestrator: Orchestrator) -> None:
    before = durations(orchestrator)
    run_three_pipelines(orchestrator)
    after = durations(orchestrator)
    attempts = "orchestrator_activity_duration_seconds_count"
    assert delta(before, after, attempts, activity_type="step", outcome="completed") == 5
    assert delta(before, after, attempts, activity_type="step", outcome="failed") == 3
    assert delta(before, after, attempts, activity_type="undo", outcome="completed") == 3
    runs = "orchestrator_workflow_run_duration_seconds_count"
    assert delta(before, after, runs, workflow_type="Pipeline", status="COMPLETED") == 2
    assert delta(before, after, runs, workflow_type="Pipeline", status="COMPENSATED") == 1
    assert (
        delta(
            before,
            after,
            "orchestrator_workflow_run_duration_seconds_bucket",
            workflow_type="Pipeline",
            status="COMPLETED",
            le="+Inf",
        )
        == 2
    )


def test_a_run_duration_counts_only_once_its_transaction_commits(
    orchestrator: Orchestrator,
) -> None:
    handle = orchestrator.client().start_workflow(Pipeline, [Job(name="x")], workflow_id="m-tx")
    handle.result(timeout=10)
    workflow_type = f"Tx{uuid.uuid4().hex[:8]}"
    count = "orchestrator_workflow_run_duration_seconds_count"
    started = handle.describe().created_at
    with orchestrator.engine.sessions() as session:
        session.execute(text("SELECT 1"))
        metrics.run_closed(session, workflow_type, "COMPLETED", started, utcnow())
        session.rollback()  # rolled back: nothing to record
        session.commit()
        assert value(durations(orchestrator), count, workflow_type=workflow_type) is None
        session.execute(text("SELECT 1"))
        metrics.run_closed(session, workflow_type, "COMPLETED", started, utcnow())
        assert value(durations(orchestrator), count, workflow_type=workflow_type) is None
        session.commit()
        metrics.run_closed(session, workflow_type, "COMPLETED", started, utcnow())
    # Closed without a commit: the last one is dropped.
    found = value(durations(orchestrator), count, workflow_type=workflow_type, status="COMPLETED")
    assert found == 1


def test_forked_children_durations_are_served_by_the_parent(tmp_path: Path) -> None:
    """Prefork: children write their histograms to files the parent's endpoint merges."""
    script = textwrap.dedent(
        """
        import os, sys, urllib.request
        from orchestrator import Orchestrator, Settings, metrics

        orchestrator = Orchestrator(
            settings=Settings(database_url=sys.argv[1], broker_url="embedded://")
        )
        server = metrics.start_metrics_server(
            orchestrator, 0, addr="127.0.0.1", multiprocess=True, system=False
        )
        print("DIR", os.environ[metrics.MULTIPROCESS_ENV])
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                metrics.record_activity("forked", metrics.ACTIVITY_COMPLETED, 0.02)
                os._exit(0)
            os.waitpid(pid, 0)
        url = f"http://127.0.0.1:{server.port}/metrics"
        print(urllib.request.urlopen(url, timeout=10).read().decode())
        server.close()
        """
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{tmp_path}/mp.db"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    samples = parse(result.stdout.split("\n", 1)[1])
    count = value(
        samples,
        "orchestrator_activity_duration_seconds_count",
        activity_type="forked",
        outcome="completed",
    )
    assert count == 2
    directory = result.stdout.split("\n", 1)[0].removeprefix("DIR ")
    assert directory and not Path(directory).exists(), "the temporary directory is removed at exit"


# ------------------------------------------------------------------- the endpoint
def test_the_http_endpoint_serves_the_counts(orchestrator: Orchestrator) -> None:
    run_three_pipelines(orchestrator)
    server = metrics.start_metrics_server(orchestrator, 0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            samples = parse(response.read().decode())
    finally:
        server.close()
    started = value(samples, "orchestrator_workflow_runs_started_total", workflow_type="Pipeline")
    assert started == 3
    assert value(samples, "process_cpu_seconds_total") is not None


def test_with_a_token_the_endpoint_answers_only_who_presents_it(
    orchestrator: Orchestrator,
) -> None:
    import urllib.error

    run_three_pipelines(orchestrator)
    server = metrics.start_metrics_server(orchestrator, 0, addr="127.0.0.1", token="s3cret")
    url = f"http://127.0.0.1:{server.port}/metrics"

    def fetch(authorization: str | None) -> tuple[int, str, dict[str, str]]:
        request = urllib.request.Request(url)
        if authorization is not None:
            request.add_header("Authorization", authorization)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)

    try:
        for wrong in (None, "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
            status, body, headers = fetch(wrong)
            assert status == 401, wrong
            assert body == "unauthorized\n" and "orchestrator_" not in body
            assert headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        status, body, _ = fetch("Bearer s3cret")
    finally:
        server.close()
    assert status == 200
    started = value(
        parse(body), "orchestrator_workflow_runs_started_total", workflow_type="Pipeline"
    )
    assert started == 3


def test_the_token_setting_is_kept_secret() -> None:
    settings = Settings(metrics_token="s3cret")
    assert settings.metrics_token is not None
    assert settings.metrics_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


def test_names_follow_prometheus_conventions_and_are_documented(
    orchestrator: Orchestrator,
) -> None:
    run_three_pipelines(orchestrator)
    families = list(
        text_string_to_metric_families(
            generate_latest(metrics.build_registry(orchestrator)).decode()
        )
    )
    assert len({f.name for f in families}) == len(families), "a metric name is declared twice"
    ours = [f for f in families if f.name.startswith("orchestrator_")]
    assert {f.name for f in families} - {f.name for f in ours} <= {
        f.name for f in families if f.name.startswith("process_")
    }
    for family in ours:
        assert re.fullmatch(r"orchestrator_[a-z_]+", family.name), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert family.documentation, family.name
    # Every name the module can produce (events and broker ones included) is documented.
    source = (ROOT / "orchestrator" / "metrics.py").read_text()
    names = set(re.findall(r'"(orchestrator_[a-z_]+)"', source))
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert len(names) > 30
    missing = sorted(name for name in names if f"`{name}" not in operations)
    assert not missing, f"not in docs/operations.md: {missing}"


# ------------------------------------------------------------------------- Flower
def amqp_orchestrator(url: str = "amqp://ops:s3cret@rabbit.internal:5672/orders") -> Orchestrator:
    return Orchestrator(settings=Settings(database_url="sqlite://", broker_url=url))


def test_broker_api_is_derived_from_the_broker_url() -> None:
    assert broker_api_url("amqp://guest:guest@127.0.0.1:5672//") == (
        "http://guest:guest@127.0.0.1:15672/api/"
    )
    assert broker_api_url("amqps://ops:p%40ss@rabbit:5671/orders") == (
        "https://ops:p%40ss@rabbit:15671/api/"
    )
    assert (
        broker_api_url("pyamqp://rabbit//;amqp://other//") == "http://guest:guest@rabbit:15672/api/"
    )
    with pytest.raises(ConfigurationError, match="--broker-api"):
        broker_api_url("redis://localhost:6379/0")


def test_basic_auth_is_required_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_basic_auth("ops:secret, viewer:other") == ["ops:secret", "viewer:other"]
    for bad in (None, "", " , "):
        with pytest.raises(ConfigurationError, match=BASIC_AUTH_ENV):
            parse_basic_auth(bad)
    for bad in ("ops", "ops:", ":secret", "ops:secret,viewer"):
        with pytest.raises(ConfigurationError, match="user:password"):
            parse_basic_auth(bad)
    monkeypatch.delenv(BASIC_AUTH_ENV, raising=False)
    orchestrator = amqp_orchestrator()
    # Refused before anything starts or connects.
    with pytest.raises(ConfigurationError, match=f"set {BASIC_AUTH_ENV}=user:password"):
        run_flower(orchestrator, port=0)


def test_flower_arguments() -> None:
    argv = flower_argv(amqp_orchestrator(), port=5601, basic_auth="ops:secret", broker_api=None)
    assert argv[0] == "flower"
    assert "--port=5601" in argv
    assert "--basic-auth=ops:secret" in argv
    assert "--broker-api=http://ops:s3cret@rabbit.internal:15672/api/" in argv
    columns = next(a for a in argv if a.startswith("--tasks-columns="))
    assert "name" in columns and "kwargs" in columns
    assert "--read-only" in argv
    given = flower_argv(
        amqp_orchestrator(),
        basic_auth="ops:secret",
        broker_api="http://u:p@mgmt:15672/api/",
        address="127.0.0.1",
    )
    assert "--broker-api=http://u:p@mgmt:15672/api/" in given and "--address=127.0.0.1" in given
    embedded = Orchestrator(settings=Settings(database_url="sqlite://"))
    with pytest.raises(ConfigurationError, match="ORCHESTRATOR_BROKER_URL"):
        flower_argv(embedded, basic_auth="ops:secret")


def test_task_events_show_the_workflow_id() -> None:
    shown = task_kwargsrepr(
        {"run_id": "r-1", "activity_id": "3", "attempt": 1}, {"workflow_id": "order-1001"}
    )
    assert (
        shown == "{'workflow_id': 'order-1001', 'run_id': 'r-1', 'activity_id': '3', 'attempt': 1}"
    )
    assert task_kwargsrepr({"run_id": "r-1"}, {}) is None
    # Nested or long values get Celery's bounded rendering.
    nested = task_kwargsrepr({"input": {"items": list(range(5))}}, {"workflow_id": "w"})
    assert nested == "{'workflow_id': 'w', 'input': {'items': [0, 1, 2, 3, 4]}}"
    long = task_kwargsrepr({"note": "x" * 5000}, {"workflow_id": "w"})
    assert long is not None and len(long) < 1100 and long.startswith("{'workflow_id': 'w'")
