"""The scheduler loop: fires durable timers and enforces activity deadlines."""

from __future__ import annotations

import logging
import threading

from orchestrator.engine import Engine
from orchestrator.watchdog import redispatch_stalled

log = logging.getLogger("orchestrator.scheduler")


def run_scheduler(
    engine: Engine, stop: threading.Event, *, poll: float, stale_after: float
) -> None:
    """Scan until ``stop`` is set. Several schedulers may run at once.

    Each pass fires due timers and deadlines, then re-dispatches work whose
    message was lost (see :mod:`orchestrator.watchdog`).

    A database outage is logged and waited out with growing pauses (up to 30 s);
    the loop never dies of it, so timers resume when the database is back.
    """
    backoff = poll
    while not stop.is_set():
        try:
            fired = engine.fire_due()
            redispatch_stalled(engine, stale_after=stale_after)
            backoff = poll
        except Exception as exc:
            log.warning("scheduler scan failed (%s); retrying in %.1fs", exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)
            continue
        if fired:
            log.debug("scheduler fired %d timers/deadlines", fired)
            continue
        stop.wait(_pause(engine, poll))


_MIN_PAUSE = 0.005


def _pause(engine: Engine, poll: float) -> float:
    """Sleep until the next timer falls due, but never longer than ``poll``.

    Timers started after this look are caught by the next poll at the latest, so
    ``poll`` bounds how late a timer can fire.
    """
    try:
        due = engine.timers.next_due()
    except Exception:
        return poll
    if due is None:
        return poll
    # Never a busy loop, even if something due cannot be handled yet.
    return min(poll, max((due - engine.clock()).total_seconds(), _MIN_PAUSE))
