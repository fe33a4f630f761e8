"""The unit the outbox stores and publishes."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _new_id() -> str:
    return uuid.uuid4().hex


class OutboxMessage(BaseModel):
    """One task to send or event to emit, recorded in the same transaction as its cause.

    Attributes:
        id: Unique message id, kept across redeliveries so consumers can drop
            duplicates. Defaults to a fresh random UUID in hex.
        kind: ``"task"`` or ``"event"``.
        destination: Task name for a task, routing key for an event.
        queue: Broker queue of a task, exchange of an event. Defaults to
            ``None`` (the publisher's default).
        aggregate_id: Ordering key such as a workflow id. Defaults to ``None``.
        body: JSON-serialisable payload.
        headers: String headers sent along. Defaults to empty.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=_new_id)
    kind: Literal["task", "event"]
    destination: str
    queue: str | None = None
    aggregate_id: str | None = None
    body: dict[str, Any]
    headers: dict[str, str] = Field(default_factory=dict)
