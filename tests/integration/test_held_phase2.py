"""A phase-2 command PostgreSQL holds (its batch waits for another member's decision) is not committed
past, on the real Kafka and PostgreSQL: a consumer that crashed meanwhile would read it again instead of
waiting for the coordinator's resend. Once the batch settles, both outcomes go out and the offset moves on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from consumers.postgres import PostgresParticipant
from consumers.worker import StoreWorker
from polycommit import operations as ops
from polycommit.bus import Outgoing, Publisher, create_topics, delete_topics, topics_for
from polycommit.config import Settings
from polycommit.events import StepAction, StepOutcome, store_command
from polycommit.tooling import workload
from polycommit.tooling.chaos import run_settings

pytestmark = pytest.mark.servers


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="held", edge_path=tmp_path / "edge")
    await create_topics(run, {"intents": 1, "commands.postgres": 1, "commands.neo4j": 1, "commands.qdrant": 1})
    await workload.prepare_postgres(run)
    yield run
    await delete_topics(run)


async def test_a_held_commit_is_not_committed_past_until_its_batch_settles(run: Settings) -> None:
    a, b = (f"held-{uuid.uuid4().hex[:8]}-{n}" for n in "ab")
    seen: dict[tuple[str, str], StepOutcome] = {}

    def on_batch(outcomes: list[StepOutcome]) -> None:
        seen.update(((o["tx_id"], o["action"]), o) for o in outcomes)

    worker = StoreWorker(run, PostgresParticipant(run), on_batch=on_batch)
    stop, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(worker.run(stop, ready))
    publisher = Publisher(run)
    await publisher.start()
    topic = topics_for(run).commands("postgres")
    partition = TopicPartition(topic, 0)

    async def send(*commands: tuple[str, StepAction]) -> int:
        """Publish the commands in one batch; the offset after them."""
        records = [
            Outgoing(
                topic,
                tx,
                "StoreCommand",
                store_command(tx, 0, action, ops.upsert_row(workload.DOCUMENTS, {"id": tx}, {"title": tx})),
                0,
            )
            for tx, action in commands
        ]
        futures = await publisher.publish(records)
        metadata: Any = (await asyncio.gather(*futures))[-1]
        end = int(metadata.offset) + 1
        await worker.caught_up({partition: end})
        return end

    try:
        await asyncio.wait_for(ready.wait(), 60)
        await send((a, "PREPARE"), (b, "PREPARE"))  # one prepared batch for both
        assert {seen[(a, "PREPARE")]["status"], seen[(b, "PREPARE")]["status"]} == {"PREPARED"}
        held_at = await send((a, "COMMIT")) - 1
        assert (a, "COMMIT") not in seen and len(worker.held) == 1  # waits for b's decision
        assert worker.held.offsets()[partition] == held_at  # a restart reads a's COMMIT again
        end = await send((b, "COMMIT"))
        assert len(worker.held) == 0 and worker.held.offsets()[partition] == end
        assert seen[(b, "COMMIT")]["status"] == "APPLIED"
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await publisher.stop()
