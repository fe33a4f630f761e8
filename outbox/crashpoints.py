"""Named crash points for fault-injection tests.

Crash tests must kill a real process at an exact moment (say, after a commit and
before the publish that follows it). Setting ``ORCHESTRATOR_CRASH_AT`` to a point's
name makes the process SIGKILL itself when it reaches that point; unset, a crash
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "ORCHESTRATOR_CRASH_AT"


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if ``ORCHESTRATOR_CRASH_AT`` names this point."""
    wanted = os.environ.get(ENV_VAR)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
