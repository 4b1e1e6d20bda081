"""Batched reads, from the three stores themselves, of the applied-step markers and the data the checker
expects: the checker's only I/O.

Qdrant Edge admits one opener per storage path: the Qdrant reads go through a participant handed in (the
checker's own, or that of a runtime in this process).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from neo4j import AsyncGraphDatabase

from consumers.neo4j import MARKER_LABEL
from consumers.postgres import MARKER_TABLE
from consumers.qdrant import MARKERS, QdrantParticipant, marker_point_id
from polycommit.config import Settings
from polycommit.tooling.checker.expectations import Expect, frozen
from polycommit.tooling.checker.leftovers import Scope

CHUNK = 2000


@dataclass(frozen=True)
class SeenMarker:
    pending: bool = False  # Qdrant: written ahead of its effect, never confirmed
    at: datetime.datetime | None = None  # PostgreSQL: the committing transaction's start
    before: str | None = None  # the before-image the step recorded with its marker


MarkerKey = tuple[str, int, str]  # (tx_id, step_index, action)


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _tick(identifier: str) -> str:
    return "`" + identifier.replace("`", "``") + "`"


def _keys_by_target(expects: Sequence[Expect]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Each distinct key once per target: several transactions may write one key, and a key read twice
    would look like a duplicate row or node."""
    groups: dict[tuple[Any, ...], dict[Any, dict[str, Any]]] = {}
    for e in expects:
        groups.setdefault(e.where, {})[frozen(e.key)] = e.key
    return {where: list(keys.values()) for where, keys in groups.items()}


