"""The effects a structured operation leaves in its store once executed, each of which its undo removes.

Pure: an operation in, the rows, points and nodes to look for out. Raw statements and relationships
have no expectation here; the checker judges them by their markers alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from polycommit.errors import PolycommitError
from polycommit.events import Operation
from polycommit.parsed import canonical_id


@dataclass
class Expect:
    """One effect of a structured operation, to be found (or not) in a store."""

    tx_id: str
    step: int
    store: str
    where: tuple[Any, ...]  # the grouping of reads: (table, key columns) / (collection,) / (label, key fields)
    key: Any  # the row key dict / canonical point id / node key dict
    values: dict[str, Any] | None  # what must be there after EXECUTE; None: must be absent
    vector: list[float] | None = None

    def describe(self) -> str:
        if self.store == "postgres":
            return f"row {self.where[0]}{json.dumps(self.key, sort_keys=True)}"
        if self.store == "qdrant":
            return f"point {self.where[0]}/{self.key}"
        return f"node (:{self.where[0]} {json.dumps(self.key, sort_keys=True)})"


def expectations(tx_id: str, index: int, op: Operation) -> list[Expect]:
    """The effects an operation has once executed (values), each of which its undo must remove. An
    operation the coordinator could not parse (its transaction failed before any step ran) has none."""
    try:
        return _expectations(tx_id, index, op)
    except (ValueError, TypeError, KeyError, AttributeError, PolycommitError):
        return []


def _expectations(tx_id: str, index: int, op: Operation) -> list[Expect]:
    kind, store = op["kind"], op["store"]
    if kind in ("upsert_row", "delete_row"):
        key = json.loads(op["key"])
        values = {**json.loads(op["values"]), **key} if kind == "upsert_row" else None
        return [Expect(tx_id, index, store, (op["target"], tuple(sorted(key))), key, values)]
    if kind == "upsert_points":
        return [
            Expect(tx_id, index, store, (op["target"],), canonical_id(p["id"]), json.loads(p["payload"]), p["vector"])
            for p in op["points"]
        ]
    if kind == "delete_points":
        return [Expect(tx_id, index, store, (op["target"],), canonical_id(i), None) for i in op["point_ids"]]
    if kind in ("merge_node", "delete_node"):
        key = json.loads(op["key"])
        values = {**json.loads(op["values"]), **key} if kind == "merge_node" else None
        return [Expect(tx_id, index, store, (op["target"], tuple(sorted(key))), key, values)]
    return []  # raw statements and relationships: markers only


def frozen(key: Any) -> Any:
    """A key as a hashable value: row and node keys are dicts, point ids already strings."""
    return json.dumps(key, sort_keys=True, default=str) if isinstance(key, dict) else key
