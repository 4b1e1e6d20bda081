"""Build, validate and describe the operations a transaction's steps carry.

Structured operations (a row by key, points by id, a node or relationship by key) are enough for
polycommit to derive their compensation from a before-image and their lock keys from their key. Raw SQL
and Cypher steps declare both. Validation here is pure: it needs no store, only the operation, so the
coordinator can refuse a bad intent before any step runs.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from polycommit.errors import InvalidOperationError, PayloadTooLargeError, UnknownStoreError
from polycommit.events import STORES, NodeRef, Operation, Point

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

KINDS: dict[str, frozenset[str]] = {
    "postgres": frozenset({"upsert_row", "delete_row", "sql"}),
    "qdrant": frozenset({"upsert_points", "delete_points"}),
    "neo4j": frozenset({"merge_node", "delete_node", "merge_relationship", "delete_relationship", "cypher"}),
}
RAW_KINDS = frozenset({"sql", "cypher"})
_POINT_NAMESPACE = uuid.UUID("6f1c2b1e-4a7d-4d2a-9a53-2f0d3c1f0b5e")


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys and no spaces, so equal values give equal strings (and lock keys)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


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


def upsert_row(table: str, key: Mapping[str, Any], values: Mapping[str, Any]) -> Operation:
    """Insert or update one row of `table` identified by `key` (its columns need a unique constraint)."""
    return _operation("postgres", "upsert_row", target=table, key=dumps(dict(key)), values=dumps(dict(values)))


def delete_row(table: str, key: Mapping[str, Any]) -> Operation:
    return _operation("postgres", "delete_row", target=table, key=dumps(dict(key)))


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


def upsert_points(collection: str, points: Iterable[Point]) -> Operation:
    return _operation("qdrant", "upsert_points", target=collection, points=list(points))


def delete_points(collection: str, ids: Iterable[str | int]) -> Operation:
    return _operation("qdrant", "delete_points", target=collection, point_ids=[point_id(i) for i in ids])


def node(label: str, key: Mapping[str, Any]) -> NodeRef:
    return {"label": label, "key": dumps(dict(key))}


def merge_node(label: str, key: Mapping[str, Any], properties: Mapping[str, Any] | None = None) -> Operation:
    """MERGE a node by its key properties (a uniqueness constraint is created for them) and SET the rest."""
    return _operation("neo4j", "merge_node", target=label, key=dumps(dict(key)), values=dumps(dict(properties or {})))


def delete_node(label: str, key: Mapping[str, Any]) -> Operation:
    return _operation("neo4j", "delete_node", target=label, key=dumps(dict(key)))


def merge_relationship(
    rel_type: str,
    from_node: NodeRef,
    to_node: NodeRef,
    properties: Mapping[str, Any] | None = None,
) -> Operation:
    """MERGE one relationship of `rel_type` between two nodes (both merged by key if missing)."""
    return _operation(
        "neo4j",
        "merge_relationship",
        target=rel_type,
        from_node=from_node,
        to_node=to_node,
        values=dumps(dict(properties or {})),
    )


def delete_relationship(rel_type: str, from_node: NodeRef, to_node: NodeRef) -> Operation:
    return _operation("neo4j", "delete_relationship", target=rel_type, from_node=from_node, to_node=to_node)


def cypher(statement: str, params: Mapping[str, Any] | None = None, lock_keys: Iterable[str] = ()) -> Operation:
    """A raw Cypher step with named parameters. Its compensation must be declared."""
    return _operation(
        "neo4j", "cypher", statement=statement, params=dumps(dict(params or {})), lock_keys=list(lock_keys)
    )


# -- validation -------------------------------------------------------------------------------------


def json_object(text: str, what: str) -> dict[str, Any]:
    """Parse JSON text that must be an object; anything else is an InvalidOperationError."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InvalidOperationError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidOperationError(f"{what} must be a JSON object")
    return value


def _identifiers(names: Iterable[str], what: str) -> None:
    for name in names:
        if not IDENTIFIER.match(name):
            raise InvalidOperationError(f"{what} {name!r} is not a plain identifier")


def operation_size(op: Operation) -> int:
    """Approximate encoded size: what the payload limit is measured against."""
    size = len(op["key"]) + len(op["values"]) + len(op["statement"]) + len(op["params"])
    for p in op["points"]:
        size += len(p["payload"]) + 4 * len(p["vector"]) + len(p["id"])
    return size + 16 * len(op["point_ids"])


def validate_operation(op: Operation, max_payload_bytes: int) -> None:
    """Raise a typed `InvalidOperationError` for anything no store could run."""
    store, kind = op["store"], op["kind"]
    if store not in STORES:
        raise UnknownStoreError(f"unknown store {store!r}; polycommit has {', '.join(STORES)}")
    if kind not in KINDS[store]:
        raise InvalidOperationError(f"{store} has no operation {kind!r}; it has {', '.join(sorted(KINDS[store]))}")
    size = operation_size(op)
    if size > max_payload_bytes:
        raise PayloadTooLargeError(f"operation payload is {size} bytes; the limit is {max_payload_bytes}")
    if kind in RAW_KINDS:
        if not op["statement"].strip():
            raise InvalidOperationError(f"{kind} step has an empty statement")
        return
    if kind not in ("merge_relationship", "delete_relationship"):
        _identifiers([op["target"]], "target")
    if kind in ("upsert_row", "delete_row", "merge_node", "delete_node"):
        key = json_object(op["key"], "key")
        if not key:
            raise InvalidOperationError(f"{kind} needs a non-empty key")
        _identifiers(key, "key column")
        _identifiers(json_object(op["values"], "values"), "column")
    elif kind == "upsert_points":
        if not op["points"]:
            raise InvalidOperationError("upsert_points needs at least one point")
        for p in op["points"]:
            json_object(p["payload"], "point payload")
            if not p["vector"]:
                raise InvalidOperationError(f"point {p['id']} has no vector")
    elif kind == "delete_points":
        if not op["point_ids"]:
            raise InvalidOperationError("delete_points needs at least one id")
    else:  # relationships
        _identifiers([op["target"]], "relationship type")
        for end in (op["from_node"], op["to_node"]):
            if end is None:
                raise InvalidOperationError(f"{kind} needs both end nodes")
            _identifiers([end["label"]], "label")
            _identifiers(json_object(end["key"], "node key"), "key property")
        _identifiers(json_object(op["values"], "values"), "property")


# -- lock keys --------------------------------------------------------------------------------------


def lock_keys(op: Operation) -> list[str]:
    """The resources an operation writes, named so that equal resources give equal strings."""
    store, kind, target = op["store"], op["kind"], op["target"]
    if kind in RAW_KINDS:
        return list(op["lock_keys"])
    if kind in ("upsert_row", "delete_row", "merge_node", "delete_node"):
        return [f"{store}:{target}:{op['key']}"]
    if kind == "upsert_points":
        return [f"qdrant:{target}:{p['id']}" for p in op["points"]]
    if kind == "delete_points":
        return [f"qdrant:{target}:{i}" for i in op["point_ids"]]
    ends = [op["from_node"], op["to_node"]]
    names = [f"{e['label']}:{e['key']}" for e in ends if e is not None]
    return [f"neo4j:{target}:" + "->".join(names)]
