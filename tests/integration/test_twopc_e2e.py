"""Two-phase commit (consistency=STRONG) end to end on the real servers: all three stores commit
together, one refusing participant leaves nothing anywhere, transactions on one key serialize, and a
PostgreSQL participant settles prepared transactions of ours from the decision log when it starts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from runtimes import started_runtime

from consumers.postgres import twophase
from consumers.postgres.participant import PostgresParticipant
from consumers.postgres.settlement import settle_at_start
from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import Outgoing, Publisher, read_topic, topics_for
from polycommit.client import Coordinator, Transaction
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.events import Decision, now_ms
from polycommit.lock_log import expand
from polycommit.tooling import workload
from polycommit.tooling.runtime import Runtime

POLICY = SagaPolicy(default_timeout_ms=5000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    async with started_runtime(topics, policy=POLICY, batch_size=200) as rt:
        yield rt


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with Coordinator(runtime.settings, timeout=60) as coordinator:
        yield coordinator


def strong(doc: str, title: str, *, vector: list[float] | None = None, sql: str | None = None) -> Transaction:
    tx = Transaction(name=f"strong {doc}", consistency="STRONG")
    tx.add(ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": title}))
    point = ops.point(doc, vector or workload.embed(title), {"title": title})
    tx.add(ops.upsert_points(workload.DOCUMENTS, [point]))
    tx.add(ops.merge_node("Document", {"id": doc}, {"title": title}))
    if sql is not None:
        tx.add(ops.sql(sql, [doc], lock_keys=[f"postgres:documents:{doc}"]))
    return tx


async def pg(settings: Settings, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def our_prepared(settings: Settings) -> list[str]:
    space = twophase.space_of(settings.topic_prefix)
    rows = await pg(settings, twophase.PREPARED_GIDS, f"{twophase.GID_PREFIX}{space}_")
    return [r[0] for r in rows]


async def stores_of(runtime: Runtime, doc: str) -> tuple[Any, Any, Any]:
    row = await pg(runtime.settings, "SELECT title FROM documents WHERE id = $1", doc)
    qdrant = runtime.workers["qdrant"].participant
    points = await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(doc)])  # type: ignore[attr-defined]
    node = await runtime.workers["neo4j"].participant.read_node("Document", {"id": doc})  # type: ignore[attr-defined]
    return (row[0]["title"] if row else None), points, node


async def decisions(settings: Settings, tx_id: str) -> list[str]:
    codec = default_codec()
    found: list[str] = []

    def take(record: Any) -> None:
        d = codec.decode_as(record.value, "Decision")
        if d["tx_id"] == tx_id:
            found.append(d["outcome"])

    await read_topic(settings, topics_for(settings).decisions, take)
    return found


async def test_a_strong_transaction_commits_in_all_three_stores(runtime: Runtime, client: Coordinator) -> None:
    doc = f"s-{uuid.uuid4().hex[:8]}"
    tx = strong(doc, "Atomic")
    result = await client.execute(tx)
    assert result.status == "committed", result
    assert [s.status for s in result.steps] == ["committed"] * 3
    title, points, node = await stores_of(runtime, doc)
    assert title == "Atomic" and len(points) == 1 and node is not None and node["title"] == "Atomic"
    markers = await runtime.workers["postgres"].participant.markers_of(tx.tx_id)  # type: ignore[attr-defined]
    assert set(markers) == {"0/EXECUTE"}
    assert await decisions(runtime.settings, tx.tx_id) == ["COMMIT"]
    assert not [g for g in await our_prepared(runtime.settings) if tx.tx_id in g]


@pytest.mark.parametrize("failure", ["wrong vector size", "bad sql"])
async def test_one_refusing_participant_aborts_and_nothing_is_visible(
    runtime: Runtime, client: Coordinator, failure: str
) -> None:
    doc = f"s-{uuid.uuid4().hex[:8]}"
    if failure == "wrong vector size":
        tx = strong(doc, "Never", vector=[0.5, 0.5])
    else:
        tx = strong(doc, "Never", sql="UPDATE documents SET title = 'x' WHERE id = $1 AND 1/0 = 1")
    result = await client.execute(tx)
    assert result.status == "aborted", result
    assert await stores_of(runtime, doc) == (None, {}, None)  # the PG prepare was rolled back
    assert await decisions(runtime.settings, tx.tx_id) == ["ABORT"]
    markers = await runtime.workers["postgres"].participant.markers_of(tx.tx_id)  # type: ignore[attr-defined]
    assert "0/EXECUTE" not in markers and "0/COMPENSATE" in markers  # fenced
    assert not [g for g in await our_prepared(runtime.settings) if tx.tx_id in g]


async def test_two_strong_transactions_on_one_key_serialize(runtime: Runtime, client: Coordinator) -> None:
    doc = f"s-{uuid.uuid4().hex[:8]}"
    first, second = strong(doc, "first"), strong(doc, "second")
    results = await asyncio.gather(client.execute(first), client.execute(second))
    assert [r.status for r in results] == ["committed", "committed"]
    every_key = await lock_events(runtime.settings, {first.tx_id, second.tx_id})
    # One resource's events share a partition (keyed by resource), so their order there is their history.
    resource = every_key[0]["resource"]
    locks = [e for e in every_key if e["resource"] == resource]
    # Exclusive means the two never held the key at once: whoever got it second was granted it only after
    # the other released it (it waited, or, when the first had finished before it asked, simply came later).
    grants = [i for i, e in enumerate(locks) if e["action"] == "GRANTED"]
    assert len(grants) >= 2, locks
    holder, waiter = (
        locks[grants[0]]["tx_id"],
        next(locks[i]["tx_id"] for i in grants[1:] if locks[i]["tx_id"] != locks[grants[0]]["tx_id"]),
    )
    released = next(i for i, e in enumerate(locks) if e["tx_id"] == holder and e["action"] == "RELEASED")
    granted_second = next(i for i in grants if locks[i]["tx_id"] == waiter)
    assert released < granted_second, locks
    # The waiter's PREPAREs went out only after the holder released: its result ends later.
    ends = {r.tx_id: r.raw["finished_at_ms"] for r in results}
    assert ends[waiter] >= ends[holder]
    title, _, node = await stores_of(runtime, doc)
    last = "first" if waiter == first.tx_id else "second"
    assert title == last and node["title"] == last  # the same order in every store


async def lock_events(settings: Settings, tx_ids: set[str]) -> list[dict[str, Any]]:
    codec = default_codec()
    found: list[dict[str, Any]] = []

    def take(record: Any) -> None:
        try:
            events = expand(codec.decode_as(record.value, "LockEvent"))
        except CodecError:
            return  # another test's poison record on the session's lock topic (the detector test's)
        found.extend(dict(e) for e in events if e["tx_id"] in tx_ids)

    await read_topic(settings, topics_for(settings).locks, take)
    return found


async def test_settlement_at_start_commits_by_decision_and_presumes_abort_past_the_window(topics: Settings) -> None:
    await workload.prepare_postgres(topics)
    space = twophase.space_of(topics.topic_prefix)
    committed, abandoned = f"settle-{uuid.uuid4().hex[:8]}", f"settle-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(topics.postgres.dsn)
    try:
        for tx_id in (committed, abandoned):
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO documents (id, title) VALUES ($1, 'prepared')", tx_id)
            await conn.execute(f"PREPARE TRANSACTION '{twophase.gid_of(space, tx_id, 0)}'")
    finally:
        await conn.close()
    decision: Decision = {
        "tx_id": committed,
        "outcome": "COMMIT",
        "participants": ["postgres"],
        "reason": "test",
        "at_ms": now_ms(),
    }
    publisher = Publisher(topics)
    await publisher.start()
    try:
        await publisher.publish_and_wait([Outgoing(topics_for(topics).decisions, committed, "Decision", decision)])
    finally:
        await publisher.stop()
    participant = PostgresParticipant(topics)
    await participant.start()
    try:
        assert participant.settled == [
            {"gid": twophase.gid_of(space, committed, 0), "action": "COMMIT", "why": "COMMIT"}
        ]  # the abandoned one is still inside its window: left to the coordinator
        settled = await settle_at_start(topics, participant.pool, presume_abort_after_ms=0)
        assert settled == [{"gid": twophase.gid_of(space, abandoned, 0), "action": "ROLLBACK", "why": "presumed abort"}]
    finally:
        await participant.close()
    rows = await pg(topics, "SELECT id FROM documents WHERE id = ANY($1::text[])", [committed, abandoned])
    assert [r[0] for r in rows] == [committed]
    assert await our_prepared(topics) == []


async def test_an_interactive_strong_transaction_reads_under_a_lock_and_commits_by_two_phase_commit(
    runtime: Runtime, client: Coordinator
) -> None:
    """SERIALIZABLE reads through the SDK (SHARED locks), writes locked as they are added, then the intent
    is run as a two-phase commit under those locks: committed in all three stores, decided COMMIT."""
    source, doc = f"s-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"
    assert (await client.execute(strong(source, "Source"))).status == "committed"
    scope = client.transaction(name="copy", interactive=True, consistency="STRONG", isolation="SERIALIZABLE")
    async with scope as tx:
        read = await tx.postgres.get(workload.DOCUMENTS, {"id": source})
        assert read.value is not None
        title = f"copy of {read.value['title']}"
        await tx.postgres.upsert(workload.DOCUMENTS, {"id": doc}, {"title": title})
        await tx.qdrant.upsert(workload.DOCUMENTS, [ops.point(doc, workload.embed(title), {"title": title})])
        await tx.neo4j.merge_node("Document", {"id": doc}, {"title": title})
    assert scope.result is not None and scope.result.status == "committed", scope.result
    stored, points, node = await stores_of(runtime, doc)
    assert stored == "copy of Source" and len(points) == 1 and node is not None and node["title"] == stored
    assert await decisions(runtime.settings, scope.tx_id) == ["COMMIT"]
