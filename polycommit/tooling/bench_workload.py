"""The benchmark's workload: three writes per transaction (a PostgreSQL upsert, a Qdrant upsert, a Neo4j
MERGE) on keys of its own, the saga that makes them, and the stores' schema for them.

Shared by `polycommit bench`, its baselines and read-back, `polycommit chaos` and the fault tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.config import Settings
from polycommit.tooling.runtime import participant_for
from polycommit.tooling.workload import embed

TABLE = "bench_rows"
COLLECTION = "bench"
LABEL = "BenchNode"
DIMENSIONS = 16
BATCH = 500
UPSERT_SQL = f"INSERT INTO {TABLE} (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"

T = TypeVar("T")


@dataclass(frozen=True)
class Write:
    """The three writes of one benchmark transaction."""

    key: str
    value: int
    vector: list[float]


def writes(run: str, count: int) -> list[Write]:
    return [Write(f"{run}-{i}", i, embed(f"{run}-{i}", DIMENSIONS)) for i in range(count)]


def saga_of(write: Write, *, name: str = "bench", retries: int = 0, timeout: float = 0.0, mode: str = "saga") -> Saga:
    """The three writes as one saga (`mode="saga-unlocked"`: with no locks; `mode="2pc"`: one two-phase commit);
    `retries` and `timeout` apply to each step (0: the client's defaults)."""
    saga = Saga(name, locks=mode != "saga-unlocked")
    if mode == "2pc":
        saga.consistency = "STRONG"
    for operation in (
        ops.upsert_row(TABLE, {"id": write.key}, {"v": write.value}),
        ops.upsert_points(COLLECTION, [ops.point(write.key, write.vector, {"v": write.value})]),
        ops.merge_node(LABEL, {"id": write.key}, {"v": write.value}),
    ):
        saga.step(operation, retries=retries, timeout=timeout)
    return saga


async def keep_in_flight(items: Iterable[T], concurrency: int, run: Callable[[T], Awaitable[None]]) -> None:
    """`run` each item, `concurrency` at a time: each of that many lanes takes the next item when it is free."""
    queue = iter(items)

    async def lane() -> None:
        for item in queue:
            await run(item)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def prepare(settings: Settings) -> None:
    """Table, collection and node key of the workload; run before any consumer holds the Edge storage."""
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer NOT NULL)")
    finally:
        await conn.close()
    async with stores(settings) as (qdrant, neo4j):
        await qdrant.ensure_collection(COLLECTION, DIMENSIONS)
        await neo4j.ensure_node_key(LABEL, ["id"])


@contextlib.asynccontextmanager
async def stores(settings: Settings, *, with_qdrant: bool = True) -> AsyncIterator[tuple[Any, Any]]:
    """The Qdrant and Neo4j participants, started (their `.backend` and `.driver` reach the stores); without
    Qdrant (None in its place) where another process holds its Edge storage, which allows one opener."""
    qdrant = participant_for("qdrant", settings) if with_qdrant else None
    neo4j = participant_for("neo4j", settings)
    if qdrant is not None:
        await qdrant.start()
    try:
        await neo4j.start()
        yield qdrant, neo4j
    finally:
        if qdrant is not None:
            await qdrant.close()
        await neo4j.close()
