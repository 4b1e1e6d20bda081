"""Reads for optimistic concurrency: a key's current value with its version, straight from its store.

`await tx.postgres.get(table, key)`, `tx.qdrant.retrieve(collection, id)` and `tx.neo4j.get_node(label,
key)` (or `coordinator.reads.read_row/read_point/read_node`) return a `Versioned`: pass its `version` as
the write's `expected_version`, and the write applies only if nobody wrote the key in between
(polycommit.versioning says where each store keeps versions). The reads take no locks yet: shared locks
at REPEATABLE READ and SERIALIZABLE are a later change (DESIGN.md, isolation).

Each read is consistent with itself: PostgreSQL reads row and version in one statement (one snapshot);
a Qdrant point carries its version in its payload; Neo4j reads the version before the node, so a write
committed in between shows as a newer value with an older version, which can only make the write that
follows conflict, never let it overwrite unseen work.

The connections are the client's own, opened on first use and closed with the client. Qdrant Edge (the
default Qdrant) admits one process per storage path, held by the Qdrant consumer: with Edge the reads
need the consumer's backend handed in (`Coordinator(point_source=...)`, as an in-process runtime can),
or a Qdrant server (`QDRANT_URL`); otherwise `read_point` raises `UnsupportedError` naming why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from polycommit import versioning
from polycommit.config import Settings
from polycommit.errors import (
    InvalidOperationError,
    PolycommitError,
    StoreError,
    StoreUnavailableError,
    UnsupportedError,
)
from polycommit.operations import point_id as point_id_of
from polycommit.parsed import IDENTIFIER, NodeKey, RowOperation, canonical_id, dumps, keys_of

__all__ = ["PointSource", "StoreReads", "Versioned"]

_CONNECTIONS = 8  # per store and client: reads are short, and the servers' connections are shared


@dataclass(frozen=True)
class Versioned:
    """A key as read: its value (row, point payload or node properties; None when absent) and version
    (0: never written by polycommit). `vector` is a point's vector (None for rows and nodes)."""

    value: dict[str, Any] | None
    version: int
    vector: list[float] | None = None

    @property
    def exists(self) -> bool:
        return self.value is not None


class PointSource(Protocol):
    """What the Qdrant read needs: the points that exist among `ids`, by canonical id, each a mapping with
    `vector` and `payload` (the Qdrant participant's backends have this shape)."""

    async def retrieve(
        self, collection: str, ids: Sequence[str], with_vectors: bool = True
    ) -> Mapping[str, Mapping[str, Any]]: ...


def _quote(identifier: str) -> str:
    if not IDENTIFIER.match(identifier):
        raise InvalidOperationError(f"{identifier!r} is not a plain identifier")
    return f'"{identifier}"'


def _row_query(table: str, key: Mapping[str, Any]) -> str:
    """Row and version in ONE statement: one snapshot, so the value is the one the version counts."""
    if not key:
        raise InvalidOperationError(f"a read of {table} needs a non-empty key")
    t = _quote(table)
    match = " AND ".join(f"t.{_quote(k)} = r.{_quote(k)}" for k in key)
    return (
        f"SELECT (SELECT to_jsonb(t)::text FROM jsonb_populate_record(NULL::{t}, $1::jsonb) AS r "
        f"JOIN {t} t ON {match}), "
        f"(SELECT version FROM {versioning.VERSION_TABLE} WHERE resource = $2)"
    )


def _node_query(label: str, key: Mapping[str, Any]) -> str:
    if not key or not all(IDENTIFIER.match(name) for name in (label, *key)):
        raise InvalidOperationError(f"node :{label} {dumps(dict(key))} is not named by plain identifiers")
    fields = ", ".join(f"`{k}`: $key.`{k}`" for k in key)
    return f"OPTIONAL MATCH (n:`{label}` {{{fields}}}) RETURN properties(n) AS props"


_VERSION_QUERY = (
    f"OPTIONAL MATCH (v:{versioning.VERSION_LABEL} {{key: $resource}}) RETURN coalesce(v.version, 0) AS version"
)


class _ServerPoints:
    """Points of a Qdrant server through qdrant-client (imported only when a server is used)."""

    def __init__(self, url: str, api_key: str | None) -> None:
        from qdrant_client import AsyncQdrantClient

        self.client = AsyncQdrantClient(url=url, api_key=api_key)

    async def retrieve(
        self, collection: str, ids: Sequence[str], with_vectors: bool = True
    ) -> dict[str, dict[str, Any]]:
        keys = [int(i) if i.isdigit() else i for i in ids]
        try:
            records = await self.client.retrieve(collection, keys, with_payload=True, with_vectors=with_vectors)
        except Exception as exc:  # qdrant-client raises several unrelated types for "unreachable"
            raise StoreUnavailableError(f"Qdrant read from {collection}: {type(exc).__name__}: {exc}") from exc
        return {canonical_id(r.id): {"vector": r.vector, "payload": dict(r.payload or {})} for r in records}

    async def close(self) -> None:
        await self.client.close()


