"""Starts that arrive together commit together: a group commit for a process's starts.

A start in its own transaction is four inserts and a COMMIT that waits for the
disk, then a publish that waits for the broker's confirm. When many threads of
one process start runs at once (a web application's request threads), each
paid for its own commit, flush, confirm and the wake-ups around them. Here the
thread that finds no start being committed leads: it commits its own start and
every start queued behind it meanwhile, in one transaction, whose messages then
go out in one publish, and hands the lead to the first start queued after. A
start that arrives alone goes at once; nothing waits for company, so a lone
start's latency is what it was.

A group's transaction that the database refuses (one start's workflow id taken,
one value it cannot store) is rolled back whole, and each start of the group is
then made again alone by its own thread, so that one start's failure is its own.
A group whose commit ends in doubt (the connection lost after its COMMIT was
handed over) gives every start of the group a ``StartInDoubtError``. A start
waits in the queue at most ``PATIENCE`` before it goes alone, and a group's
transaction waits for a row lock at most as long: the lock's holder may be a
thread of this process whose own start waits in that group, or in the queue.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import StartInDoubtError

_BROKEN_OFF = "the commit of a group of starts broke off: look the run up before starting it again"

# A group's transaction stays short: its starts' rows, a few hundred statements at most.
MAX_GROUP = 64
# How long a start waits in the queue before it goes alone. A commit takes
# milliseconds; one that takes longer may be waiting, through a row lock, for
# the very thread that waits here (its own transaction holds the lock).
PATIENCE = 2.0


class _Alone:
    def __repr__(self) -> str:
        return "ALONE"


#: A member's outcome when its group could not commit as a whole: start it alone.
ALONE: Any = _Alone()


@dataclass(eq=False)
class Member:
    """One start in a group: what to start and, once settled, what came of it."""

    request: Any
    done: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    outcome: Any = None
    error: BaseException | None = None
    settled: bool = False

    def settle(self, outcome: Any = None, error: BaseException | None = None) -> None:
        self.outcome = outcome
        self.error = error
        self.settled = True

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.outcome


#: ``commit_group(members)`` settles each member: an outcome, an error, or :data:`ALONE`.
CommitGroup = Callable[[Sequence[Member]], None]


class StartGroup:
    """Queues a process's concurrent starts; one thread at a time commits them as a group."""

    def __init__(self, commit_group: CommitGroup) -> None:
        self._commit_group = commit_group
        self._reset()
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset(this))

    def _reset(self) -> None:
        # A forked child inherits no leading thread, and maybe a held lock.
        self._lock = threading.Lock()
        self._queue: list[Member] = []
        self._leading = False

    def start(self, request: Any) -> Any:
        """Commit ``request`` with the starts queued beside it; its outcome, or :data:`ALONE`."""
        member = Member(request)
        with self._lock:
            self._queue.append(member)
            lead = member.leads = not self._leading
            self._leading = True
        if not lead:
            try:
                if not member.done.wait(PATIENCE) and self._leave(member):
                    return ALONE
                member.done.wait()
            except BaseException:
                self._abandon(member)
                raise
            if not member.leads:
                return member.result()
        try:
            self._lead()
        except BaseException:
            self._abandon(member)  # broken off before its group was taken: pass the lead on
            raise
        return member.result()

    def _leave(self, member: Member) -> bool:
        """Take ``member`` out of the queue if no group has it and it was not given the lead."""
        with self._lock:
            if member.leads or member not in self._queue:
                return False
            self._queue.remove(member)
            return True

    def _abandon(self, member: Member) -> None:
        # Its thread was interrupted while it waited: out of the queue, and
        # the lead, if it had been handed it, passed on. A group that took it
        # already commits it all the same, as a start interrupted while
        # committing may commit.
        with self._lock:
            if member in self._queue:
                self._queue.remove(member)
                if member.leads:
                    self._pass_lead()

    def _pass_lead(self) -> None:
        # Under the lock: the first start queued leads next, or nobody leads.
        if self._queue:
            self._queue[0].leads = True
            self._queue[0].done.set()
        else:
            self._leading = False

    def _lead(self) -> None:
        with self._lock:
            # The leader's own start is first: it came to an empty queue, or the
            # last leader handed the lead to the first start queued.
            group = self._queue[:MAX_GROUP]
            del self._queue[:MAX_GROUP]
        try:
            self._commit_group(group)
        finally:
            try:
                for member in group:
                    if not member.settled:  # commit_group broke off: committed or not?
                        member.settle(error=StartInDoubtError(_BROKEN_OFF))
                with self._lock:
                    self._pass_lead()
            finally:
                for member in group[1:]:
                    member.done.set()


def _reset(ref: weakref.ref[StartGroup]) -> None:
    group = ref()
    if group is not None:
        group._reset()
