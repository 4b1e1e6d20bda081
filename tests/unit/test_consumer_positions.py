"""The group's copy of the coordinator's input positions (orchestrator/consumer_positions.py): made off the
loop, only of committed positions of assigned partitions, late rather than in the way of a session's end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from orchestrator import consumer_positions
from orchestrator.consumer_positions import ConsumerPositions
from orchestrator.positions import GROUP_COPY_MS, InputPositions, position_record

OWNED, GIVEN_UP = TopicPartition("p.intents", 0), TopicPartition("p.intents", 1)


class FakeConsumer:
    """Assigned OWNED; its commit answers when `answer` is set (never, by default), or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.answer = asyncio.Event()
        self.fail = fail
        self.asked: list[dict[TopicPartition, int]] = []
        self.committed: list[dict[TopicPartition, int]] = []
        self.sought: dict[TopicPartition, int] = {}
        self.reached = asyncio.Event()  # a commit was sent

    def assignment(self) -> set[TopicPartition]:
        return {OWNED}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought[tp] = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.asked.append(offsets)
        self.reached.set()
        if self.fail:
            raise CommitFailedError("the group rebalanced")
        await self.answer.wait()
        self.committed.append(offsets)


def attached(consumer: Any) -> ConsumerPositions:
    positions = InputPositions()
    positions.restored([position_record(OWNED, 5), position_record(GIVEN_UP, 7)])
    inputs = ConsumerPositions(positions)
    inputs.consumer = consumer
    return inputs


async def test_restored_positions_move_only_the_assigned_partitions() -> None:
    consumer = FakeConsumer()
    attached(consumer).seek_restored()
    assert consumer.sought == {OWNED: 5}


async def test_a_copy_is_of_assigned_partitions_and_one_at_a_time() -> None:
    consumer = FakeConsumer()
    inputs = attached(consumer)
    inputs.maybe_copy(0)
    inputs.positions.committed[OWNED] = 9
    inputs.maybe_copy(GROUP_COPY_MS)  # the first one has not answered: no second one
    await consumer.reached.wait()
    assert consumer.asked == [{OWNED: 5}]
    consumer.answer.set()
    await inputs.close(final=True)  # the running copy ends, then what is left is copied
    assert consumer.committed == [{OWNED: 5}, {OWNED: 9}]
    assert inputs.positions.uncopied() == {GIVEN_UP: 7}  # not assigned here: its new owner copies it


async def test_a_failed_copy_is_late_not_lost() -> None:
    consumer = FakeConsumer(fail=True)
    inputs = attached(consumer)
    inputs.maybe_copy(0)
    await consumer.reached.wait()
    await inputs.close(final=True)  # the stop's last copy tries again, and fails the same way
    assert consumer.asked == [{OWNED: 5}, {OWNED: 5}] and OWNED in inputs.positions.uncopied()


async def test_a_session_that_failed_does_not_wait_for_an_unanswered_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_positions, "FINAL_COPY_S", 0.05)
    consumer = FakeConsumer()  # a group coordinator that is away: aiokafka retries for as long
    inputs = attached(consumer)
    inputs.maybe_copy(0)
    await consumer.reached.wait()
    await asyncio.wait_for(inputs.close(final=False), 1)  # cancelled, not awaited
    inputs.maybe_copy(GROUP_COPY_MS)
    await asyncio.wait_for(inputs.close(final=True), 1)  # a clean stop waits FINAL_COPY_S at most
    assert consumer.committed == []
