"""One settings object, read from ``ORCHESTRATOR_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_BROKER = "embedded://"


class Settings(BaseSettings):
    """Configuration of every orchestrator process.

    Each field is read from the environment variable ``ORCHESTRATOR_<FIELD>``. With
    nothing set, the orchestrator runs embedded: SQLite in ``./orchestrator.db`` and
    an in-process broker, so it needs no services.
    """

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", frozen=True, extra="ignore")

    database_url: str = Field(
        default="sqlite:///orchestrator.db",
        description="SQLAlchemy URL of the state store (PostgreSQL in production).",
    )
    broker_url: str = Field(
        default=EMBEDDED_BROKER,
        description="Celery broker URL (amqp://...); embedded:// runs everything in-process.",
    )
    app: str | None = Field(
        default=None,
        description="module:attribute of the Orchestrator the CLI and workers load.",
    )
    workflow_queue: str = Field(default="workflows", description="Queue of workflow tasks.")
    dead_letter_exchange: str = Field(
        default="orchestrator.dead-letter",
        description="Exchange that receives messages a worker rejects as malformed.",
    )
    relay_grace_seconds: float = Field(
        default=2.0, ge=0, description="Age before the relay takes a row from the publisher."
    )
    relay_poll_seconds: float = Field(default=5.0, gt=0, description="Relay safety poll.")
    scheduler_poll_seconds: float = Field(
        default=0.5, gt=0, description="How often timers and deadlines are scanned."
    )
    redispatch_after_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Send a stalled run's or activity's message again after this long.",
    )
    max_pending: int = Field(
        default=2000, gt=0, description="Pending activities and children one run may have."
    )
    history_warn_events: int = Field(
        default=10_240, gt=0, description="History length at which continue-as-new is suggested."
    )
    max_history_events: int = Field(
        default=51_200, gt=0, description="History length at which a run is failed."
    )
    max_payload_bytes: int = Field(
        default=2 * 1024 * 1024, gt=0, description="Largest input, result or error payload."
    )
    default_start_to_close_seconds: float = Field(
        default=60.0, gt=0, description="Start-to-close timeout of activities that set none."
    )
    publish_after_commit: bool = Field(
        default=True,
        description="Publish messages right after their commit; off leaves all to the relay.",
    )
    lifecycle_events: bool = Field(
        default=True,
        description="Emit workflow.started / workflow.closed domain events for every run.",
    )
    fast_path: bool = Field(
        default=True,
        description="Advance the workflow in the transaction that records a result, and run "
        "a new run's first step in its start's transaction.",
    )
    eager_max_steps: int = Field(
        default=100,
        ge=0,
        description="Activities a worker runs in a row, without the broker, when it decides "
        "them on a queue it serves; 0 sends every activity through the broker.",
    )
    worker_spare_messages: int = Field(
        default=1,
        ge=0,
        description="Messages a worker holds beyond one per pool process, so that a process "
        "that finishes a task finds the next at hand; 0 leaves a message to another worker "
        "while all of this one's processes are busy (for long activities).",
    )
    task_events: bool = Field(
        default=False,
        description="Workers send Celery task events from the start; off, only after a "
        "monitor asks (Flower does, every few seconds), until they restart or reconnect.",
    )
    instance_cache_size: int = Field(
        default=1000, ge=0, description="Workflow instances a worker keeps between tasks."
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the Prometheus endpoint of workers, relays, schedulers and "
        "subscribers; unset: none.",
    )
    metrics_address: str = Field(
        default="0.0.0.0", description="Address the Prometheus endpoint listens on."
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="When set, the Prometheus endpoint requires 'Authorization: Bearer <token>'.",
    )
    metrics_system: bool = Field(
        default=True,
        description="The endpoint also reports the system's counts and backlogs, read from "
        "the database and the broker at each scrape.",
    )
    log_level: str = Field(default="INFO", description="Log level of orchestrator processes.")
    log_json: bool = Field(default=False, description="Write logs as JSON lines.")

    @property
    def embedded(self) -> bool:
        """True when the broker is the in-process one."""
        return self.broker_url == EMBEDDED_BROKER
