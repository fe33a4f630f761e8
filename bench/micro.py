"""``python -m bench.micro``: two measurements behind choices of the outbox.

- **notify**: six connections each insert a row and commit, as fast as they
  can, for a few seconds: with a ``NOTIFY`` inside each transaction (what an
  insert trigger did), without one, and with a separate notification after
  each commit that does not wait for the disk (what the doorbell sends, here
  once per commit, so the worst case). PostgreSQL serializes notifying
  transactions through their flush, which the first line shows.
- **publish**: one connection publishes task messages through the engine's
  publisher, one at a time and in batches of ten, against ``send_task`` with a
  confirm per message; client CPU and wall time per message.

Rounds alternate the variants; the report gives each one's median. Results
depend on the machine's disk and its load, so compare lines of one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.cli import DEFAULT_BROKER_URL, DEFAULT_DATABASE_URL
from bench.stats import say

_CONNECTIONS = 6


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def measure_notify(database_url: str, seconds: float, rounds: int) -> dict[str, float]:
    """Commits per second of six connections, for each way of notifying."""
    import psycopg

    url = _psycopg_url(database_url)
    table = f"bench_notify_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, v text)")
    try:
        results: dict[str, list[float]] = {"inside": [], "none": [], "after": []}
        for index in range(rounds):
            say(f"notify: round {index + 1} of {rounds}")
            for mode, rates in results.items():
                rates.append(_commit_rate(url, table, mode, seconds))
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP TABLE {table}")
    return {mode: statistics.median(rates) for mode, rates in results.items()}


def _commit_rate(url: str, table: str, mode: str, seconds: float) -> float:
    import psycopg

    stop = threading.Event()
    counts = [0] * _CONNECTIONS
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        try:
            commit_loop(slot)
        except BaseException as exc:  # reported below: a failed thread is not a slow one
            errors.append(exc)
            stop.set()

    def commit_loop(slot: int) -> None:
        with psycopg.connect(url) as conn, psycopg.connect(url, autocommit=True) as bell:
            bell.execute("SET synchronous_commit TO off")
            done = 0
            while not stop.is_set():
                conn.execute(f"INSERT INTO {table} (v) VALUES ('x')")
                if mode == "inside":
                    conn.execute("SELECT pg_notify('bench_notify', '')")
                conn.commit()
                if mode == "after":
                    bell.execute("SELECT pg_notify('bench_notify', '')")
                done += 1
            counts[slot] = done

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(_CONNECTIONS)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a committing connection failed: {errors[0]}") from errors[0]
    return sum(counts) / seconds


def measure_publish(broker_url: str, count: int, rounds: int) -> dict[str, dict[str, float]]:
    """Client CPU and wall ms per message, for each way of publishing."""
    from celery import Celery
    from kombu.entity import Queue

    from orchestrator.task_publisher import CeleryPublisher
    from outbox.message import OutboxMessage

    queue = Queue(f"bench.publish.{uuid.uuid4().hex[:8]}", durable=True)
    app = Celery("bench-publish", broker=broker_url, set_as_current=False)
    app.conf.update(task_queues=[queue], task_create_missing_queues=False)
    publisher = CeleryPublisher(app, dead_letter_exchange="orchestrator.dead-letter")

    def batches(size: int) -> list[list[OutboxMessage]]:
        return [
            [
                OutboxMessage(
                    kind="task",
                    destination="bench.step",
                    queue=queue.name,
                    body={"run_id": str(uuid.uuid4()), "attempt": 1},
                    headers={"workflow_id": "bench"},
                )
                for _ in range(size)
            ]
            for _ in range(max(1, count // size))
        ]

    def one_by_one_send_task(batch: Sequence[OutboxMessage]) -> None:
        publisher._send_tasks(publisher._link(), batch)

    variants: dict[str, tuple[int, Callable[[Sequence[OutboxMessage]], None]]] = {
        "send_task, one at a time": (1, one_by_one_send_task),
        "engine, one at a time": (1, publisher.publish),
        "send_task, batches of 10": (10, one_by_one_send_task),
        "engine, batches of 10": (10, publisher.publish),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    try:
        for _, publish in variants.values():
            publish(batches(1)[0])  # connect and declare before timing
        for index in range(rounds):
            say(f"publish: round {index + 1} of {rounds}")
            for name, (size, publish) in variants.items():
                work = batches(size)
                sent = sum(len(batch) for batch in work)
                cpu, wall = time.process_time(), time.perf_counter()
                for batch in work:
                    publish(batch)
                samples[name].append(
                    (
                        (time.process_time() - cpu) * 1000 / sent,
                        (time.perf_counter() - wall) * 1000 / sent,
                    )
                )
    finally:
        with app.connection_for_write() as connection:
            queue.bind(connection.default_channel).delete()
    return {
        name: {
            "cpu_ms_per_message": statistics.median(c for c, _ in values),
            "wall_ms_per_message": statistics.median(w for _, w in values),
        }
        for name, values in samples.items()
    }


def report(results: dict[str, Any]) -> str:
    lines = []
    notify = results.get("notify")
    if notify:
        lines.append(f"commits/s of {_CONNECTIONS} connections inserting a row each (median)")
        labels = {
            "inside": "NOTIFY inside each transaction",
            "none": "no notification",
            "after": "a NOTIFY after each commit",
        }
        for mode, rate in notify.items():
            lines.append(f"  {labels[mode]:<40} {rate:>10,.0f}")
    publish = results.get("publish")
    if publish:
        lines.append("task messages published with confirms, per message (median)")
        lines.append(f"  {'':<40} {'cpu ms':>10} {'wall ms':>10}")
        for name, figures in publish.items():
            lines.append(
                f"  {name:<40} {figures['cpu_ms_per_message']:>10.3f}"
                f" {figures['wall_ms_per_message']:>10.3f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    parser.add_argument("--only", choices=["notify", "publish"], default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per notify variant and round")
    parser.add_argument("--messages", type=int, default=300, help="per publish variant and round")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.messages < 10:
        parser.error("--rounds must be at least 1, --seconds positive, --messages at least 10")
    results: dict[str, Any] = {"rounds": args.rounds}
    if args.only in (None, "notify"):
        results["notify"] = measure_notify(args.database_url, args.seconds, args.rounds)
    if args.only in (None, "publish"):
        results["publish"] = measure_publish(args.broker_url, args.messages, args.rounds)
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
