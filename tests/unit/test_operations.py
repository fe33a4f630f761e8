"""Operator actions, embedded: dead-lettered compensations, pause/resume, audit, stuck runs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sample_workflows import wait_for
from sqlalchemy import func, select
from test_example import make_order

from examples.order_fulfillment import services
from examples.order_fulfillment.app import build
from examples.order_fulfillment.models import Simulation
from examples.order_fulfillment.schema import INITIAL_STOCK, inventory_stock, payments
from examples.order_fulfillment.workflow import OrderSaga
from orchestrator import RunStatus, WorkflowFailedError
from orchestrator.app import Orchestrator
from orchestrator.cli import main
from orchestrator.operations import stuck_runs
from orchestrator.schema import audit_log
from orchestrator.schema import metadata as engine_metadata
from orchestrator.settings import EMBEDDED_BROKER, Settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def orchestrator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Orchestrator]:
    url = f"sqlite:///{tmp_path}/ops.db"
    monkeypatch.setenv("ORCHESTRATOR_DATABASE_URL", url)
    services.reset_engine_cache()
    orch = build(
        Settings(database_url=url, broker_url=EMBEDDED_BROKER, scheduler_poll_seconds=0.05)
    )
    engine_metadata.create_all(orch.db)
    yield orch
    orch.close()
    services.reset_engine_cache()


def stock() -> dict[str, int]:
    with services.get_engine().connect() as conn:
        return dict(conn.execute(select(inventory_stock.c.sku, inventory_stock.c.available)).all())


def payment_statuses(order_id: str) -> list[str]:
    with services.get_engine().connect() as conn:
        return list(
            conn.execute(select(payments.c.status).where(payments.c.order_id == order_id)).scalars()
        )


def blocked_order(orchestrator: Orchestrator, order_id: str) -> Any:
    """An order whose shipping fails while the refund gateway is down: its refund dead-letters."""
    services.set_outage("refunds", True)
    order = make_order(
        order_id,
        address=make_order().address.model_copy(update={"country": "XX"}),
        simulate=Simulation(compensation_attempts=2),
    )
    handle = orchestrator.client().start_workflow(OrderSaga, order, workflow_id=order_id)
    wait_for(lambda: handle.describe().status is RunStatus.COMPENSATION_BLOCKED, timeout=15)
    return handle


def test_a_failing_compensation_is_dead_lettered_then_replayed(orchestrator: Orchestrator) -> None:
    handle = blocked_order(orchestrator, "order-dl")
    letters = orchestrator.engine.dead_letters.list()
    assert len(letters) == 1
    letter = letters[0]
    assert letter["activity_type"] == "refund_payment"
    assert [a["attempt"] for a in letter["attempts"]] == [1, 2]
    assert all(a["failure"]["type"] == "RefundGatewayDown" for a in letter["attempts"])
    assert letter["input"]["order_id"] == "order-dl"
    types = [e.event.TYPE for e in handle.history()]
    assert "ActivityDeadLettered" in types
    # The saga waits: the compensation after the refund has not run yet.
    assert payment_statuses("order-dl") == ["charged"]
    assert stock() != INITIAL_STOCK

    services.set_outage("refunds", False)
    assert (
        orchestrator.engine.dead_letters.replay(letter["id"], actor="ops", reason="fixed") is True
    )
    assert orchestrator.engine.dead_letters.replay(letter["id"], actor="ops") is False
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=15)
    assert caught.value.status == "COMPENSATED"
    assert payment_statuses("order-dl") == ["refunded"]
    assert stock() == INITIAL_STOCK
    assert orchestrator.engine.dead_letters.get(letter["id"])["status"] == "REPLAYED"
    compensations = [
        e.event.activity_type  # type: ignore[attr-defined]
        for e in handle.history()
        if e.event.TYPE == "ActivityCompleted" and e.event.activity_type != "charge_payment"  # type: ignore[attr-defined]
    ]
    assert compensations[-2:] == ["refund_payment", "release_inventory"]


def test_concurrent_replays_act_once(orchestrator: Orchestrator) -> None:
    blocked_order(orchestrator, "order-race")
    letter_id = orchestrator.engine.dead_letters.list()[0]["id"]
    services.set_outage("refunds", False)
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def replay() -> None:
        barrier.wait()
        results.append(orchestrator.engine.dead_letters.replay(letter_id, actor="t"))

    threads = [threading.Thread(target=replay) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [False, False, False, True]
    with orchestrator.engine.sessions() as session:
        replays = session.execute(
            select(func.count()).select_from(audit_log).where(audit_log.c.action == "dlq.replay")
        ).scalar_one()
    assert replays == 1


def test_discarding_a_dead_letter_lets_the_saga_finish_failed(orchestrator: Orchestrator) -> None:
    handle = blocked_order(orchestrator, "order-discard")
    letter_id = orchestrator.engine.dead_letters.list()[0]["id"]
    assert orchestrator.engine.dead_letters.discard(letter_id, reason="refunded by hand")
    with pytest.raises(WorkflowFailedError) as caught:
        handle.result(timeout=15)
    assert caught.value.status == "FAILED"
    assert caught.value.failure is not None
    assert "compensations failed: refund_payment" in caught.value.failure.message
    assert stock() == INITIAL_STOCK  # the inventory was still released


def test_pause_stops_dispatch_until_resumed(orchestrator: Orchestrator) -> None:
    order = make_order("order-pause", simulate=Simulation(charge_delay_seconds=0.5))
    handle = orchestrator.client().start_workflow(OrderSaga, order, workflow_id="order-pause")
    # Pause while the charge runs (its row is written before its half-second wait).
    wait_for(lambda: payment_statuses("order-pause") == ["charged"])
    assert handle.pause("investigating", actor="ops") is True
    assert handle.pause() is False
    assert orchestrator.wait_idle(10)
    before = [e.event.TYPE for e in handle.history()]
    # The charge in flight finished; nothing new was scheduled after it.
    assert before[-1] == "ActivityCompleted"
    assert handle.describe().paused is True
    assert orchestrator.wait_idle(1)
    assert [e.event.TYPE for e in handle.history()] == before
    assert handle.resume("all clear", actor="ops") is True
    assert handle.result(timeout=15).order_id == "order-pause"
    with orchestrator.engine.sessions() as session:
        actions = session.execute(
            select(audit_log.c.action, audit_log.c.actor, audit_log.c.reason).order_by(
                audit_log.c.id
            )
        ).all()
    assert [tuple(a) for a in actions] == [
        ("pause", "ops", "investigating"),
        ("resume", "ops", "all clear"),
    ]


def test_stuck_runs_are_flagged(orchestrator: Orchestrator) -> None:
    handle = blocked_order(orchestrator, "order-stuck")
    flagged = stuck_runs(orchestrator.engine, after=timedelta(minutes=5))
    assert [(r["workflow_id"], r["reason"]) for r in flagged] == [
        ("order-stuck", "a compensation is dead-lettered")
    ]
    handle.terminate("cleanup")
    assert stuck_runs(orchestrator.engine, after=timedelta(minutes=5)) == []


def test_dlq_and_ls_commands(
    orchestrator: Orchestrator, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked_order(orchestrator, "order-cli")
    monkeypatch.setenv("ORCHESTRATOR_BROKER_URL", EMBEDDED_BROKER)
    app = ["--app", "examples.order_fulfillment.app:build"]
    assert main([*app, "--json", "dlq", "list"]) == 0
    letters = json.loads(capsys.readouterr().out)
    assert [letter["workflow_id"] for letter in letters] == ["order-cli"]
    assert main([*app, "dlq", "show", letters[0]["id"]]) == 0
    shown = capsys.readouterr().out
    assert "attempt 2" in shown and "RefundGatewayDown" in shown
    assert main([*app, "ls", "--stuck"]) == 0
    assert "order-cli" in capsys.readouterr().out
    assert main([*app, "ls", "--status", "COMPENSATION_BLOCKED"]) == 0
    assert "order-cli" in capsys.readouterr().out
    services.set_outage("refunds", False)
    assert main([*app, "--actor", "ann", "dlq", "replay", "--all", "--reason", "gateway up"]) == 0
    assert "[1/1]" in capsys.readouterr().out
    assert main([*app, "--actor", "ann", "dlq", "replay", letters[0]["id"]]) == 0
    assert "already resolved" in capsys.readouterr().out
    assert main([*app, "--json", "audit"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries[0]["action"] == "dlq.replay" and entries[0]["actor"] == "ann"
    assert main([*app, "dlq", "show", "nope"]) == 2
    assert "no dead letter 'nope'" in capsys.readouterr().err
