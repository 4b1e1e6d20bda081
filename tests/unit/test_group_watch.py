"""A consumer group member left stuck rejoining its group ends its session: the pure timer, the reading of
aiokafka's coordinator state, and the watch turning its own cancellation into GroupStuckError."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from polycommit.group_watch import GroupStuckError, GroupWatch, StuckTimer, wants_rejoin


def test_the_timer_fires_only_after_the_deadline_without_a_break() -> None:
    timer = StuckTimer(10.0)
    assert not timer.observe(0.0, False)
    assert not timer.observe(1.0, True)
    assert not timer.observe(10.9, True)
    assert timer.observe(11.0, True)
    assert not timer.observe(12.0, False)  # it rejoined: the count starts again
    assert not timer.observe(13.0, True)
    assert not timer.observe(22.9, True)
    assert timer.observe(23.0, True)


@dataclass
class FakeCoordinator:
    coordinator_id: int | None = 1
    _rejoin_needed_fut: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class FakeConsumer:
    _coordinator: Any = None


async def test_the_coordinator_state_is_read_as_aiokafka_keeps_it() -> None:
    assert not wants_rejoin(FakeConsumer())  # not started
    assert not wants_rejoin(FakeConsumer(object()))  # no group
    healthy = FakeCoordinator()
    assert not wants_rejoin(FakeConsumer(healthy))
    healthy._rejoin_needed_fut.set_result(None)  # what aiokafka's request_rejoin() does
    assert wants_rejoin(FakeConsumer(healthy))
    assert wants_rejoin(FakeConsumer(FakeCoordinator(coordinator_id=None)))


async def stuck_consumer() -> FakeConsumer:
    coordinator = FakeCoordinator()
    coordinator._rejoin_needed_fut.set_result(None)
    return FakeConsumer(coordinator)


async def test_a_stuck_member_ends_its_session_with_a_kafka_error() -> None:
    with pytest.raises(GroupStuckError, match="did not rejoin"):
        async with GroupWatch(await stuck_consumer(), "postgres-0", deadline_s=0.05, poll_s=0.01):
            await asyncio.Event().wait()  # a loop that would otherwise wait for ever


class PolledConsumer:
    """A healthy member that counts the watch's looks at it (each poll reads `_coordinator` once) and says
    when it has been looked at `polls` times."""

    def __init__(self, polls: int) -> None:
        self.coordinator, self.polls, self.seen = FakeCoordinator(), polls, 0
        self.polled = asyncio.Event()

    @property
    def _coordinator(self) -> FakeCoordinator:
        self.seen += 1
        if self.seen >= self.polls:
            self.polled.set()
        return self.coordinator


async def test_a_healthy_member_is_left_alone() -> None:
    consumer = PolledConsumer(polls=20)  # 20 polls of 0.01 s: several times the deadline

    async def session() -> str:
        async with GroupWatch(consumer, "postgres-0", deadline_s=0.05, poll_s=0.01) as watch:
            await consumer.polled.wait()
        return "ended normally" if not watch.fired else "fired"

    assert await session() == "ended normally"
    assert consumer.seen >= 20


async def test_a_cancellation_from_outside_is_not_turned_into_a_kafka_error() -> None:
    entered = asyncio.Event()

    async def session() -> None:
        async with GroupWatch(FakeConsumer(FakeCoordinator()), "postgres-0", deadline_s=60, poll_s=0.01):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(session())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
