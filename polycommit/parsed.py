"""Typed operations: an Avro `Operation` parsed and validated once into a frozen value the stores take.

On the wire an operation's key, values and params are JSON text (the Avro schema is the public contract,
see schemas/). `parse_operation` turns that text into one of the values below, refusing with a typed
`InvalidOperationError` anything no store could run, so no later layer parses or checks it again.
`keys_of` is the one place that names the resources an operation writes (its lock keys).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from polycommit.errors import InvalidOperationError, PayloadTooLargeError, UnknownStoreError
from polycommit.events import STORES, NodeRef, Operation, Store
from polycommit.sqltext import transaction_control

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
KINDS: dict[str, frozenset[str]] = {
    "postgres": frozenset({"upsert_row", "delete_row", "sql"}),
    "qdrant": frozenset({"upsert_points", "delete_points"}),
    "neo4j": frozenset({"merge_node", "delete_node", "merge_relationship", "delete_relationship", "cypher"}),
}
RAW_KINDS = frozenset({"sql", "cypher"})
# Qdrant point ids are unsigned 64-bit integers or UUIDs.
_MAX_INT_ID = 2**64 - 1
_CANONICAL_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# One encoder for every call: json.dumps with options builds a new one each time.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys and no spaces, so equal values give equal strings (and lock keys)."""
    return _CANONICAL.encode(value)


def json_object(text: str, what: str) -> dict[str, Any]:
    """Parse JSON text that must be an object; anything else is an InvalidOperationError."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InvalidOperationError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidOperationError(f"{what} must be a JSON object")
    return value


def canonical_id(value: object) -> str:
    """The one text form of a point id: decimal digits for integers, lower-case hyphenated UUIDs.

    Equal ids must give equal strings: they key before-images, lock keys and write merging.
    """
    if isinstance(value, str) and _CANONICAL_UUID.match(value):
        return value  # the builders' form already: no UUID object to build (2 µs a point)
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isdigit():
        number = int(value)
    else:
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            raise InvalidOperationError(f"point id {value!r} is neither an unsigned integer nor a UUID") from None
    if number > _MAX_INT_ID:
        raise InvalidOperationError(f"point id {value!r} does not fit an unsigned 64-bit integer")
    return str(number)


# -- the typed values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowOperation:
    """A PostgreSQL row by key: `values` are the columns to write (the key columns are added on insert)."""

    kind: Literal["upsert_row", "delete_row"]
    table: str
    key: dict[str, Any]
    values: dict[str, Any]
    expected_version: int | None = None  # optimistic concurrency: see polycommit.versioning


@dataclass(frozen=True)
class PointValue:
    id: str  # canonical_id
    vector: list[float]
    payload: dict[str, Any]


@dataclass(frozen=True)
class PointsOperation:
    """Qdrant points of one collection: the points to upsert, or the ids to delete (canonical, in order)."""

    kind: Literal["upsert_points", "delete_points"]
    collection: str
    points: tuple[PointValue, ...]
    ids: tuple[str, ...]
    # One expected version for the operation: every point it names must be at it (the schema has one
    # per operation; "create these points, none may exist" is `expected_version=0`).
    expected_version: int | None = None


@dataclass(frozen=True)
class NodeKey:
    """A Neo4j node named by its label and key properties."""

    label: str
    key: dict[str, Any]

    @property
    def name(self) -> str:
        """Label and canonical key: how lock keys name the node."""
        return f"{self.label}:{dumps(self.key)}"


@dataclass(frozen=True)
class NodeOperation:
    kind: Literal["merge_node", "delete_node"]
    node: NodeKey
    properties: dict[str, Any]
    expected_version: int | None = None


@dataclass(frozen=True)
class RelationshipOperation:
    kind: Literal["merge_relationship", "delete_relationship"]
    type: str
    start: NodeKey
    end: NodeKey
    properties: dict[str, Any]
    expected_version: int | None = None


@dataclass(frozen=True)
class RawOperation:
    """A raw SQL (`params` a tuple of positional values) or Cypher (`params` a dict) statement."""

    store: Store
    statement: str
    params: tuple[Any, ...] | dict[str, Any]
    declared_keys: tuple[str, ...]

    @property
    def kind(self) -> Literal["sql", "cypher"]:
        return "sql" if self.store == "postgres" else "cypher"


ParsedOperation: TypeAlias = RowOperation | PointsOperation | NodeOperation | RelationshipOperation | RawOperation


def keys_of(op: ParsedOperation) -> list[str]:
    """The resources an operation writes, named so that equal resources give equal strings."""
    if isinstance(op, RawOperation):
        return list(op.declared_keys)
    if isinstance(op, RowOperation):
        return [f"postgres:{op.table}:{dumps(op.key)}"]
    if isinstance(op, PointsOperation):
        return [f"qdrant:{op.collection}:{i}" for i in op.ids]
    if isinstance(op, NodeOperation):
        return [f"neo4j:{op.node.name}"]
    return [f"neo4j:{op.type}:{op.start.name}->{op.end.name}"]


# -- parsing ----------------------------------------------------------------------------------------


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


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidOperationError(f"integer {value} does not fit Neo4j's 64 bits")
        return "number"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    raise InvalidOperationError(f"{type(value).__name__} values cannot be stored as Neo4j properties")


def _check_storable(properties: Mapping[str, Any], what: str) -> None:
    """Refuse what Neo4j would refuse at run time: caught here, one bad command costs no batch rollback."""
    for name, value in properties.items():
        if value is None:
            continue  # SET n += {p: null} removes p
        try:
            if isinstance(value, list):
                kinds = {_kind_of(v) if v is not None else "null" for v in value}
                if len(kinds) > 1 or "null" in kinds:
                    raise InvalidOperationError("a list property must hold non-null values of one type")
            else:
                _kind_of(value)
        except InvalidOperationError as exc:
            raise InvalidOperationError(f"{what} {name!r}: {exc}") from None


def _node_key(label: str, key_text: str, what: str = "node key") -> NodeKey:
    _identifiers([label], "label" if what == "node key" else "target")
    key = json_object(key_text, what)
    if not key:
        raise InvalidOperationError(f"{what} of :{label} is empty")
    _identifiers(key, "key property")
    if any(v is None for v in key.values()):
        raise InvalidOperationError(f"node key {key_text} of :{label} has a null value; MERGE cannot match it")
    _check_storable(key, "key property")
    return NodeKey(label, key)


def _end(ref: NodeRef | None, kind: str) -> NodeKey:
    if ref is None:
        raise InvalidOperationError(f"{kind} needs both end nodes")
    return _node_key(ref["label"], ref["key"])


def _expected_version(op: Operation) -> int | None:
    """The operation's expected version: None (no check), or a version >= 0 (0: the key must not exist)."""
    expected = op.get("expected_version")
    if expected is None:
        return None
    if op["kind"] in RAW_KINDS:
        raise InvalidOperationError(
            f"{op['kind']} steps cannot carry expected_version: polycommit versions the keys of structured "
            "operations only (a raw statement's writes are declared, not known)"
        )
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InvalidOperationError(f"expected_version must be an integer >= 0, not {expected!r}")
    return expected


