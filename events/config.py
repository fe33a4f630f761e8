"""Settings of the events side, read from ``ORCHESTRATOR_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.envelope import DEFAULT_EXCHANGE
from events.topology import QueueType

__all__ = ["EventSettings"]


class EventSettings(BaseSettings):
    """How events are published and consumed.

    Each field is read from ``ORCHESTRATOR_<FIELD>``; the database and broker
    URLs are the orchestrator's own.
    """

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", frozen=True, extra="ignore")

    events_exchange: str = Field(
        default=DEFAULT_EXCHANGE, min_length=1, description="Topic exchange of domain events."
    )
    events_queue_type: QueueType = Field(
        default="auto",
        description="Queue type of event queues: auto (quorum where supported), quorum, classic.",
    )
    subscriber_modules: str = Field(
        default="",
        description="Comma-separated modules to import for their @subscriber handlers.",
    )
    subscriber_prefetch: int = Field(
        default=10, ge=1, description="Unacknowledged deliveries a group's consumer holds."
    )
    subscriber_max_attempts: int = Field(
        default=5, ge=1, description="Calls of a failing handler before its event is dead-lettered."
    )
    subscriber_retry_seconds: float = Field(
        default=0.5, ge=0, description="Pause before a handler's first retry (doubling after)."
    )
    subscriber_max_retry_seconds: float = Field(
        default=30.0, ge=0, description="Longest pause between a handler's retries."
    )
    subscriber_single_active: bool = Field(
        default=True,
        description="One active consumer per group (keeps order); others stand by.",
    )
    subscriber_delivery_limit: int = Field(
        default=20,
        ge=0,
        description="Deliveries before a quorum queue dead-letters a message (0: no limit).",
    )

    @property
    def modules(self) -> list[str]:
        """The subscriber modules as a list."""
        return [name.strip() for name in self.subscriber_modules.split(",") if name.strip()]
