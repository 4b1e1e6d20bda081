"""A consumer group member stuck rejoining its group ends its session, so a new one starts.

aiokafka can leave a member that lost its group (a broker restart, a rebalance) waiting to rejoin for ever:
it stops heartbeating, logs nothing and raises nothing, so the loop around it sees only empty fetches
(aiokafka issue #1154; seen here once in CI: a store consumer never came back after the broker did, and
every transaction waited on its store). The only sign is in aiokafka's group coordinator: it wants a rejoin
(`_rejoin_needed_fut` done) or has no coordinator, and stays so. A healthy member leaves that state within
a rebalance, seconds; `GroupWatch` ends the session after `REJOIN_DEADLINE_S` of it with `GroupStuckError`
(a KafkaError, which the session's owner already answers by starting over from the committed offsets).

`StuckTimer` is the pure part: how long the member has been continuously stuck.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

# Far above a healthy rebalance (the session timeout is 6 s) and below what a stuck member would cost: the
# transactions waiting on its store.
REJOIN_DEADLINE_S = 30.0
POLL_S = 1.0


class GroupStuckError(KafkaError):  # type: ignore[misc]
    """The member did not rejoin its group within the deadline (its session ends and starts over)."""


class StuckTimer:
    """Whether a member has been stuck for `deadline_s` without a break, from observations over time."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._since: float | None = None

    def observe(self, now: float, stuck: bool) -> bool:
        if not stuck:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.deadline_s


def wants_rejoin(consumer: Any) -> bool:
    """aiokafka's group coordinator is waiting to (re)join, or knows no coordinator (private state: the
    library has no public health signal for it)."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_rejoin_needed_fut"):
        return False  # not started yet, or no group
    return coordinator.coordinator_id is None or coordinator._rejoin_needed_fut.done()


class GroupWatch:
    """`async with GroupWatch(consumer):` around a session's loop: cancels the loop when the member stays
    stuck for `deadline_s`, and turns that cancellation into GroupStuckError (as `asyncio.timeout` turns its
    own into TimeoutError); any other cancellation passes through."""

    def __init__(self, consumer: Any, name: str, deadline_s: float = REJOIN_DEADLINE_S, poll_s: float = POLL_S) -> None:
        self.consumer, self.name = consumer, name
        self.deadline_s, self.poll_s = deadline_s, poll_s
        self.fired = False
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GroupWatch:
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.name}-group-watch")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.fired and kind is asyncio.CancelledError and self._task is not None and self._task.uncancel() == 0:
            raise GroupStuckError(
                f"{self.name} did not rejoin its consumer group within {self.deadline_s:.0f} s"
            ) from None

    async def _watch(self) -> None:
        timer = StuckTimer(self.deadline_s)
        while True:
            await asyncio.sleep(self.poll_s)  # a health poll, not a wait for an event
            if timer.observe(time.monotonic(), wants_rejoin(self.consumer)):
                log.warning(
                    "%s: stuck rejoining its consumer group for %.0f s: new session", self.name, self.deadline_s
                )
                self.fired = True
                if self._task is not None:
                    self._task.cancel()
                return


STOP_DEADLINE_S = 15.0  # a healthy consumer stops (leaves its group) in well under a second


async def stop_consumer(consumer: Any, name: str, deadline_s: float = STOP_DEADLINE_S, *, stuck: bool = False) -> bool:
    """Stop a consumer; whether it stopped (False: abandoned after `deadline_s`). aiokafka's stop waits for
    its group coordination task, which a stuck member never finishes, so an unbounded stop would hang the
    session it was meant to end. `stuck` (its GroupWatch fired): that task is cancelled first, so the stop
    is immediate and complete (heartbeat, fetcher and connections closed) instead of abandoned halfway.
    Called from a session's `finally`, it raises nothing (see `quietly`)."""

    async def stop() -> None:
        if stuck:
            await cancel_coordination(consumer)
        try:
            await asyncio.wait_for(consumer.stop(), deadline_s)
        except TimeoutError:
            raise TimeoutError(f"not stopped within {deadline_s:.0f} s") from None

    return await quietly(name, "Kafka consumer", stop())


async def quietly(name: str, what: str, closing: Awaitable[Any]) -> bool:
    """Await the close of something a session that is ending anyway opened; whether it closed. A failure
    is logged, not raised: raised from the session's `finally`, it would replace the error that ended the
    session (which the session's owner answers with a new one) by one that ends the process. Seen in a
    chaos run: a store consumer's group watch fired after a broker restart, and a close in its `finally`
    raised uvloop's RuntimeError for a transport already closed; the consumer exited."""
    try:
        await closing
    except Exception:
        log.warning("%s: closing its %s failed; left behind", name, what, exc_info=True)
        return False
    return True


def coordination_task(consumer: Any) -> asyncio.Task[None] | None:
    """aiokafka's group coordination task of a started consumer (private: no public handle on it)."""
    return getattr(getattr(consumer, "_coordinator", None), "_coordination_task", None)


async def cancel_coordination(consumer: Any) -> None:
    """Cancel aiokafka's group coordination task and wait until it has ended. Awaited here, the cancellation
    stays in that task: the consumer's stop then finds it done and does not await it (awaiting a task
    cancelled under it would raise CancelledError in the stopping session, as if the session were)."""
    task = coordination_task(consumer)
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