def _raw(op: Operation) -> RawOperation:
    statement = op["statement"]
    if not statement.strip():
        raise InvalidOperationError(f"{op['kind']} step has an empty statement")
    if op["kind"] == "cypher":
        return RawOperation("neo4j", statement, json_object(op["params"], "params"), tuple(op["lock_keys"]))
    refusal = transaction_control(statement)
    if refusal is not None:
        raise InvalidOperationError(f"sql step refused: {refusal}")
    try:
        params = json.loads(op["params"])
    except (TypeError, ValueError) as exc:
        raise InvalidOperationError(f"sql params are not JSON: {exc}") from None
    if not isinstance(params, list):
        raise InvalidOperationError("sql params must be a JSON array of positional values")
    return RawOperation("postgres", statement, tuple(params), tuple(op["lock_keys"]))


def _row(op: Operation) -> RowOperation:
    _identifiers([op["target"]], "target")
    key = json_object(op["key"], "key")
    if not key:
        raise InvalidOperationError(f"{op['kind']} needs a non-empty key")
    _identifiers(key, "key column")
    values = json_object(op["values"], "values")
    _identifiers(values, "column")
    return RowOperation(op["kind"], op["target"], key, values, _expected_version(op))  # type: ignore[arg-type]


def _points(op: Operation) -> PointsOperation:
    _identifiers([op["target"]], "target")
    if op["kind"] == "delete_points":
        if not op["point_ids"]:
            raise InvalidOperationError("delete_points needs at least one id")
        ids = tuple(canonical_id(i) for i in op["point_ids"])
        return PointsOperation("delete_points", op["target"], (), ids, _expected_version(op))
    if not op["points"]:
        raise InvalidOperationError("upsert_points needs at least one point")
    points = []
    for p in op["points"]:
        payload = json_object(p["payload"], "point payload")
        if not p["vector"]:
            raise InvalidOperationError(f"point {p['id']} has no vector")
        points.append(PointValue(canonical_id(p["id"]), p["vector"], payload))
    return PointsOperation(
        "upsert_points", op["target"], tuple(points), tuple(p.id for p in points), _expected_version(op)
    )


