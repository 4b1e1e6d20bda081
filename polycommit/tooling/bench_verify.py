"""Read a benchmark run's writes back from the three stores: a transaction counts as `verified` when all
three stores hold its value, whatever the coordinator reported."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from polycommit import operations as ops
from polycommit.config import Settings
from polycommit.tooling.bench_workload import COLLECTION, LABEL, TABLE, Write

CHUNK = 5000  # keys per read-back query


@dataclass(frozen=True)
class Verification:
    """How many transactions the stores confirm, and per store how many writes are missing or differ."""

    verified: int
    missing: dict[str, int] = field(default_factory=dict)
    checked: tuple[str, ...] = ("postgres", "qdrant", "neo4j")


def verify(expected: Sequence[Write], found: Mapping[str, Mapping[str, Any]]) -> Verification:
    """Compare each write's value with what each store in `found` (store -> key -> value) holds."""
    missing = {store: 0 for store in found}
    verified = 0
    for write in expected:
        ok = True
        for store, values in found.items():
            if values.get(write.key) != write.value:
                missing[store] += 1
                ok = False
        verified += ok
    return Verification(verified, missing, tuple(found))


async def read_back(settings: Settings, items: Sequence[Write], qdrant: Any | None, neo4j: Any) -> Verification:
    """Read every write of `items` from the stores (Qdrant only when its backend is reachable here)."""
    return verify(items, await read_values(settings, [w.key for w in items], qdrant, neo4j))


async def read_values(
    settings: Settings, keys: Sequence[str], qdrant: Any | None, neo4j: Any
) -> dict[str, dict[str, Any]]:
    """store -> key -> the value `v` it holds for each of `keys` (absent keys are left out)."""
    found: dict[str, dict[str, Any]] = {"postgres": {}, "neo4j": {}}
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        for chunk in _chunks(keys):
            rows = await conn.fetch(f"SELECT id, v FROM {TABLE} WHERE id = ANY($1::text[])", chunk)
            found["postgres"].update((row["id"], row["v"]) for row in rows)
    finally:
        await conn.close()
    async with neo4j.session() as session:
        for chunk in _chunks(keys):
            result = await session.run(f"MATCH (n:{LABEL}) WHERE n.id IN $ids RETURN n.id AS id, n.v AS v", ids=chunk)
            found["neo4j"].update([(record["id"], record["v"]) async for record in result])
    if qdrant is not None:
        by_point = {ops.point_id(key): key for key in keys}
        found["qdrant"] = {}
        for chunk in _chunks(list(by_point)):
            points = await qdrant.retrieve(COLLECTION, chunk, with_vectors=False)
            found["qdrant"].update((by_point[pid], data["payload"].get("v")) for pid, data in points.items())
    return found


def _chunks(values: Sequence[str]) -> list[list[str]]:
    return [list(values[i : i + CHUNK]) for i in range(0, len(values), CHUNK)]
