"""Optimistic concurrency end to end on the real servers: read with versions, write with expected versions.

A counter is kept three times, as a PostgreSQL row value, a Qdrant point payload and a Neo4j node
property; an increment reads all three (with their versions) through the SDK and writes each plus one,
expecting the versions it read. Concurrent increments run as two-phase commits: the coordinator's locks
make each vote-and-commit atomic, and a stale vote aborts the whole transaction. (Concurrent *sagas* that
compensate after a partial write can still undo each other's work until sagas hold locks: issue 11.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from runtimes import reading_client, started_runtime

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.client import Coordinator, TransactionResult
from polycommit.config import Settings
from polycommit.events import Consistency
from polycommit.occ import retry_on_conflict
from polycommit.reads import Versioned
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers

POLICY = SagaPolicy(default_timeout_ms=20_000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
TABLE = "occ_counters"
COLLECTION = "occ_counters"
LABEL = "OccCounter"
VECTOR = [1.0, 0.0]


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    table = f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, n integer NOT NULL)"
    async with started_runtime(
        topics, tables=[table], collection=(COLLECTION, len(VECTOR)), policy=POLICY, batch_size=200
    ) as rt:
        yield rt


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with reading_client(runtime, timeout=120) as coordinator:
        yield coordinator


def count(read: Versioned) -> int:
    return int(read.value["n"]) if read.value is not None else 0


async def read_all(client: Coordinator, key: str) -> tuple[Versioned, Versioned, Versioned]:
    reads = client.reads
    return (
        await reads.read_row(TABLE, {"id": key}),
        await reads.read_point(COLLECTION, key),
        await reads.read_node(LABEL, {"id": key}),
    )


async def increment(
    client: Coordinator, key: str, consistency: Consistency = "STRONG", *, after_read: asyncio.Barrier | None = None
) -> TransactionResult:
    """Read the counter in all three stores, then write each plus one, expecting the versions read."""
    async with client.transaction(name="increment", consistency=consistency) as tx:
        row = await tx.postgres.get(TABLE, {"id": key})
        point = await tx.qdrant.retrieve(COLLECTION, key)
        node = await tx.neo4j.get_node(LABEL, {"id": key})
        if after_read is not None:
            await after_read.wait()  # every writer has read the same versions before anyone writes
        tx.postgres.upsert(TABLE, {"id": key}, {"n": count(row) + 1}, expected_version=row.version)
        payload = {"n": count(point) + 1}
        tx.qdrant.upsert(COLLECTION, [ops.point(key, VECTOR, payload)], expected_version=point.version)
        tx.neo4j.merge_node(LABEL, {"id": key}, {"n": count(node) + 1}, expected_version=node.version)
    assert tx.result is not None
    return tx.result


async def counts(client: Coordinator, key: str) -> list[tuple[int, int]]:
    """(value, version) of the counter in PostgreSQL, Qdrant, Neo4j."""
    return [(count(r), r.version) for r in await read_all(client, key)]


async def test_concurrent_increments_with_retry_on_conflict_end_at_the_exact_count(client: Coordinator) -> None:
    # Each committed increment costs a round in which every contender reads, locks and votes in turn:
    # 20 workers x 10 increments pass as well, in ~12 minutes on the shared 2-core machine.
    key, workers, each = f"c-{uuid.uuid4().hex[:8]}", 10, 5

    async def worker() -> list[TransactionResult]:
        return [
            await retry_on_conflict(lambda: increment(client, key), attempts=200, backoff=0.01, max_backoff=0.5)
            for _ in range(each)
        ]

    results = [r for batch in await asyncio.gather(*(worker() for _ in range(workers))) for r in batch]
    assert [r.status for r in results] == ["committed"] * (workers * each), {r.error for r in results if not r.ok}
    # Every committed increment wrote each store once (one version each), and no aborted one wrote anything.
    assert await counts(client, key) == [(workers * each, workers * each)] * 3


@pytest.mark.parametrize("consistency", ["STRONG", "EVENTUAL"])
async def test_without_retries_the_conflicts_surface_as_typed_results(
    client: Coordinator, consistency: Consistency
) -> None:
    key, writers = f"c-{uuid.uuid4().hex[:8]}", 8
    assert (await increment(client, key, consistency)).ok
    barrier = asyncio.Barrier(writers)
    results = await asyncio.gather(*(increment(client, key, consistency, after_read=barrier) for _ in range(writers)))
    wins = [r for r in results if r.ok]
    conflicts = [r for r in results if r.error_class == "VersionConflict"]
    assert len(wins) + len(conflicts) == writers, [(r.status, r.error) for r in results]
    # All read the same versions: the first to write wins, every other one finds its version moved on.
    assert len(wins) == 1 and conflicts
    expected_status = "aborted" if consistency == "STRONG" else "compensated"
    assert {r.status for r in conflicts} == {expected_status}
    assert [value for value, _ in await counts(client, key)] == [1 + len(wins)] * 3


async def test_a_stale_version_in_one_store_aborts_a_strong_transaction_everywhere(client: Coordinator) -> None:
    key = f"c-{uuid.uuid4().hex[:8]}"
    assert (await increment(client, key)).ok
    assert (await increment(client, key)).ok
    before = await counts(client, key)
    assert before == [(2, 2)] * 3
    async with client.transaction(name="stale", consistency="STRONG") as tx:
        tx.postgres.upsert(TABLE, {"id": key}, {"n": 50}, expected_version=2)
        tx.qdrant.upsert(COLLECTION, [ops.point(key, VECTOR, {"n": 50})], expected_version=1)  # stale
        tx.neo4j.merge_node(LABEL, {"id": key}, {"n": 50}, expected_version=2)
    assert tx.result is not None
    assert tx.result.status == "aborted" and tx.result.error_class == "VersionConflict", tx.result
    assert "expected version 1, found 2" in (tx.result.error or "")
    assert await counts(client, key) == before  # nothing of it is visible, and no version moved


async def test_a_saga_with_a_stale_version_compensates_its_earlier_steps(client: Coordinator) -> None:
    key = f"c-{uuid.uuid4().hex[:8]}"
    assert (await increment(client, key, "EVENTUAL")).ok
    async with client.transaction(name="stale saga") as tx:
        tx.postgres.upsert(TABLE, {"id": key}, {"n": 70}, expected_version=1)
        tx.neo4j.merge_node(LABEL, {"id": key}, {"n": 70}, expected_version=1)
        tx.qdrant.upsert(COLLECTION, [ops.point(key, VECTOR, {"n": 70})], expected_version=0)  # stale
    result = tx.result
    assert result is not None
    assert result.status == "compensated" and result.error_class == "VersionConflict", result
    assert [s.status for s in result.steps] == ["compensated", "compensated", "failed"]
    assert (result.steps[2].error or "").startswith("VersionConflict:")
    # Values restored; a compensation is a write of its own, so the two compensated keys moved on twice.
    assert await counts(client, key) == [(1, 3), (1, 1), (1, 3)]


async def test_reads_see_absent_keys_at_version_zero(client: Coordinator) -> None:
    key = f"c-{uuid.uuid4().hex[:8]}"
    reads: list[Any] = list(await read_all(client, key))
    assert [(r.value, r.version, r.exists) for r in reads] == [(None, 0, False)] * 3
