"""A coordinator member resumes at the input positions of its changelog (orchestrator/positions.py), on the
real servers, whatever the consumer group's offsets say.

The group's offsets are only a copy, made lazily. These tests leave them where a crash or a zombie could:
- never copied, as after crashes before any copy: a restarted member must fold nothing twice;
- ahead of the changelog, as a fenced zombie's late copy could: the intents never folded must still be.
A changelog without positions (written before they were) resumes at the group's offsets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from runtimes import started_runtime

from orchestrator.consumer_positions import ConsumerPositions
from orchestrator.saga import SagaPolicy
from orchestrator.writer import position_records
from polycommit import operations as ops
from polycommit.bus import Publisher, create_topics, delete_topics, make_admin, topics_for
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.kafka_client import client_security
from polycommit.log_reader import topic_partitions
from polycommit.tooling import workload
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.inspect import changelog, coordinator_backlog
from polycommit.tooling.runtime import Runtime

POLICY = SagaPolicy(default_timeout_ms=30_000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
FIRST, LATER = 12, 5
RESULTS_WITHIN_S = 60  # a member that skipped the intents never answers: fail, not hang

pytestmark = pytest.mark.servers


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="positions", edge_path=tmp_path / "edge")
    await create_topics(run)
    try:
        yield run
    finally:
        await delete_topics(run)


def three_steps() -> Saga:
    doc = f"pos-{uuid.uuid4().hex[:10]}"
    saga = Saga("positions")
    saga.step(ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": doc}))
    saga.step(ops.upsert_points(workload.DOCUMENTS, [ops.point(doc, workload.embed(doc), {"title": doc})]))
    saga.step(ops.merge_node("Document", {"id": doc}, {"title": doc}))
    return saga


Offsets = dict[TopicPartition, int]


async def set_group_offsets(settings: Settings, where: Callable[[Offsets], Offsets]) -> None:
    """Commit the coordinator group's offsets of its intents and outcomes to `where(their end offsets)`: as
    the group's only client, before any member joined (a stopped member is static, and only an empty group
    takes offsets from outside)."""
    topics = topics_for(settings)
    consumer = AIOKafkaConsumer(group_id=f"{settings.topic_prefix}-coordinator", **client_security(settings))
    await consumer.start()
    try:
        tps = [tp for topic in (topics.intents, topics.outcomes) for tp in await topic_partitions(consumer, topic)]
        consumer.assign(tps)
        await consumer.commit(where(await consumer.end_offsets(tps)))
    finally:
        await consumer.stop()


async def group_offsets(settings: Settings) -> Offsets:
    admin = make_admin(settings)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(f"{settings.topic_prefix}-coordinator")
        return {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def changelog_positions(settings: Settings) -> Offsets:
    folded = await changelog(settings)  # what a restore and `polycommit status` read
    assert folded.corrupt_positions == 0
    return {TopicPartition(p["topic"], p["partition"]): p["next_offset"] for p in folded.positions}


async def completed(runtime: Runtime, sagas: int) -> None:
    async with Coordinator(runtime.settings, timeout=60) as client:
        results = await client.execute_many([three_steps() for _ in range(sagas)])
    assert [r.status for r in results] == ["completed"] * sagas, [r.error for r in results]


def folded(runtime: Runtime) -> tuple[int, int]:
    assert runtime.service is not None
    return runtime.service.stats.intents, runtime.service.stats.outcomes


async def test_a_member_that_stops_cleanly_leaves_the_group_at_the_changelog_positions(run: Settings) -> None:
    async with started_runtime(run, policy=POLICY) as runtime:
        await completed(runtime, FIRST)
    positions = await changelog_positions(run)
    assert positions and await group_offsets(run) == positions
    topics = topics_for(run)
    backlog = await coordinator_backlog(run, (await changelog(run)).positions)  # what `polycommit status` shows
    assert backlog == {topics.intents: 0, topics.outcomes: 0}
    async with Coordinator(run, timeout=120) as client:
        for _ in range(LATER):  # no member runs to fold them
            await client.submit(three_steps())
    assert await coordinator_backlog(run, (await changelog(run)).positions) == {
        topics.intents: LATER,
        topics.outcomes: 0,
    }


async def test_a_member_resumes_at_the_changelog_when_the_group_lags(
    run: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(self: ConsumerPositions, offsets: Offsets) -> None:
        """As if every member crashed before it copied anything to the group."""

    monkeypatch.setattr(ConsumerPositions, "_copy", never)
    async with started_runtime(run, policy=POLICY) as runtime:
        await completed(runtime, FIRST)
        assert folded(runtime) == (FIRST, 3 * FIRST)
    assert await group_offsets(run) == {}  # a restart's consumer starts at the beginning of every input
    async with started_runtime(run, policy=POLICY) as runtime:
        await completed(runtime, LATER)
        assert folded(runtime) == (LATER, 3 * LATER)  # nothing read before was folded again


async def test_a_group_offset_ahead_of_the_changelog_is_not_trusted(run: Settings) -> None:
    topics = topics_for(run)
    async with Coordinator(run, timeout=120) as client:
        waiting = [await client.submit(three_steps()) for _ in range(LATER)]
        # The changelog: nothing of the intents folded yet; the group: all of them, as a fenced zombie's late
        # copy could leave it.
        publisher = Publisher(run)
        await publisher.start()
        try:
            unread = {TopicPartition(topics.intents, p): 0 for p in await publisher.partitions(topics.intents)}
            await publisher.publish_and_wait(position_records(topics, unread))
        finally:
            await publisher.stop()
        await set_group_offsets(run, lambda end: end)
        async with started_runtime(run, policy=POLICY) as runtime:
            results = await asyncio.wait_for(asyncio.gather(*waiting), RESULTS_WITHIN_S)
            assert [r.status for r in results] == ["completed"] * LATER
            assert folded(runtime) == (LATER, 3 * LATER)


async def test_a_changelog_without_positions_resumes_at_the_group_offsets(run: Settings) -> None:
    async with Coordinator(run, timeout=120) as client:
        for _ in range(FIRST):  # as if folded by a member that kept its positions in the group
            await client.submit(three_steps())
        await set_group_offsets(run, lambda end: end)
        waiting = [await client.submit(three_steps()) for _ in range(LATER)]
        assert await changelog_positions(run) == {}
        async with started_runtime(run, policy=POLICY) as runtime:
            results = await asyncio.wait_for(asyncio.gather(*waiting), RESULTS_WITHIN_S)
            assert [r.status for r in results] == ["completed"] * LATER
            assert folded(runtime) == (LATER, 3 * LATER)  # the ones before the group's offsets were not read
