"""The per-store parts of `tx` in `async with coordinator.transaction() as tx`: writes collected as steps,
and versioned reads that go straight to the store.

`tx.postgres.upsert(..., expected_version=n)` (and every other structured write) applies only if the key
is still at version `n`; `await tx.postgres.get(...)`, `tx.qdrant.retrieve(...)`, `tx.neo4j.get_node(...)`
return the value with the version to expect (polycommit.reads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from polycommit import operations as ops
from polycommit.events import NodeRef, Operation, Point
from polycommit.reads import StoreReads, Versioned


class StepSink(Protocol):
    """What collects the steps (polycommit.client.Transaction)."""

    def add(
        self,
        operation: Operation,
        *,
        compensate: Operation | None = ...,
        name: str = ...,
        retries: int = ...,
        timeout: float = ...,
    ) -> Any: ...


ReadsOf = Callable[[], StoreReads]


class PostgresSteps:
    def __init__(self, tx: StepSink, reads: ReadsOf) -> None:
        self._tx, self._reads = tx, reads

    async def get(self, table: str, key: Mapping[str, Any]) -> Versioned:
        """The row (None when absent) and its version."""
        return await self._reads().read_row(table, key)

    def upsert(
        self,
        table: str,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        **step: Any,
    ) -> None:
        self._tx.add(ops.upsert_row(table, key, values, expected_version=expected_version), **step)

    def delete(self, table: str, key: Mapping[str, Any], *, expected_version: int | None = None, **step: Any) -> None:
        self._tx.add(ops.delete_row(table, key, expected_version=expected_version), **step)

    def execute(self, statement: str, *params: Any, compensate: Operation | None = None, **step: Any) -> None:
        self._tx.add(ops.sql(statement, params), compensate=compensate, **step)


class QdrantSteps:
    def __init__(self, tx: StepSink, reads: ReadsOf) -> None:
        self._tx, self._reads = tx, reads

    async def retrieve(self, collection: str, point_id: str | int) -> Versioned:
        """The point's payload (None when absent), its version and its vector."""
        return await self._reads().read_point(collection, point_id)

    def upsert(
        self, collection: str, points: Iterable[Point], *, expected_version: int | None = None, **step: Any
    ) -> None:
        """`expected_version` applies to every point."""
        self._tx.add(ops.upsert_points(collection, points, expected_version=expected_version), **step)

    def delete(
        self, collection: str, ids: Iterable[str | int], *, expected_version: int | None = None, **step: Any
    ) -> None:
        self._tx.add(ops.delete_points(collection, ids, expected_version=expected_version), **step)


class Neo4jSteps:
    def __init__(self, tx: StepSink, reads: ReadsOf) -> None:
        self._tx, self._reads = tx, reads

    async def get_node(self, label: str, key: Mapping[str, Any]) -> Versioned:
        """The node's properties (None when absent) and its version."""
        return await self._reads().read_node(label, key)

    def merge_node(
        self,
        label: str,
        key: Mapping[str, Any],
        properties: Mapping[str, Any] | None = None,
        *,
        expected_version: int | None = None,
        **step: Any,
    ) -> None:
        self._tx.add(ops.merge_node(label, key, properties, expected_version=expected_version), **step)

    def delete_node(
        self, label: str, key: Mapping[str, Any], *, expected_version: int | None = None, **step: Any
    ) -> None:
        self._tx.add(ops.delete_node(label, key, expected_version=expected_version), **step)

    def merge_relationship(
        self,
        rel_type: str,
        from_node: NodeRef,
        to_node: NodeRef,
        properties: Mapping[str, Any] | None = None,
        *,
        expected_version: int | None = None,
        **step: Any,
    ) -> None:
        operation = ops.merge_relationship(rel_type, from_node, to_node, properties, expected_version=expected_version)
        self._tx.add(operation, **step)

    def delete_relationship(
        self, rel_type: str, from_node: NodeRef, to_node: NodeRef, *, expected_version: int | None = None, **step: Any
    ) -> None:
        self._tx.add(ops.delete_relationship(rel_type, from_node, to_node, expected_version=expected_version), **step)

    def run(
        self,
        statement: str,
        params: Mapping[str, Any] | None = None,
        *,
        compensate: Operation | None = None,
        **step: Any,
    ) -> None:
        self._tx.add(ops.cypher(statement, params), compensate=compensate, **step)
