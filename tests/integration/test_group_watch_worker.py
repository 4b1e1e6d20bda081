"""A store consumer whose Kafka consumer is left stuck rejoining its group (aiokafka issue #1154, seen once
in CI after a broker restart: no heartbeat, no log, no error, every transaction waiting on that store)
starts a new session and goes on applying commands.

The stuck state is made the way aiokafka reaches it: the group coordinator is asked to rejoin and its join
never completes (its `ensure_active_group` waits for ever)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from workers import ConsumersMade, OutcomesSeen, closed, leave_stuck, publishing, running, send_commands

from consumers import worker as worker_module
from consumers.postgres import PostgresParticipant
from consumers.worker import StoreWorker
from polycommit import operations as ops
from polycommit.bus import Publisher, make_consumer
from polycommit.config import Settings
from polycommit.events import StepOutcome, store_command

TABLE = "group_watch_rows"
pytestmark = pytest.mark.servers


async def test_a_consumer_stuck_rejoining_its_group_gets_a_new_session_and_applies_what_comes(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumers = ConsumersMade(make_consumer)
    monkeypatch.setattr(worker_module, "make_consumer", consumers)
    participant = PostgresParticipant(topics)
    await participant.start()
    async with participant.pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer)")
    outcomes = OutcomesSeen()
    worker = StoreWorker(topics, participant, on_batch=outcomes)
    worker.rejoin_deadline_s = 2.0

    async def apply_one(publisher: Publisher, key: str) -> StepOutcome:
        tx_id = f"watch-{key}"
        command = store_command(tx_id, 0, "EXECUTE", ops.upsert_row(TABLE, {"id": key}, {"v": 1}))
        await send_commands(publisher, topics, "postgres", [command])
        return await outcomes.of(tx_id)

    try:
        async with running(worker) as task, publishing(topics) as publisher:
            assert (await apply_one(publisher, uuid.uuid4().hex))["status"] == "APPLIED"
            stuck = leave_stuck(consumers.made[0], monkeypatch)
            await asyncio.wait_for(consumers.second_session.wait(), 60)  # the watch ended the stuck session
            assert (await apply_one(publisher, uuid.uuid4().hex))["status"] == "APPLIED"
            assert worker.stats.restarts == 1
            # The stuck consumer was stopped, not abandoned: its coordination task was cancelled first, so its
            # stop did not wait out STOP_DEADLINE_S for a task that never ends, and it closed its connections.
            assert worker.stats.abandoned_consumers == 0
            assert stuck._coordination_task.cancelled()
            assert closed(consumers.made[0])
            assert len(consumers.made) == 2 and not consumers.made[1]._coordinator._rejoin_needed_fut.done()
            assert not task.done()
    finally:
        await participant.close()
