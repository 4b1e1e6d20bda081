"""The asyncio event loop of the processes polycommit runs itself (the CLI's commands): uvloop unless
POLYCOMMIT_EVENT_LOOP=asyncio. An application that imports the library keeps its own loop.

Every part of the path is an asyncio program that spends much of its CPU in the loop itself (socket reads
and writes, callbacks, timers: a Kafka request, a Bolt message, a PostgreSQL round trip each pass through
it several times), so the loop's own cost is on every hop. uvloop (libuv) does that work in C.
`POLYCOMMIT_EVENT_LOOP=asyncio` keeps the standard loop, e.g. to rule the loop out when debugging.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from polycommit.errors import InvalidOperationError

LOOPS = ("uvloop", "asyncio")


def event_loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for `asyncio.Runner` (None: the standard loop); a typed error names the choices."""
    chosen = os.environ.get("POLYCOMMIT_EVENT_LOOP", "uvloop") if choice is None else choice
    if chosen == "asyncio":
        return None
    if chosen == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise InvalidOperationError(f"POLYCOMMIT_EVENT_LOOP={chosen!r}: expected one of {', '.join(LOOPS)}")


def running_loop_name() -> str:
    """The loop this code runs on, "uvloop" or "asyncio" (outside a loop: the one a process would get)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "asyncio" if event_loop_factory() is None else "uvloop"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
