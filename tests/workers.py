"""Helpers for the tests that drive a store consumer's (or the coordinator's) Kafka sessions: a worker
running for the length of a block, commands sent to it, the outcomes it publishes awaited by transaction,
and the consumers a module builds, one of them left stuck rejoining its group the way aiokafka leaves it
(issue #1154)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest

from consumers.worker import StoreWorker
from polycommit.bus import Outgoing, Publisher, topics_for
from polycommit.config import Settings
from polycommit.events import StepOutcome, StoreCommand


@contextlib.asynccontextmanager
async def running(worker: StoreWorker) -> AsyncIterator[asyncio.Task[None]]:
    """`worker` running, its first session ready; stopped when the block ends, and its run must then end
    without an error (one it ended with is raised here)."""
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(worker.run(stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def publishing(settings: Settings) -> AsyncIterator[Publisher]:
    publisher = Publisher(settings)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()


async def send_commands(publisher: Publisher, settings: Settings, store: str, commands: Iterable[StoreCommand]) -> None:
    """Publish `commands` to `store`'s command topic, as the coordinator does (keyed by transaction)."""
    topic = topics_for(settings).commands(store)
    await publisher.publish_and_wait([Outgoing(topic, c["tx_id"], "StoreCommand", c) for c in commands])


async def never_joins(*args: Any, **kwargs: Any) -> None:
    await asyncio.Event().wait()


class ConsumersMade:
    """A stand-in for a module's `make_consumer` that keeps every consumer built: one per session, so
    `second_session` is set when a session after the first has started."""

    def __init__(self, factory: Callable[..., Any]) -> None:
        self.factory = factory
        self.made: list[Any] = []
        self.second_session = asyncio.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.made.append(self.factory(*args, **kwargs))
        if len(self.made) == 2:
            self.second_session.set()
        return self.made[-1]


def leave_stuck(consumer: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Ask the consumer's group coordinator to rejoin (what a heartbeat failing against a restarted broker
    does) with a join that never completes; returns that coordinator."""
    coordinator = consumer._coordinator
    monkeypatch.setattr(coordinator, "ensure_active_group", never_joins)
    coordinator.request_rejoin()
    return coordinator


def closed(consumer: Any) -> bool:
    """Every connection of a stopped consumer's client is closed."""
    return not any(conn.connected() for conn in consumer._client._conns.values())


class OutcomesSeen:
    """A worker's `on_batch`: the outcomes it published, awaited by transaction id."""

    def __init__(self) -> None:
        self.seen: dict[str, StepOutcome] = {}
        self._arrived = asyncio.Event()

    def __call__(self, outcomes: list[StepOutcome]) -> None:
        self.seen.update((o["tx_id"], o) for o in outcomes)
        self._arrived.set()

    async def of(self, tx_id: str, timeout: float = 60) -> StepOutcome:
        while tx_id not in self.seen:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        return self.seen[tx_id]
