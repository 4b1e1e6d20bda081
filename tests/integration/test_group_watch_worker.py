"""A store consumer whose Kafka consumer is left stuck rejoining its group (aiokafka issue #1154, seen once
in CI after a broker restart: no heartbeat, no log, no error, every transaction waiting on that store)
starts a new session and goes on applying commands.

The stuck state is made the way aiokafka reaches it: the group coordinator is asked to rejoin and its join
never completes (its `ensure_active_group` waits for ever)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from consumers import worker as worker_module
from consumers.postgres import PostgresParticipant
from consumers.worker import StoreWorker
from polycommit import operations as ops
from polycommit.bus import Outgoing, Publisher, topics_for
from polycommit.bus import make_consumer as real_make_consumer
from polycommit.config import Settings
from polycommit.events import StepOutcome, store_command

TABLE = "group_watch_rows"
pytestmark = pytest.mark.servers


async def never_joins(*args: Any, **kwargs: Any) -> None:
    await asyncio.Event().wait()


async def test_a_consumer_stuck_rejoining_its_group_gets_a_new_session_and_applies_what_comes(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []
    second_session = asyncio.Event()

    def recording_make_consumer(*args: Any, **kwargs: Any) -> Any:
        made.append(real_make_consumer(*args, **kwargs))
        if len(made) == 2:
            second_session.set()
        return made[-1]

    monkeypatch.setattr(worker_module, "make_consumer", recording_make_consumer)
    participant = PostgresParticipant(topics)
    await participant.start()
    async with participant.pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer)")
    seen: dict[str, StepOutcome] = {}
    arrived = asyncio.Event()

    def on_batch(outcomes: list[StepOutcome]) -> None:
        seen.update((o["tx_id"], o) for o in outcomes)
        arrived.set()

    worker = StoreWorker(topics, participant, on_batch=on_batch)
    worker.rejoin_deadline_s = 2.0
    stop, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(worker.run(stop, ready))
    publisher = Publisher(topics)
    await publisher.start()
    command_topic = topics_for(topics).commands("postgres")

    async def apply_one(key: str) -> StepOutcome:
        tx_id = f"watch-{key}"
        command = store_command(tx_id, 0, "EXECUTE", ops.upsert_row(TABLE, {"id": key}, {"v": 1}))
        await publisher.publish_and_wait([Outgoing(command_topic, tx_id, "StoreCommand", command)])
        while tx_id not in seen:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 60)
        return seen[tx_id]

    try:
        await asyncio.wait_for(ready.wait(), 60)
        assert (await apply_one(uuid.uuid4().hex))["status"] == "APPLIED"
        stuck = made[0]._coordinator
        monkeypatch.setattr(stuck, "ensure_active_group", never_joins)
        stuck.request_rejoin()  # what a heartbeat failing against a restarted broker does
        await asyncio.wait_for(second_session.wait(), 60)  # the watch ended the stuck session
        assert (await apply_one(uuid.uuid4().hex))["status"] == "APPLIED"
        assert worker.stats.restarts == 1
        # The stuck consumer was stopped, not abandoned: its coordination task was cancelled first, so its
        # stop did not wait out STOP_DEADLINE_S for a task that never ends, and it closed its connections.
        assert worker.stats.abandoned_consumers == 0
        assert made[0]._coordinator._coordination_task.cancelled()
        assert not any(conn.connected() for conn in made[0]._client._conns.values())
        assert len(made) == 2 and not made[1]._coordinator._rejoin_needed_fut.done()  # the new member joined
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await publisher.stop()
        await participant.close()
