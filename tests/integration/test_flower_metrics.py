"""Operations through real processes: the metrics endpoints and Flower, on the order saga.

One prefork worker, a scheduler and a relay serve the module, each with its
Prometheus endpoint on a free port; Flower is started by the documented command
(``orchestrator flower``, basic auth from ``FLOWER_BASIC_AUTH``) and read
through its HTTP API.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import harness
import pytest
from prometheus_client.parser import text_string_to_metric_families

from examples.order_fulfillment.models import Simulation
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import Orchestrator, WorkflowFailedError

pytestmark = pytest.mark.integration

RESULT_TIMEOUT = 60.0
FLOWER_USER = "ops"
FLOWER_PASSWORD = "it-flower-secret"
STEPS = ("reserve_inventory", "charge_payment", "create_shipment", "send_confirmation")
COMPENSATIONS = ("cancel_shipment", "refund_payment", "release_inventory")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# ------------------------------------------------------------------------- metrics
def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for_endpoint(port: int, proc: harness.Proc) -> Samples:
    def answered() -> Samples | None:
        assert proc.alive, f"{proc.name} exited:\n{proc.tail()}"
        try:
            return scrape(port)
        except OSError:
            return None

    found: Samples = harness.wait_until(answered, 60, f"{proc.name}'s metrics on port {port}")
    return found


class Processes:
    def __init__(self, procs: harness.ProcessGroup) -> None:
        self.worker_port, self.scheduler_port, self.relay_port = (free_port() for _ in range(3))
        self.scheduler = procs.scheduler(
            env={"ORCHESTRATOR_METRICS_PORT": str(self.scheduler_port)}
        )
        self.relay = procs.relay(env={"ORCHESTRATOR_METRICS_PORT": str(self.relay_port)})
        self.worker = procs.worker(
            "metrics-worker", env={"ORCHESTRATOR_METRICS_PORT": str(self.worker_port)}
        )


@pytest.fixture(scope="module")
def processes(module_procs: harness.ProcessGroup) -> Processes:
    started = Processes(module_procs)
    for port, proc in (
        (started.worker_port, started.worker),
        (started.scheduler_port, started.scheduler),
        (started.relay_port, started.relay),
    ):
        wait_for_endpoint(port, proc)
    return started


def run_orders(orchestrator: Orchestrator, prefix: str) -> tuple[str, str]:
    """One order fulfilled after a retried charge, one compensated (unshippable); their ids."""
    client = orchestrator.client()
    fulfilled = harness.make_order(harness.unique(f"{prefix}-ok"))
    fulfilled = fulfilled.model_copy(
        update={"simulate": Simulation(fail_first_attempts={"charge_payment": 1})}
    )
    unshippable = harness.make_order(harness.unique(f"{prefix}-xx"), country="XX")
    ok = client.start_workflow(OrderSaga, fulfilled, workflow_id=f"order-{fulfilled.order_id}")
    xx = client.start_workflow(OrderSaga, unshippable, workflow_id=f"order-{unshippable.order_id}")
    assert ok.result(timeout=RESULT_TIMEOUT).order_id == fulfilled.order_id
    with pytest.raises(WorkflowFailedError) as caught:
        xx.result(timeout=RESULT_TIMEOUT)
    assert caught.value.status == "COMPENSATED"
    return ok.workflow_id, xx.workflow_id


# Counters of the system, with the change the two orders make to each.
EXPECTED_COUNTS: list[tuple[str, dict[str, str], float]] = [
    ("orchestrator_workflow_runs_started_total", {"workflow_type": "OrderSaga"}, 2),
    (
        "orchestrator_workflow_runs_closed_total",
        {"workflow_type": "OrderSaga", "status": "COMPLETED"},
        1,
    ),
    (
        "orchestrator_workflow_runs_closed_total",
        {"workflow_type": "OrderSaga", "status": "COMPENSATED"},
        1,
    ),
    ("orchestrator_activity_executions_total", {"activity_type": "reserve_inventory"}, 2),
    # The fulfilled order's charge fails once and is retried; the other's succeeds.
    ("orchestrator_activity_executions_total", {"activity_type": "charge_payment"}, 3),
    ("orchestrator_activity_failures_total", {"activity_type": "charge_payment"}, 1),
    ("orchestrator_activity_retries_total", {"activity_type": "charge_payment"}, 1),
    # Unshippable: fails for good at once.
    ("orchestrator_activity_executions_total", {"activity_type": "create_shipment"}, 2),
    ("orchestrator_activity_failures_total", {"activity_type": "create_shipment"}, 1),
    ("orchestrator_activity_retries_total", {"activity_type": "create_shipment"}, 0),
    ("orchestrator_activity_executions_total", {"activity_type": "send_confirmation"}, 1),
    ("orchestrator_compensations_total", {"activity_type": "cancel_shipment"}, 1),
    ("orchestrator_compensations_total", {"activity_type": "refund_payment"}, 1),
    ("orchestrator_compensations_total", {"activity_type": "release_inventory"}, 1),
    ("orchestrator_compensation_failures_total", {"activity_type": "refund_payment"}, 0),
]

# Durations the worker's prefork children observed, with how many each order adds.
EXPECTED_DURATIONS: list[tuple[str, dict[str, str], float]] = [
    (
        "orchestrator_activity_duration_seconds_count",
        {"activity_type": "charge_payment", "outcome": "completed"},
        2,
    ),
    (
        "orchestrator_activity_duration_seconds_count",
        {"activity_type": "charge_payment", "outcome": "failed"},
        1,
    ),
    (
        "orchestrator_activity_duration_seconds_count",
        {"activity_type": "refund_payment", "outcome": "completed"},
        1,
    ),
    (
        "orchestrator_workflow_run_duration_seconds_count",
        {"workflow_type": "OrderSaga", "status": "COMPLETED"},
        1,
    ),
    (
        "orchestrator_workflow_run_duration_seconds_count",
        {"workflow_type": "OrderSaga", "status": "COMPENSATED"},
        1,
    ),
]


def in_flight(samples: Samples) -> dict[str, float]:
    """What is still moving in the system (the counts are system-wide)."""
    moving: dict[str, float] = defaultdict(float)
    for (name, labels), found in samples.items():
        status = dict(labels).get("status")
        if name == "orchestrator_activities_open" and status in ("STARTED", "BACKOFF"):
            moving[f"activities {status}"] += found
        elif name == "orchestrator_workflow_runs_behind":
            moving["runs behind"] += found
        elif name == "orchestrator_outbox_backlog_messages" and dict(labels).get("kind") == "task":
            moving["outbox backlog"] += found
    return {what: count for what, count in moving.items() if count}


def wait_until_idle(port: int) -> Samples:
    """A baseline taken while nothing of earlier tests is still finishing.

    Counts are read from the tables, so a run of another module that a
    redelivery finishes now would count too: wait until nothing is in flight
    and the counts have stopped changing.
    """
    names = {name for name, _, _ in EXPECTED_COUNTS}
    previous: dict[Any, float] = {}

    def idle() -> Samples | None:
        nonlocal previous
        samples = scrape(port)
        counts = {key: found for key, found in samples.items() if key[0] in names}
        steady = counts == previous and not in_flight(samples)
        previous = counts
        return samples if steady else None

    try:
        found: Samples = harness.wait_until(idle, 90, "an idle system", interval=2.0)
    except AssertionError:
        raise AssertionError(f"still in flight: {in_flight(scrape(port))}") from None
    return found


def test_metrics_endpoint_reports_the_counts_of_the_example(
    processes: Processes, orchestrator: Orchestrator
) -> None:
    port = processes.worker_port
    before = wait_until_idle(port)
    run_orders(orchestrator, "metrics")
    expected = EXPECTED_COUNTS + EXPECTED_DURATIONS

    def changes(samples: Samples) -> list[tuple[str, dict[str, str], float, float]]:
        return [
            (name, labels, want, value(samples, name, **labels) - value(before, name, **labels))
            for name, labels, want in expected
        ]

    def settled() -> Samples | None:
        samples = scrape(port)
        return samples if all(got == want for _, _, want, got in changes(samples)) else None

    try:
        after = harness.wait_until(settled, 30, "the metrics to count both orders", interval=0.5)
    except AssertionError:
        wrong = [c for c in changes(scrape(port)) if c[2] != c[3]]
        raise AssertionError(f"metrics off (name, labels, expected, got): {wrong}") from None

    assert value(after, "orchestrator_metrics_source_up", source="database") == 1
    assert value(after, "orchestrator_metrics_source_up", source="broker") == 1
    for queue in (harness.WORKFLOW_QUEUE, harness.ACTIVITY_QUEUE):
        assert ("orchestrator_queue_messages", frozenset({("queue", queue)})) in after
        assert value(after, "orchestrator_queue_consumers", queue=queue) >= 1
    assert (
        "orchestrator_queue_messages",
        frozenset({("queue", harness.DEAD_LETTER_QUEUE)}),
    ) in after
    assert value(after, "orchestrator_outbox_backlog_messages", kind="task") >= 0
    assert (
        "orchestrator_outbox_oldest_message_age_seconds",
        frozenset({("kind", "task")}),
    ) in after
    assert ("orchestrator_timers_overdue_seconds", frozenset()) in after


def test_relay_and_scheduler_serve_the_same_system_counts(
    processes: Processes, orchestrator: Orchestrator
) -> None:
    run_orders(orchestrator, "same")
    name, labels = "orchestrator_workflow_runs_started_total", {"workflow_type": "OrderSaga"}

    def agreed() -> bool:
        seen = {
            value(scrape(port), name, **labels)
            for port in (processes.worker_port, processes.scheduler_port, processes.relay_port)
        }
        return len(seen) == 1

    harness.wait_until(agreed, 15, "the three endpoints to agree", interval=0.3)
    for port in (processes.scheduler_port, processes.relay_port):
        samples = scrape(port)
        assert value(samples, "orchestrator_metrics_source_up", source="database") == 1
        # Durations are the worker's: the relay and the scheduler run no activity.
        assert not any(key[0].startswith("orchestrator_activity_duration") for key in samples)


def test_subscribers_serve_their_groups(module_procs: harness.ProcessGroup) -> None:
    port = free_port()
    proc = module_procs.start(
        "subscribers",
        "subscribers",
        "run",
        env={
            "ORCHESTRATOR_METRICS_PORT": str(port),
            "ORCHESTRATOR_SUBSCRIBER_MODULES": "examples.order_fulfillment.subscribers",
        },
    )

    def consuming() -> Samples | None:
        samples = wait_for_endpoint(port, proc)
        groups = ("notifications", "analytics")
        if all(value(samples, "orchestrator_event_group_consumers", group=g) for g in groups):
            return samples
        return None

    samples: Samples = harness.wait_until(consuming, 60, "the subscriber groups to consume")
    assert value(samples, "orchestrator_metrics_source_up", source="events") == 1
    assert ("orchestrator_events_handled_total", frozenset({("group", "notifications")})) in samples
    proc.terminate()


def test_a_relay_with_a_metrics_token_answers_only_who_presents_it(
    module_procs: harness.ProcessGroup,
) -> None:
    port = free_port()
    proc = module_procs.relay(
        "token-relay",
        env={"ORCHESTRATOR_METRICS_PORT": str(port), "ORCHESTRATOR_METRICS_TOKEN": "s3cret"},
    )
    url = f"http://127.0.0.1:{port}/metrics"

    def refused() -> int | None:
        try:
            urllib.request.urlopen(url, timeout=5)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None  # not listening yet
        return 200

    assert harness.wait_until(refused, 30, "the relay's endpoint") == 401
    request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 200
        assert "orchestrator_metrics_source_up" in response.read().decode()
    proc.terminate()


# -------------------------------------------------------------------------- Flower
def flower_get(port: int, path: str, *, auth: tuple[str, str] | None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            body = response.read().decode()
            return response.status, json.loads(body) if body.startswith(("{", "[")) else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture(scope="module")
def flower(processes: Processes, module_procs: harness.ProcessGroup) -> Iterator[int]:
    port = free_port()
    proc = module_procs.start(
        "flower",
        "flower",
        "--port",
        str(port),
        "--address",
        "127.0.0.1",
        env={"FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"},
    )
    auth = (FLOWER_USER, FLOWER_PASSWORD)

    def up() -> bool:
        assert proc.alive, f"flower exited:\n{proc.tail()}"
        try:
            return flower_get(port, "/healthcheck", auth=None)[0] == 200
        except OSError:
            return False

    harness.wait_until(up, 60, "Flower to answer", interval=0.3)

    def sees_the_worker() -> bool:
        status, workers = flower_get(port, "/api/workers?refresh=1", auth=auth)
        return status == 200 and any(name.startswith("metrics-worker-") for name in (workers or {}))

    harness.wait_until(sees_the_worker, 60, "Flower to see the worker", interval=1.0)
    # Workers send task events once a monitor asks: Flower does every five seconds.
    processes.worker.wait_for_log("task events on", timeout=30)
    yield port


def test_flower_requires_basic_auth(flower: int) -> None:
    for path in ("/api/tasks", "/api/workers", "/tasks"):
        assert flower_get(flower, path, auth=None)[0] == 401, path
        assert flower_get(flower, path, auth=(FLOWER_USER, "wrong"))[0] == 401, path


def test_flower_lists_the_example_activity_tasks_with_their_workflow_id(
    flower: int, orchestrator: Orchestrator
) -> None:
    auth = (FLOWER_USER, FLOWER_PASSWORD)
    fulfilled, compensated = run_orders(orchestrator, "flower")

    def listed() -> dict[str, Any] | None:
        status, tasks = flower_get(flower, "/api/tasks?limit=5000", auth=auth)
        assert status == 200, tasks
        names = {task["name"] for task in tasks.values()}
        return tasks if names >= {*STEPS, *COMPENSATIONS} else None

    tasks: dict[str, Any] = harness.wait_until(
        listed, 30, "Flower to list every activity of the order saga", interval=0.5
    )

    def of(workflow_id: str) -> list[dict[str, Any]]:
        return [
            t for t in tasks.values() if f"'workflow_id': '{workflow_id}'" in (t["kwargs"] or "")
        ]

    shown = {task["name"] for task in of(fulfilled)}
    assert shown >= set(STEPS), shown
    undone = {task["name"] for task in of(compensated)}
    assert undone >= {"reserve_inventory", "charge_payment", "create_shipment", *COMPENSATIONS}
    assert "send_confirmation" not in undone
    for task in of(fulfilled):
        assert task["worker"].startswith("metrics-worker-"), task
    done = [t for t in of(fulfilled) if t["name"] == "send_confirmation"]
    harness.wait_until(
        lambda: all(
            flower_get(flower, f"/api/task/info/{t['uuid']}", auth=auth)[1]["state"] == "SUCCESS"
            for t in done
        ),
        15,
        "the confirmation task to show SUCCESS",
    )


def test_flower_is_read_only(flower: int) -> None:
    """Sending or revoking a task through Flower would go around the engine."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{flower}/api/task/async-apply/reserve_inventory",
        data=b"{}",
        method="POST",
        headers={
            "Authorization": "Basic "
            + base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode(),
            "Content-Type": "application/json",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=15)
    assert refused.value.code == 403


def test_flower_reads_queue_lengths_from_the_management_api(flower: int) -> None:
    status, body = flower_get(flower, "/api/queues/length", auth=(FLOWER_USER, FLOWER_PASSWORD))
    assert status == 200, body
    names = {queue["name"] for queue in body["active_queues"]}
    assert {harness.WORKFLOW_QUEUE, harness.ACTIVITY_QUEUE} <= names, body


def test_flower_refuses_to_start_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    result = harness.run_cli("flower", "--port", str(free_port()), timeout=30)
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: ") and "FLOWER_BASIC_AUTH" in result.stderr
