"""The benchmark's two baselines: the same writes made straight to the stores, with no coordination.

- batched: the way the consumers batch them (one PostgreSQL transaction, one Qdrant upsert call and one
  Neo4j UNWIND per batch): the physical limit of this machine;
- per call: what a user writes by hand, one call per store per transaction at the same concurrency
  (an asyncpg upsert from a pool, a Qdrant upsert of one point, a Neo4j MERGE in its own session).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from polycommit import operations as ops
from polycommit.config import Settings
from polycommit.tooling.bench_workload import BATCH, COLLECTION, LABEL, UPSERT_SQL, Write, keep_in_flight

MERGE_ONE = f"MERGE (n:{LABEL} {{id: $id}}) SET n.v = $v"
MERGE_ROWS = f"UNWIND $rows AS r MERGE (n:{LABEL} {{id: r.id}}) SET n.v = r.v"
POOL_MAX = 64  # asyncpg connections of the per-call baseline (a user's pool; PostgreSQL allows 100)


def _point(write: Write) -> dict[str, Any]:
    return {ops.point_id(write.key): {"vector": write.vector, "payload": {"v": write.value}}}


async def batched(settings: Settings, qdrant: Any, neo4j: Any, items: Sequence[Write]) -> float:
    """The writes in batches of BATCH, the three stores side by side; returns elapsed seconds."""
    batches = [items[i : i + BATCH] for i in range(0, len(items), BATCH)]
    conn = await asyncpg.connect(settings.postgres.dsn)

    async def postgres() -> None:
        for batch in batches:
            async with conn.transaction():
                await conn.executemany(UPSERT_SQL, [(w.key, w.value) for w in batch])

    async def vectors() -> None:
        for batch in batches:
            points = {pid: data for w in batch for pid, data in _point(w).items()}
            await qdrant.upsert(COLLECTION, points)

    async def graph() -> None:
        for batch in batches:
            async with neo4j.session() as session:
                rows = [{"id": w.key, "v": w.value} for w in batch]
                await session.execute_write(lambda tx, rows: tx.run(MERGE_ROWS, rows=rows), rows)

    started = time.perf_counter()
    try:
        await asyncio.gather(postgres(), vectors(), graph())
    finally:
        await conn.close()
    return time.perf_counter() - started


async def per_call(
    settings: Settings, qdrant: Any, neo4j: Any, items: Sequence[Write], concurrency: int
) -> tuple[list[float], float]:
    """One call per store per transaction, `concurrency` transactions in flight; latencies (ms), seconds."""
    pool = await asyncpg.create_pool(settings.postgres.dsn, min_size=1, max_size=min(concurrency, POOL_MAX))
    latencies: list[float] = []

    async def one(write: Write) -> None:
        started = time.perf_counter()
        async with pool.acquire() as conn:
            await conn.execute(UPSERT_SQL, write.key, write.value)
        await qdrant.upsert(COLLECTION, _point(write))
        async with neo4j.session() as session:
            await session.execute_write(lambda tx: tx.run(MERGE_ONE, id=write.key, v=write.value))
        latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    try:
        await keep_in_flight(items, concurrency, one)
    finally:
        await pool.close()
    return latencies, time.perf_counter() - started