def _graph(op: Operation) -> NodeOperation | RelationshipOperation:
    kind = op["kind"]
    properties = json_object(op["values"], "values")
    _identifiers(properties, "property" if "relationship" in kind else "column")
    _check_storable(properties, "property")
    if kind in ("merge_node", "delete_node"):
        node = _node_key(op["target"], op["key"], "key")
        changed = sorted(k for k in properties if k in node.key and properties[k] != node.key[k])
        if changed:
            raise InvalidOperationError(f"merge_node would change its key properties {changed}")
        return NodeOperation(kind, node, properties, _expected_version(op))  # type: ignore[arg-type]
    _identifiers([op["target"]], "relationship type")
    start, end = _end(op["from_node"], kind), _end(op["to_node"], kind)
    return RelationshipOperation(kind, op["target"], start, end, properties, _expected_version(op))  # type: ignore[arg-type]


# The operations parsed last, by identity, with their size and lock keys: the coordinator asks about one
# operation several times while it admits an intent (its lock keys, its validity, the steps' order), and
# each parse reads its JSON again. The entry holds the operation itself, so its id cannot be reused while
# cached; operations are never changed once built (a changed one is a new dict). Only what parsed is kept:
# an invalid operation raises each time.
class _Parse:
    __slots__ = ("keys", "op", "parsed", "size")

    def __init__(self, op: Operation, size: int, parsed: ParsedOperation) -> None:
        self.op, self.size, self.parsed = op, size, parsed
        self.keys: list[str] | None = None


_PARSED: dict[int, _Parse] = {}
_PARSED_KEPT = 4096


def parse_operation(op: Operation, max_payload_bytes: int) -> ParsedOperation:
    """The typed value of an operation; a typed `InvalidOperationError` for anything no store could run."""
    return _parse(op, max_payload_bytes).parsed


def operation_keys(op: Operation, max_payload_bytes: int) -> list[str]:
    """`keys_of(parse_operation(op, max_payload_bytes))`, each computed once per operation."""
    entry = _parse(op, max_payload_bytes)
    if entry.keys is None:
        entry.keys = keys_of(entry.parsed)
    return list(entry.keys)


def _parse(op: Operation, max_payload_bytes: int) -> _Parse:
    entry = _PARSED.get(id(op))
    if entry is not None and entry.op is op:
        _within(entry.size, max_payload_bytes)
        return entry
    store, kind = op["store"], op["kind"]
    if store not in STORES:
        raise UnknownStoreError(f"unknown store {store!r}; polycommit has {', '.join(STORES)}")
    if kind not in KINDS[store]:
        raise InvalidOperationError(f"{store} has no operation {kind!r}; it has {', '.join(sorted(KINDS[store]))}")
    size = operation_size(op)
    _within(size, max_payload_bytes)  # before the JSON is read: an oversized payload costs nothing to refuse
    entry = _Parse(op, size, _parsed(op, store, kind))
    if len(_PARSED) >= _PARSED_KEPT:
        _PARSED.clear()
    _PARSED[id(op)] = entry
    return entry


def _within(size: int, max_payload_bytes: int) -> None:
    if size > max_payload_bytes:
        raise PayloadTooLargeError(f"operation payload is {size} bytes; the limit is {max_payload_bytes}")


def _parsed(op: Operation, store: str, kind: str) -> ParsedOperation:
    if kind in RAW_KINDS:
        _expected_version(op)  # refused on raw steps
        return _raw(op)
    if store == "postgres":
        return _row(op)
    if store == "qdrant":
        return _points(op)
    return _graph(op)