class Stores:
    """Batched reads of markers and data from the three stores."""

    def __init__(self, settings: Settings, qdrant: QdrantParticipant) -> None:
        self.settings = settings
        self.qdrant = qdrant

    # markers

    async def postgres_markers(self, tx_ids: Sequence[str]) -> dict[MarkerKey, SeenMarker]:
        found: dict[MarkerKey, SeenMarker] = {}
        if not tx_ids:
            return found
        conn = await asyncpg.connect(self.settings.postgres.dsn)
        try:
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", MARKER_TABLE)
            if not exists:
                return found
            for chunk in _chunks(tx_ids):
                rows = await conn.fetch(
                    f"SELECT tx_id, step_index, action, applied_at, before_image::text AS before FROM {MARKER_TABLE} "
                    "WHERE tx_id = ANY($1::text[])",
                    list(chunk),
                )
                for r in rows:
                    seen = SeenMarker(at=r["applied_at"], before=r["before"])
                    found[(r["tx_id"], r["step_index"], r["action"])] = seen
        finally:
            await conn.close()
        return found

    async def neo4j_markers(self, wanted: Sequence[MarkerKey]) -> dict[MarkerKey, SeenMarker]:
        found: dict[MarkerKey, SeenMarker] = {}
        if not wanted:
            return found
        by_id = {f"{tx}/{step}/{action}": (tx, step, action) for tx, step, action in wanted}
        query = f"UNWIND $ids AS id MATCH (m:{MARKER_LABEL} {{id: id}}) RETURN m.id AS id, m.before AS before"
        for records in await self._neo4j_reads([(query, {"ids": list(chunk)}) for chunk in _chunks(list(by_id))]):
            for record in records:
                found[by_id[record["id"]]] = SeenMarker(before=record["before"])
        return found

    async def qdrant_markers(self, wanted: Sequence[MarkerKey]) -> dict[MarkerKey, SeenMarker]:
        found: dict[MarkerKey, SeenMarker] = {}
        if not wanted or await self.qdrant.backend.collection_info(MARKERS) is None:
            return found
        by_point = {marker_point_id(f"{tx}/{step}/{action}"): (tx, step, action) for tx, step, action in wanted}
        for chunk in _chunks(list(by_point)):
            points = await self.qdrant.backend.retrieve(MARKERS, list(chunk), with_vectors=False)
            for point_id, point in points.items():
                payload = point["payload"]
                seen = SeenMarker(pending=bool(payload.get("pending")), before=payload.get("before"))
                found[by_point[point_id]] = seen
        return found

    # data

    async def rows(self, expects: Sequence[Expect]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
        """(table, key columns, frozen key) -> every row under that key (as JSON), for the expected keys."""
        found: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        groups = _keys_by_target(expects)
        if not groups:
            return found
        conn = await asyncpg.connect(self.settings.postgres.dsn)
        try:
            for (table, columns), keys in groups.items():
                if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _quote(table)):
                    continue
                using = ", ".join(_quote(c) for c in columns)
                sql = (
                    f"SELECT to_jsonb(t)::text FROM {_quote(table)} t "
                    f"JOIN jsonb_populate_recordset(NULL::{_quote(table)}, $1::jsonb) k USING ({using})"
                )
                for chunk in _chunks(keys):
                    for value in await conn.fetch(sql, json.dumps(list(chunk), default=str)):
                        row = json.loads(value[0])
                        key = {c: row.get(c) for c in columns}
                        found.setdefault((table, columns, frozen(key)), []).append(row)
        finally:
            await conn.close()
        return found

    async def points(self, expects: Sequence[Expect]) -> dict[tuple[str, str], dict[str, Any]]:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        groups: dict[str, list[str]] = {}
        for e in expects:
            groups.setdefault(e.where[0], []).append(e.key)
        for collection, ids in groups.items():
            if await self.qdrant.backend.collection_info(collection) is None:
                continue
            for chunk in _chunks(sorted(set(ids))):
                for point_id, point in (await self.qdrant.read_points(collection, chunk)).items():
                    found[(collection, point_id)] = dict(point)
        return found

    async def nodes(self, expects: Sequence[Expect]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
        """(label, key fields, frozen key) -> the properties of every node under that key."""
        found: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        groups = _keys_by_target(expects)
        reads: list[tuple[str, dict[str, Any]]] = []
        shapes: list[tuple[Any, ...]] = []
        for (label, fields), keys in groups.items():
            pattern = ", ".join(f"{_tick(f)}: k.{_tick(f)}" for f in fields)
            query = f"UNWIND $keys AS k MATCH (n:{_tick(label)} {{{pattern}}}) RETURN properties(n) AS props"
            for chunk in _chunks(keys):
                reads.append((query, {"keys": list(chunk)}))
                shapes.append((label, fields))
        for (label, fields), records in zip(shapes, await self._neo4j_reads(reads), strict=True):
            for record in records:
                props = dict(record["props"])
                found.setdefault((label, fields, frozen({f: props.get(f) for f in fields})), []).append(props)
        return found

    async def _neo4j_reads(self, reads: Sequence[tuple[str, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        if not reads:
            return []
        cfg = self.settings.neo4j
        driver = AsyncGraphDatabase.driver(cfg.uri, auth=(cfg.user, cfg.password), notifications_min_severity="OFF")
        try:
            results: list[list[dict[str, Any]]] = []
            async with driver.session(default_access_mode="READ") as session:
                for query, params in reads:
                    result = await session.run(query, params)
                    results.append(await result.data())
            return results
        finally:
            await driver.close()

    # what no transaction explains

    async def scan_keys(self, scope: Scope) -> list[str]:
        """The key values in a scope's table or label that start with its prefix."""
        pattern = scope.prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        if scope.store == "postgres":
            conn = await asyncpg.connect(self.settings.postgres.dsn)
            try:
                if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _quote(scope.target)):
                    return []
                column = _quote(scope.column)
                sql = f"SELECT t.{column}::text FROM {_quote(scope.target)} t WHERE t.{column}::text LIKE $1"
                return [r[0] for r in await conn.fetch(sql, pattern)]
            finally:
                await conn.close()
        column = _tick(scope.column)
        query = f"MATCH (n:{_tick(scope.target)}) WHERE n.{column} STARTS WITH $prefix RETURN n.{column} AS k"
        (records,) = await self._neo4j_reads([(query, {"prefix": scope.prefix})])
        return [str(r["k"]) for r in records]

    async def prepared_gids(self) -> list[str]:
        """Two-phase commit's prepared transactions (gid `pc_...`) open in this database."""
        conn = await asyncpg.connect(self.settings.postgres.dsn)
        try:
            rows = await conn.fetch(
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'pc\\_%' AND database = current_database()"
            )
            return [r["gid"] for r in rows]
        finally:
            await conn.close()
