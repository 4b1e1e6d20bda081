"""Rewrite an intent from any producer into the canonical form polycommit compares strings in.

Lock keys and batch grouping compare the JSON-text fields of an operation (keys, values, parameters, point
payloads, node keys) as raw strings, so `{"id": 1}` and `{"id":1}` would name two resources and two
transactions on the same row would not exclude each other. The Python SDK writes these fields with
`polycommit.operations.dumps` (sorted keys, no spaces); a producer in another language writes whatever
its JSON library writes. The coordinator therefore passes every arriving intent through `canonical_intent`,
which re-dumps each JSON field in that one form and turns point ids into what `operations.point_id` makes
of them (integers as decimal text, UUIDs in lower case, any other string as its uuid5), so that a foreign
producer's intent and the SDK's intent for the same change are the same bytes. Pure: no I/O, nothing is
mutated; the result is a new intent. Canonical input comes back equal, so applying it twice changes nothing.
"""

from __future__ import annotations

import json

from polycommit.errors import InvalidOperationError
from polycommit.events import NodeRef, Operation, Point, Step, TransactionIntent
from polycommit.operations import dumps, point_id


def canonical_json(text: str, what: str) -> str:
    """`text` re-dumped in polycommit's canonical JSON; InvalidOperationError if it is not JSON."""
    if text == "{}":  # what every unused field holds (about half of a saga's fields): already canonical
        return text
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InvalidOperationError(f"{what} is not JSON: {exc}") from None
    return dumps(value)


def _node(node: NodeRef | None, what: str) -> NodeRef | None:
    if node is None:
        return None
    return {**node, "key": canonical_json(node["key"], f"{what} key")}


def _point(point: Point, what: str) -> Point:
    return {
        **point,
        "id": point_id(point["id"]),
        "payload": canonical_json(point["payload"], f"{what} payload of point {point['id']!r}"),
    }


def canonical_operation(op: Operation, what: str = "operation") -> Operation:
    """`op` with every JSON-text field canonical and every point id deterministic."""
    return {
        **op,
        "key": canonical_json(op["key"], f"{what} key"),
        "values": canonical_json(op["values"], f"{what} values"),
        "params": canonical_json(op["params"], f"{what} params"),
        "points": [_point(p, what) for p in op["points"]],
        "point_ids": [point_id(i) for i in op["point_ids"]],
        "from_node": _node(op["from_node"], f"{what} from_node"),
        "to_node": _node(op["to_node"], f"{what} to_node"),
    }


def canonical_step(step: Step, position: int) -> Step:
    """`step` (at `position` in its intent) with its operation and compensation canonical.

    Errors start with "step <position>:", the prefix the coordinator reads to blame one step.
    """
    compensation = step["compensation"]
    return {
        **step,
        "operation": canonical_operation(step["operation"], f"step {position}: operation"),
        "compensation": None
        if compensation is None
        else canonical_operation(compensation, f"step {position}: compensation"),
    }


def canonical_intent(intent: TransactionIntent) -> TransactionIntent:
    """`intent` with every step canonical; raises InvalidOperationError for JSON that does not parse."""
    return {**intent, "steps": [canonical_step(step, i) for i, step in enumerate(intent["steps"])]}
