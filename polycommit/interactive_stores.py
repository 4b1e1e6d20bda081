"""`tx.postgres`, `tx.qdrant` and `tx.neo4j` of an interactive transaction (polycommit.interactive): the
reads and writes the SDK offers, each with the lock keys it touches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from polycommit import operations as ops
from polycommit.events import NodeRef, Operation, Point
from polycommit.reads import Versioned

if TYPE_CHECKING:
    from polycommit.interactive import InteractiveScope


# -- the lock keys of what a read touches, for `tx.lock_for_read` (the same keys the writes lock) ------


def row_key(table: str, key: Mapping[str, Any]) -> str:
    return ops.lock_keys(ops.delete_row(table, key))[0]


def point_key(collection: str, point_id: str | int) -> str:
    return ops.lock_keys(ops.delete_points(collection, [point_id]))[0]


def node_key(label: str, key: Mapping[str, Any]) -> str:
    return ops.lock_keys(ops.delete_node(label, key))[0]


# -- the builders of `tx.postgres`, `tx.qdrant` and `tx.neo4j` -----------------------------------------
# Reads go straight to the store (polycommit.reads) through `scope.read`, which takes the read lock of the
# isolation level now or, locking at the commit, remembers what was read to check it then. Writes go
# through `scope.add`, which locks their keys now or at the commit.


class _Builder:
    """What every store's builder holds: the transaction it reads in and adds steps to."""

    def __init__(self, scope: InteractiveScope) -> None:
        self._scope = scope


class PostgresBuilder(_Builder):
    async def get(self, table: str, key: Mapping[str, Any], *, for_update: bool = False) -> Versioned:
        reads = self._scope.coordinator.reads
        return await self._scope.read(row_key(table, key), lambda: reads.read_row(table, key), for_update)

    async def upsert(
        self,
        table: str,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.upsert_row(table, key, values, expected_version=expected_version), **step)

    async def delete(
        self, table: str, key: Mapping[str, Any], *, expected_version: int | None = None, **step: Any
    ) -> None:
        await self._scope.add(ops.delete_row(table, key, expected_version=expected_version), **step)

    async def execute(
        self,
        statement: str,
        *params: Any,
        lock_keys: Iterable[str] = (),
        compensate: Operation | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.sql(statement, params, lock_keys), compensate=compensate, **step)


class QdrantBuilder(_Builder):
    async def retrieve(self, collection: str, point_id: str | int, *, for_update: bool = False) -> Versioned:
        reads = self._scope.coordinator.reads
        return await self._scope.read(
            point_key(collection, point_id), lambda: reads.read_point(collection, point_id), for_update
        )

    async def upsert(self, collection: str, points: Iterable[Point], **step: Any) -> None:
        await self._scope.add(ops.upsert_points(collection, points), **step)

    async def delete(self, collection: str, ids: Iterable[str | int], **step: Any) -> None:
        await self._scope.add(ops.delete_points(collection, ids), **step)


class Neo4jBuilder(_Builder):
    async def get_node(self, label: str, key: Mapping[str, Any], *, for_update: bool = False) -> Versioned:
        reads = self._scope.coordinator.reads
        return await self._scope.read(node_key(label, key), lambda: reads.read_node(label, key), for_update)

    async def merge_node(
        self, label: str, key: Mapping[str, Any], properties: Mapping[str, Any] | None = None, **step: Any
    ) -> None:
        await self._scope.add(ops.merge_node(label, key, properties), **step)

    async def delete_node(self, label: str, key: Mapping[str, Any], **step: Any) -> None:
        await self._scope.add(ops.delete_node(label, key), **step)

    async def merge_relationship(
        self,
        rel_type: str,
        from_node: NodeRef,
        to_node: NodeRef,
        properties: Mapping[str, Any] | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.merge_relationship(rel_type, from_node, to_node, properties), **step)

    async def delete_relationship(self, rel_type: str, from_node: NodeRef, to_node: NodeRef, **step: Any) -> None:
        await self._scope.add(ops.delete_relationship(rel_type, from_node, to_node), **step)

    async def run(
        self,
        statement: str,
        params: Mapping[str, Any] | None = None,
        *,
        lock_keys: Iterable[str] = (),
        compensate: Operation | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.cypher(statement, params, lock_keys), compensate=compensate, **step)
