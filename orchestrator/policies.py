"""Run statuses and the policies a start can choose."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a run is. RUNNING and COMPENSATION_BLOCKED are open; the rest are final.

    COMPENSATION_BLOCKED: a compensation exhausted its retries and waits in the
    dead-letter list for an operator (``orchestrator dlq replay``).
    """

    RUNNING = "RUNNING"
    COMPENSATION_BLOCKED = "COMPENSATION_BLOCKED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATED = "COMPENSATED"
    CANCELLED = "CANCELLED"
    TERMINATED = "TERMINATED"
    CONTINUED_AS_NEW = "CONTINUED_AS_NEW"

    @property
    def is_closed(self) -> bool:
        return self not in (RunStatus.RUNNING, RunStatus.COMPENSATION_BLOCKED)


class IdReusePolicy(StrEnum):
    """May a new run take a workflow id that a *closed* run already used?

    ``ALLOW_DUPLICATE`` (the default) always may; ``ALLOW_DUPLICATE_FAILED_ONLY``
    only if the last run did not complete; ``REJECT_DUPLICATE`` never.
    """

    ALLOW_DUPLICATE = "ALLOW_DUPLICATE"
    ALLOW_DUPLICATE_FAILED_ONLY = "ALLOW_DUPLICATE_FAILED_ONLY"
    REJECT_DUPLICATE = "REJECT_DUPLICATE"


class IdConflictPolicy(StrEnum):
    """What a start does when a run with the same workflow id is still *open*.

    ``FAIL`` (the default) raises WorkflowAlreadyStartedError; ``USE_EXISTING``
    returns the open run's handle, which makes a start idempotent.
    """

    FAIL = "FAIL"
    USE_EXISTING = "USE_EXISTING"


class ParentClosePolicy(StrEnum):
    """What happens to a child run still open when its parent closes.

    ``TERMINATE`` (the default) stops it; ``REQUEST_CANCEL`` asks it to cancel (it
    may compensate); ``ABANDON`` lets it run on.
    """

    TERMINATE = "TERMINATE"
    REQUEST_CANCEL = "REQUEST_CANCEL"
    ABANDON = "ABANDON"
