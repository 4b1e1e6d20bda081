"""Build, validate and describe the operations a transaction's steps carry.

Structured operations (a row by key, points by id, a node or relationship by key) are enough for
polycommit to derive their compensation from a before-image and their lock keys from their key. Raw SQL
and Cypher steps declare both. Validation here is pure: it needs no store, only the operation, so the
coordinator can refuse a bad intent before any step runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from polycommit.errors import InvalidOperationError
from polycommit.events import NodeRef, Operation, Point
from polycommit.parsed import (
    IDENTIFIER,
    KINDS,
    RAW_KINDS,
    NodeKey,
    NodeOperation,
    ParsedOperation,
    PointsOperation,
    PointValue,
    RawOperation,
    RelationshipOperation,
    RowOperation,
    canonical_id,
    dumps,
    json_object,
    keys_of,
    operation_keys,
    operation_size,
    parse_operation,
)

__all__ = [
    "IDENTIFIER",
    "KINDS",
    "RAW_KINDS",
    "NodeKey",
    "NodeOperation",
    "ParsedOperation",
    "PointValue",
    "PointsOperation",
    "RawOperation",
    "RelationshipOperation",
    "RowOperation",
    "canonical_id",
    "dumps",
    "json_object",
    "keys_of",
    "lock_keys",
    "operation_keys",
    "operation_size",
    "parse_operation",
    "step_order",
    "validate_operation",
]

_POINT_NAMESPACE = uuid.UUID("6f1c2b1e-4a7d-4d2a-9a53-2f0d3c1f0b5e")


def _operation(store: str, kind: str, **fields: Any) -> Operation:
    op: Operation = {
        "store": store,
        "kind": kind,
        "target": "",
        "key": "{}",
        "values": "{}",
        "points": [],
        "point_ids": [],
        "from_node": None,
        "to_node": None,
        "statement": "",
        "params": "{}",
        "lock_keys": [],
        "expected_version": None,
    }
    op.update(fields)  # type: ignore[typeddict-item]
    return op


# -- builders ---------------------------------------------------------------------------------------


def upsert_row(
    table: str, key: Mapping[str, Any], values: Mapping[str, Any], *, expected_version: int | None = None
) -> Operation:
    """Insert or update one row of `table` identified by `key` (its columns need a unique constraint).

    `expected_version` (on every structured builder): apply only if the key is at that version (0: it
    must not exist), else the step fails with `VersionConflict` (see polycommit.versioning)."""
    return _operation(
        "postgres",
        "upsert_row",
        target=table,
        key=dumps(dict(key)),
        values=dumps(dict(values)),
        expected_version=expected_version,
    )


def delete_row(table: str, key: Mapping[str, Any], *, expected_version: int | None = None) -> Operation:
    return _operation("postgres", "delete_row", target=table, key=dumps(dict(key)), expected_version=expected_version)


def sql(statement: str, params: Iterable[Any] = (), lock_keys: Iterable[str] = ()) -> Operation:
    """A raw SQL step; positional parameters $1..$n. Its compensation must be declared."""
    return _operation("postgres", "sql", statement=statement, params=dumps(list(params)), lock_keys=list(lock_keys))


def point_id(value: str | int) -> str:
    """A deterministic Qdrant point id: integers stay integers, anything else becomes a stable UUID."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return str(int(value))
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return str(uuid.uuid5(_POINT_NAMESPACE, str(value)))


def point(id: str | int, vector: Iterable[float], payload: Mapping[str, Any] | None = None) -> Point:
    return {"id": point_id(id), "vector": [float(x) for x in vector], "payload": dumps(dict(payload or {}))}


def upsert_points(collection: str, points: Iterable[Point], *, expected_version: int | None = None) -> Operation:
    """Upsert points; `expected_version` applies to every one of them."""
    return _operation(
        "qdrant", "upsert_points", target=collection, points=list(points), expected_version=expected_version
    )


def delete_points(collection: str, ids: Iterable[str | int], *, expected_version: int | None = None) -> Operation:
    return _operation(
        "qdrant",
        "delete_points",
        target=collection,
        point_ids=[point_id(i) for i in ids],
        expected_version=expected_version,
    )


def node(label: str, key: Mapping[str, Any]) -> NodeRef:
    return {"label": label, "key": dumps(dict(key))}


def merge_node(
    label: str,
    key: Mapping[str, Any],
    properties: Mapping[str, Any] | None = None,
    *,
    expected_version: int | None = None,
) -> Operation:
    """MERGE a node by its key properties (a uniqueness constraint is created for them) and SET the rest."""
    return _operation(
        "neo4j",
        "merge_node",
        target=label,
        key=dumps(dict(key)),
        values=dumps(dict(properties or {})),
        expected_version=expected_version,
    )


def delete_node(label: str, key: Mapping[str, Any], *, expected_version: int | None = None) -> Operation:
    return _operation("neo4j", "delete_node", target=label, key=dumps(dict(key)), expected_version=expected_version)


def merge_relationship(
    rel_type: str,
    from_node: NodeRef,
    to_node: NodeRef,
    properties: Mapping[str, Any] | None = None,
    *,
    expected_version: int | None = None,
) -> Operation:
    """MERGE one relationship of `rel_type` between two nodes (both merged by key if missing)."""
    return _operation(
        "neo4j",
        "merge_relationship",
        target=rel_type,
        from_node=from_node,
        to_node=to_node,
        values=dumps(dict(properties or {})),
        expected_version=expected_version,
    )


def delete_relationship(
    rel_type: str, from_node: NodeRef, to_node: NodeRef, *, expected_version: int | None = None
) -> Operation:
    return _operation(
        "neo4j",
        "delete_relationship",
        target=rel_type,
        from_node=from_node,
        to_node=to_node,
        expected_version=expected_version,
    )


def cypher(statement: str, params: Mapping[str, Any] | None = None, lock_keys: Iterable[str] = ()) -> Operation:
    """A raw Cypher step with named parameters. Its compensation must be declared."""
    return _operation(
        "neo4j", "cypher", statement=statement, params=dumps(dict(params or {})), lock_keys=list(lock_keys)
    )


# -- validation and lock keys (on the typed value: polycommit.parsed) ---------------------------------


def validate_operation(op: Operation, max_payload_bytes: int) -> None:
    """Raise a typed `InvalidOperationError` for anything no store could run (parse and discard)."""
    parse_operation(op, max_payload_bytes)


def lock_keys(op: Operation) -> list[str]:
    """The resources an operation writes, named so that equal resources give equal strings."""
    return operation_keys(op, max_payload_bytes=2**62)


def step_order(after: Iterable[str | int], earlier: Sequence[str]) -> list[int]:
    """The step indices a step's `after=` names: an index as given (the coordinator refuses one that is
    not an earlier step), a name as the index of the one earlier step of that name."""
    indices = []
    for ref in after:
        if isinstance(ref, int):
            indices.append(ref)
            continue
        found = [i for i, name in enumerate(earlier) if name == ref]
        if len(found) != 1:
            why = "no earlier step" if not found else f"{len(found)} earlier steps"
            raise InvalidOperationError(f"after={ref!r}: {why} of that name (name the step, or give its index)")
        indices.append(found[0])
    return sorted(set(indices))
