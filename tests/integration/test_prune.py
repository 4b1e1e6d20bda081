"""Marker retention on the real servers: `prune` deletes only old markers of ended transactions, in all
three stores, and the coordinator refuses an intent older than the retention."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from test_intent_admission import first_record
from test_operator_commands import cli, resolve_left_stuck

from consumers.qdrant.effects import MARKERS, marker_point_id
from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import Outgoing, Publisher, create_topics, delete_topics, topics_for
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.events import now_ms
from polycommit.tooling import workload
from polycommit.tooling.prune import marker_ids, prune
from polycommit.tooling.runtime import Runtime

POLICY = SagaPolicy(default_timeout_ms=10_000, backoff_base_ms=60_000, backoff_max_ms=120_000, compensation_retries=1)
pytestmark = pytest.mark.servers
LEFT_STUCK: dict[str, int] = {}  # the stuck saga the prune test makes, resolved when the module ends
DAY_MS = 24 * 3600 * 1000


@pytest.fixture(scope="module")
async def prune_topics(topics: Settings) -> AsyncIterator[Settings]:
    """A log of this module's own: prune deletes the markers of every ended transaction of its log, and
    the session's other tests replay their commands from offset 0 and expect those markers to be there."""
    own = dataclasses.replace(topics, topic_prefix=f"{topics.topic_prefix}-prune")
    await create_topics(own, {"intents": 2, "commands.postgres": 2, "commands.neo4j": 2, "commands.qdrant": 1})
    yield own
    await delete_topics(own)


@pytest.fixture(scope="module")
async def runtime(prune_topics: Settings) -> AsyncIterator[Runtime]:
    await workload.prepare_postgres(prune_topics)
    rt = Runtime(prune_topics, policy=POLICY, batch_size=200)
    await rt.start()
    qdrant = rt.workers["qdrant"].participant
    await qdrant.ensure_collection(workload.DOCUMENTS, workload.DIMENSIONS)  # type: ignore[attr-defined]
    yield rt
    await resolve_left_stuck(rt.settings, LEFT_STUCK)
    await rt.stop()


def three_stores(name: str) -> Saga:
    doc = f"d-{uuid.uuid4().hex[:8]}"
    saga = Saga(name)
    saga.step(ops.upsert_row("documents", {"id": doc}, {"title": name}))
    saga.step(ops.upsert_points(workload.DOCUMENTS, [ops.point(doc, [0.1] * workload.DIMENSIONS, {"t": name})]))
    saga.step(ops.merge_node("Document", {"id": doc}, {"title": name}))
    return saga


async def markers(runtime: Runtime, tx_id: str, steps: int) -> dict[str, int]:
    """How many markers of the transaction each store holds."""
    settings = runtime.settings
    ids = marker_ids({tx_id: steps})
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        postgres = await conn.fetchval("SELECT count(*) FROM polycommit_steps WHERE tx_id = $1", tx_id)
    finally:
        await conn.close()
    neo4j = runtime.workers["neo4j"].participant
    records = await neo4j.driver.execute_query(  # type: ignore[attr-defined]
        "UNWIND $ids AS id MATCH (m:PolycommitStep {id: id}) RETURN count(m) AS n", ids=ids
    )
    backend = runtime.workers["qdrant"].participant.backend  # type: ignore[attr-defined]
    qdrant = await backend.retrieve(MARKERS, [marker_point_id(m) for m in ids], with_vectors=False)
    return {"postgres": int(postgres), "neo4j": int(records[0][0]["n"]), "qdrant": len(qdrant)}


async def test_prune_deletes_only_old_markers_of_ended_transactions(runtime: Runtime) -> None:
    async with Coordinator(runtime.settings, timeout=60) as client:
        old = await client.execute(three_stores("old"))
        stuck_saga = three_stores("stuck")
        stuck_saga.step(ops.sql("SELECT 1"), compensate=ops.sql("SELECT 1/0"))
        stuck_saga.step(ops.sql("SELECT * FROM no_such_table_for_prune"))
        stuck = await client.execute(stuck_saga)
        recent = await client.execute(three_stores("recent"))
    LEFT_STUCK[stuck.tx_id] = 3
    assert (old.status, stuck.status, recent.status) == ("completed", "stuck", "completed")
    before = {r.tx_id: await markers(runtime, r.tx_id, len(r.steps)) for r in (old, stuck, recent)}
    assert before[old.tx_id] == before[recent.tx_id] == {"postgres": 1, "neo4j": 1, "qdrant": 1}
    assert all(before[stuck.tx_id].values())
    # A cutoff between the old transaction's end and the recent one's, the stuck one ending in between.
    old_end, recent_end = old.raw["finished_at_ms"], recent.raw["finished_at_ms"]
    cutoff = (old_end + recent_end) // 2
    qdrant = runtime.workers["qdrant"].participant.backend  # type: ignore[attr-defined]
    report = await prune(runtime.settings, recent_end - cutoff, now=recent_end, qdrant=qdrant)
    assert old.tx_id in report["transactions"]
    assert stuck.tx_id not in report["transactions"] and recent.tx_id not in report["transactions"]
    assert await markers(runtime, old.tx_id, len(old.steps)) == {"postgres": 0, "neo4j": 0, "qdrant": 0}
    assert await markers(runtime, stuck.tx_id, len(stuck.steps)) == before[stuck.tx_id]
    assert await markers(runtime, recent.tx_id, len(recent.steps)) == before[recent.tx_id]
    assert all(count >= 1 for count in report["deleted"].values())
    # The CLI: nothing in this session ended a week ago.
    code, shown = await cli(runtime.settings, "prune", "--older-than", "7d", "--json")
    assert code == 0 and shown["transactions"] == [] and shown["deleted"] == {"postgres": 0, "neo4j": 0, "qdrant": 0}


async def test_an_intent_older_than_the_retention_is_refused(runtime: Runtime) -> None:
    settings = runtime.settings
    saga = Saga("from last week").step(ops.sql("SELECT 1"))
    intent: Any = saga.intent("", "test")
    intent["created_at_ms"] = now_ms() - 8 * DAY_MS
    assert settings.marker_retention_ms == 7 * DAY_MS
    publisher = Publisher(settings)
    await publisher.start()
    try:
        await publisher.send(Outgoing(topics_for(settings).intents, saga.tx_id, "TransactionIntent", intent))
    finally:
        await publisher.stop()
    result = await first_record(settings, topics_for(settings).results, saga.tx_id, "result")
    assert result["status"] == "FAILED" and result["error"]["error_class"] == "ExpiredIntentError"
    letter = await first_record(settings, topics_for(settings).dead_letters, saga.tx_id, "dead letter")
    assert letter["error_class"] == "ExpiredIntentError"
    assert [s["status"] for s in result["steps"]] == ["pending"]  # nothing ran
