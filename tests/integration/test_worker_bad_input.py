"""Bad raw SQL through a real PostgreSQL consumer on the real Kafka (issue 9, defect 2).

Non-JSON params once killed the consumer process (and the record came back to kill it again); a wrong
parameter count was taken for "store unavailable" and its batch retried forever. Both must be a typed,
non-retriable failure of that step and a dead letter, while the batch's other commands apply.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from workers import publishing, running, send_commands

from consumers.postgres import PostgresParticipant
from consumers.worker import StoreWorker
from polycommit import operations as ops
from polycommit.bus import read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.events import Operation, StepOutcome, store_command

TABLE = "worker_bad_input_rows"
pytestmark = pytest.mark.servers


def raw(statement: str, params: str) -> Operation:
    return {**ops.sql(statement), "params": params}


async def dead_letters_of(settings: Settings, tx_ids: set[str]) -> dict[str, str]:
    """error_class of each dead letter whose transaction is one of `tx_ids`."""
    codec, found = default_codec(), {}

    def handle(record: Any) -> None:
        try:
            letter = codec.decode(record.value).record
        except CodecError:
            return
        if letter.get("tx_id") in tx_ids:
            found[letter["tx_id"]] = letter["error_class"]

    await read_topic(settings, topics_for(settings).dead_letters, handle)
    return found


async def test_bad_raw_sql_parameters_fail_alone_become_dead_letters_and_the_consumer_goes_on(
    topics: Settings,
) -> None:
    participant = PostgresParticipant(topics)
    await participant.start()
    async with participant.pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer)")
    update = f"UPDATE {TABLE} SET v = $1 WHERE id = $2"
    good_key, later_key = uuid.uuid4().hex, uuid.uuid4().hex
    steps = {
        "good": ops.upsert_row(TABLE, {"id": good_key}, {"v": 1}),
        "non-json": raw(update, "not json"),
        "too few": raw(update, json.dumps([1])),
        "later": ops.upsert_row(TABLE, {"id": later_key}, {"v": 2}),
    }
    tx_ids = {name: f"bad-input-{name}-{uuid.uuid4().hex[:8]}" for name in steps}
    seen: dict[str, StepOutcome] = {}
    all_seen = asyncio.Event()

    def on_batch(outcomes: list[StepOutcome]) -> None:
        seen.update((o["tx_id"], o) for o in outcomes if o["tx_id"] in tx_ids.values())
        if len(seen) == len(tx_ids):
            all_seen.set()

    worker = StoreWorker(topics, participant, on_batch=on_batch)
    async with running(worker) as task, publishing(topics) as publisher:
        commands = [store_command(tx_ids[name], 0, "EXECUTE", op) for name, op in steps.items()]
        await send_commands(publisher, topics, "postgres", commands)
        try:
            await asyncio.wait_for(all_seen.wait(), 60)
        except TimeoutError:
            pytest.fail(f"outcomes seen for {sorted(seen)} only; the worker is {task}")
        assert not task.done()  # the consumer is still up
        statuses = {name: seen[tx]["status"] for name, tx in tx_ids.items()}
        assert statuses == {"good": "APPLIED", "non-json": "FAILED", "too few": "FAILED", "later": "APPLIED"}
        for name in ("non-json", "too few"):
            error = seen[tx_ids[name]]["error"]
            assert error is not None and error["error_class"] == "InvalidOperationError" and not error["retriable"]
        assert worker.stats.restarts == 0
        bad = {tx_ids["non-json"], tx_ids["too few"]}
        assert await dead_letters_of(topics, bad) == dict.fromkeys(bad, "InvalidOperationError")
        assert await participant.read_row(TABLE, {"id": good_key}) == {"id": good_key, "v": 1}
        assert await participant.read_row(TABLE, {"id": later_key}) == {"id": later_key, "v": 2}
