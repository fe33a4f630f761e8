"""Transactional outbox: messages commit with the state that caused them.

The lowest layer of the project. A :class:`OutboxWriter` inserts messages in the
caller's transaction and publishes them right after commit; a :class:`Relay`
publishes whatever that path missed. Delivery is at least once: consumers drop
duplicates by message id.
"""

from __future__ import annotations

from outbox.crashpoints import crash_point
from outbox.errors import BrokerUnavailableError, OrchestratorError, OutboxError, PublishError
from outbox.message import OutboxMessage
from outbox.publisher import Publisher, RecordingPublisher
from outbox.relay import Relay
from outbox.schema import NOTIFY_CHANNEL, metadata, outbox_messages
from outbox.writer import OutboxWriter

__all__ = [
    "NOTIFY_CHANNEL",
    "BrokerUnavailableError",
    "OrchestratorError",
    "OutboxError",
    "OutboxMessage",
    "OutboxWriter",
    "PublishError",
    "Publisher",
    "RecordingPublisher",
    "Relay",
    "crash_point",
    "metadata",
    "outbox_messages",
]