@contextlib.contextmanager
def _reading(store: str) -> Iterator[None]:
    """A read's failure as a typed error. The store's own refusal, which a new attempt would meet again (an
    unknown table, bad Cypher), is a non-retriable StoreError; anything else (refused or lost connections,
    a server shutting down, a driver left in a broken state by one, a serialization failure) is
    StoreUnavailableError, retriable: nothing of the transaction ran, and `coordinator.run` runs it again
    once the store is back. Seen in `polycommit chaos --mode interactive`: reads during a PostgreSQL restart
    raised asyncpg's own errors (ConnectionRefusedError, ConnectionDoesNotExistError, InternalClientError)
    to the application. Which is which is the store consumers' own reading of their drivers' errors
    (polycommit/postgres_errors.py, neo4j_errors.py)."""
    try:
        yield
    except PolycommitError:
        raise
    except Exception as exc:
        known = _classified(exc)
        if isinstance(known, StoreError) and not known.retriable:
            raise StoreError(f"{store} refused a read: {known}", retriable=False, store=store, code=known.code) from exc
        raise StoreUnavailableError(f"{store} could not be read: {type(exc).__name__}: {exc}") from exc


def _classified(exc: Exception) -> BaseException | None:
    """The driver error as the store consumers read it; None for an error of no store driver (an OSError)."""
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        from polycommit import postgres_errors  # imported on a failure only: reads of one store load one driver

        return None if postgres_errors.unreachable(exc) else postgres_errors.classify(exc)
    if module.startswith("neo4j"):
        from polycommit import neo4j_errors

        return neo4j_errors.classify(exc)
    return None


class StoreReads:
    """The client's reads of the three stores (each connection opened on first use)."""

    def __init__(self, settings: Settings, point_source: PointSource | None = None) -> None:
        self.settings = settings
        self._points = point_source
        self._own_points: _ServerPoints | None = None
        self._pool: Any = None  # asyncpg.Pool
        self._driver: Any = None  # neo4j.AsyncDriver
        self._opening = asyncio.Lock()  # concurrent first reads open one pool, one driver

    async def read_row(self, table: str, key: Mapping[str, Any]) -> Versioned:
        resource = keys_of(RowOperation("upsert_row", table, dict(key), {}))[0]
        query = _row_query(table, key)
        pool = await self._postgres()
        with _reading("postgres"):
            row, version = await pool.fetchrow(query, json.dumps(dict(key)), resource)
        return Versioned(None if row is None else json.loads(row), int(version or 0))

    async def read_node(self, label: str, key: Mapping[str, Any]) -> Versioned:
        resource = f"neo4j:{NodeKey(label, dict(key)).name}"
        query = _node_query(label, key)

        async def read(tx: Any) -> tuple[int, dict[str, Any] | None]:
            # The version first: see the module docstring for why this order is the safe one.
            version = await (await tx.run(_VERSION_QUERY, resource=resource)).single(strict=True)
            node = await (await tx.run(query, key=dict(key))).single(strict=True)
            return int(version["version"]), node["props"]

        driver = await self._neo4j()
        with _reading("neo4j"):
            async with driver.session(default_access_mode="READ") as session:
                version, props = await session.execute_read(read)
        return Versioned(None if props is None else dict(props), version)

    async def read_point(self, collection: str, point_id: str | int) -> Versioned:
        source = await self._qdrant()
        pid = point_id_of(point_id)
        with _reading("qdrant"):
            found = await source.retrieve(collection, [pid])
        point = found.get(pid)
        if point is not None:
            payload = dict(point["payload"])
            return Versioned(
                versioning.without_version(payload), versioning.point_version(payload, None), _dense(point)
            )
        grave = versioning.tombstone_id(collection, pid)
        with _reading("qdrant"):
            graves = await source.retrieve(versioning.TOMBSTONES, [grave], with_vectors=False)
        tombstone = next(iter(graves.values()), None)
        return Versioned(None, versioning.point_version(None, tombstone["payload"] if tombstone else None))

    async def close(self) -> None:
        pool, driver, points = self._pool, self._driver, self._own_points
        self._pool = self._driver = self._own_points = None
        if pool is not None:
            await pool.close()
        if driver is not None:
            await driver.close()
        if points is not None:
            await points.close()

    # -- connections, opened on first use ------------------------------------------------------------

    async def _postgres(self) -> Any:
        async with self._opening:
            if self._pool is None:
                import asyncpg

                try:
                    self._pool = await asyncpg.create_pool(
                        self.settings.postgres.dsn, min_size=1, max_size=_CONNECTIONS
                    )
                except (OSError, asyncpg.PostgresError) as exc:
                    raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc
            return self._pool

    async def _neo4j(self) -> Any:
        async with self._opening:
            if self._driver is None:
                from neo4j import AsyncGraphDatabase

                cfg = self.settings.neo4j
                # A few connections: each busy one holds a server bolt thread, which every client shares.
                self._driver = AsyncGraphDatabase.driver(
                    cfg.uri,
                    auth=(cfg.user, cfg.password),
                    notifications_min_severity="OFF",
                    max_connection_pool_size=_CONNECTIONS,
                )
            return self._driver

    async def _qdrant(self) -> PointSource:
        if self._points is not None:
            return self._points
        q = self.settings.qdrant
        if q.url:
            async with self._opening:
                if self._own_points is None:
                    self._own_points = _ServerPoints(q.url, q.api_key)
                return self._own_points
        raise UnsupportedError(
            f"reading Qdrant at {q.address} from the client: Qdrant {q.backend} admits one process per storage "
            "path and the Qdrant consumer holds it; run a Qdrant server (QDRANT_URL) or hand the consumer's "
            "backend to the client (Coordinator(point_source=...))"
        )


def _dense(point: Mapping[str, Any]) -> list[float] | None:
    vector = point.get("vector")
    if isinstance(vector, dict):
        vector = vector.get("")
    return [float(x) for x in vector] if isinstance(vector, list) else None
