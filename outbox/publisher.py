"""What the outbox needs from a broker, and an in-memory stand-in."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from outbox.errors import PublishError
from outbox.message import OutboxMessage


class Publisher(Protocol):
    """Sends outbox messages to the broker."""

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Send ``messages`` and return only once the broker confirmed every one.

        Raises:
            PublishError: if any message was not confirmed. Some of them may
                still have reached the broker; the outbox sends them again and
                consumers drop the duplicates by message id.
            BrokerUnavailableError: the broker could not be reached or did
                not answer in time. After two of these in a row, the relay
                stops trying a failed batch's messages one by one and leaves
                the rest for its next run.
        """
        ...


def broker_unavailable(exc: BaseException) -> bool:
    """Whether a client library's error means the broker, not the message, is the trouble.

    Timeouts and lost or refused connections are ``OSError`` (a socket's), and
    py-amqp's and kombu's connection errors derive from their
    ``RecoverableConnectionError`` and ``OperationalError``.
    """
    # Imported here: the outbox itself needs no broker library.
    import amqp.exceptions
    import kombu.exceptions

    return isinstance(
        exc,
        OSError | amqp.exceptions.RecoverableConnectionError | kombu.exceptions.OperationalError,
    )


class RecordingPublisher:
    """A :class:`Publisher` that keeps messages in memory instead of sending them.

    Used by tests and by the embedded single-process mode. Safe to share
    between threads.

    Attributes:
        published: Every message accepted so far, in publish order.
        fail: When true, :meth:`publish` raises :class:`PublishError` and
            records nothing. Defaults to ``False``.
    """

    def __init__(self, *, fail: bool = False) -> None:
        self.published: list[OutboxMessage] = []
        self.fail = fail
        self._changed = threading.Condition()

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Record ``messages``, or raise :class:`PublishError` if :attr:`fail` is set."""
        with self._changed:
            if self.fail:
                raise PublishError(f"refusing to publish {len(messages)} message(s)")
            self.published.extend(messages)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` messages were published or ``timeout`` seconds pass.

        Returns whether ``count`` was reached.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.published) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True
