"""The participants' clock: when a batch started, and the `Timing` its outcomes carry.

Kept apart so that the exactly-once rules (consumers/base.py) and the planner stay free of clocks.
"""

from __future__ import annotations

import time

from consumers.base import Timing
from polycommit.events import now_ms


def started() -> int:
    """A monotonic start mark (nanoseconds) for `since`."""
    return time.perf_counter_ns()


def since(started_ns: int) -> Timing:
    """The outcomes' timing of work that began at `started_ns`: now (wall clock) and the time spent."""
    return Timing(now_ms(), (time.perf_counter_ns() - started_ns) // 1000)
