"""The benchmark harness: ``python -m bench`` (see docs/benchmarks.md).

It measures the engine against two baselines on the same PostgreSQL and
RabbitMQ: a plain, non-durable Celery chain and a DBOS workflow, each with
three no-op steps. Nothing here is imported by the engine or its tests.
"""
