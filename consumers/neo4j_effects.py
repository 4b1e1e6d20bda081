"""What a Neo4j command does to the graph, without I/O: its effects, and how a batch of them is grouped.

A command becomes a `Parsed`: its effect, its compensation's effect and the keys that order it within a
batch. `batch_groups` splits a batch into groups whose effects may share one UNWIND query per
(kind, shape) while the result stays that of applying the commands in order.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from consumers.base import generations, marker_id
from polycommit.errors import InvalidOperationError
from polycommit.events import NodeRef, Operation, Store, StoreCommand
from polycommit.operations import dumps, json_object, lock_keys, validate_operation

STORE: Store = "neo4j"

NodeShape: TypeAlias = tuple[str, tuple[str, ...]]  # (label, sorted key property names)
RelShape: TypeAlias = tuple[str, NodeShape, NodeShape]  # (type, start shape, end shape)
EffectKind = Literal["merge", "replace", "delete", "erase", "cypher", "noop"]


# -- what a command does to the graph ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeTarget:
    label: str
    key: dict[str, Any]

    @functools.cached_property
    def shape(self) -> NodeShape:
        return (self.label, tuple(sorted(self.key)))

    @functools.cached_property
    def lock_key(self) -> str:
        return f"neo4j:{self.label}:{dumps(self.key)}"  # the format of operations.lock_keys


@dataclass(frozen=True)
class RelTarget:
    type: str
    start: NodeTarget
    end: NodeTarget

    @functools.cached_property
    def shape(self) -> RelShape:
        return (self.type, self.start.shape, self.end.shape)


Target: TypeAlias = NodeTarget | RelTarget


@dataclass(frozen=True)
class Effect:
    """One change: merge (SET +=), replace (SET =, creating if absent), delete, erase (a restore to
    "absent": DETACH DELETE for a node), a raw statement, or nothing (a raw step with no compensation)."""

    kind: EffectKind
    target: Target | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    statement: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Parsed:
    """A command that passed validation, with its effects and the keys that order it within a batch."""

    position: int
    command: StoreCommand
    effect: Effect
    compensation: Effect | None
    keys: tuple[str, ...]
    raw: bool  # runs alone, between generations: a raw statement may touch any key

    @functools.cached_property
    def execute_id(self) -> str:
        return marker_id(self.command["tx_id"], self.command["step_index"], "EXECUTE")

    @functools.cached_property
    def compensate_id(self) -> str:
        return marker_id(self.command["tx_id"], self.command["step_index"], "COMPENSATE")

    @functools.cached_property
    def own_id(self) -> str:
        return marker_id(self.command["tx_id"], self.command["step_index"], self.command["action"])

    def targets(self) -> list[Target]:
        return [e.target for e in (self.effect, self.compensation) if e is not None and e.target is not None]


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


def _node_target(label: str, key_text: str) -> NodeTarget:
    key = json_object(key_text, "node key")
    if any(v is None for v in key.values()):
        raise InvalidOperationError(f"node key {key_text} of :{label} has a null value; MERGE cannot match it")
    _check_storable(key, "key property")
    return NodeTarget(label, key)


def end_target(ref: NodeRef | None) -> NodeTarget:
    if ref is None:  # validate_operation refuses this first; kept for the type checker
        raise InvalidOperationError("a relationship needs both end nodes")
    return _node_target(ref["label"], ref["key"])


def effect_of(op: Operation) -> Effect:
    """The effect of a validated neo4j operation, applied as an EXECUTE."""
    kind = op["kind"]
    if kind == "cypher":
        return Effect("cypher", statement=op["statement"], params=json_object(op["params"], "params"))
    values = json_object(op["values"], "values")
    _check_storable(values, "property")
    if kind in ("merge_node", "delete_node"):
        target = _node_target(op["target"], op["key"])
        changed = sorted(k for k in values if k in target.key and values[k] != target.key[k])
        if changed:
            raise InvalidOperationError(f"merge_node would change its key properties {changed}")
        return Effect("merge" if kind == "merge_node" else "delete", target, values)
    rel = RelTarget(op["target"], end_target(op["from_node"]), end_target(op["to_node"]))
    return Effect("merge" if kind == "merge_relationship" else "delete", rel, values)


def restoring(target: Target, before_image: str) -> Effect:
    """The effect that puts `target` back as the before-image recorded it (None there: absent)."""
    field_name = "node" if isinstance(target, NodeTarget) else "relationship"
    try:
        image = json.loads(before_image)
        old = image[field_name]
    except (ValueError, TypeError, KeyError):
        raise InvalidOperationError(f"before-image {before_image[:200]!r} has no {field_name!r}") from None
    if old is None:
        return Effect("erase", target)
    if not isinstance(old, dict):
        raise InvalidOperationError(f"before-image {field_name!r} is not a property map")
    return Effect("replace", target, old)


def before_image_of(target: Target, properties: Mapping[str, Any] | None) -> str:
    field_name = "node" if isinstance(target, NodeTarget) else "relationship"
    return dumps({field_name: None if properties is None else dict(properties)})


def parse(position: int, command: StoreCommand, max_payload_bytes: int) -> Parsed:
    """Validate a command and derive its effects; raise a typed error for anything no retry can fix."""
    if command["action"] not in ("EXECUTE", "COMPENSATE"):
        raise InvalidOperationError(f"the neo4j participant runs EXECUTE and COMPENSATE, not {command['action']}")
    op, compensation = command["operation"], command["compensation"]
    for candidate in (op, compensation):
        if candidate is None:
            continue
        if candidate["store"] != STORE:
            raise InvalidOperationError(f"a {candidate['store']} operation was sent to the neo4j participant")
        validate_operation(candidate, max_payload_bytes)
    effect = effect_of(op)
    comp_effect = effect_of(compensation) if compensation is not None else None
    keys = [f"step:{command['tx_id']}/{command['step_index']}", *lock_keys(op)]
    if compensation is not None:
        keys += lock_keys(compensation)
    keys += [t.lock_key for e in (effect, comp_effect) if e is not None for t in _nodes_written(e)]
    raw = op["kind"] == "cypher" or (
        command["action"] == "COMPENSATE" and compensation is not None and compensation["kind"] == "cypher"
    )
    return Parsed(position, command, effect, comp_effect, tuple(dict.fromkeys(keys)), raw)


def _nodes_written(effect: Effect) -> list[NodeTarget]:
    return [effect.target] if isinstance(effect.target, NodeTarget) else []


def _nodes_read(effect: Effect | None) -> list[NodeTarget]:
    if effect is not None and isinstance(effect.target, RelTarget):
        return [effect.target.start, effect.target.end]
    return []


def batch_groups(parsed: Sequence[Parsed]) -> list[list[Parsed]]:
    """Split a batch into groups that may share UNWIND queries, keeping the effect of applying it in order.

    Raw statements run alone. Between them, `generations()` starts a new group when a key repeats; a
    relationship also claims its end nodes when a node command of the same run writes them, so "merge
    A, then merge A->B" never tries the relationship before A exists. End nodes that nobody writes stay
    shared, so many relationships to one hub node still go in one query.
    """
    groups: list[list[Parsed]] = []
    run: list[Parsed] = []

    def flush() -> None:
        written = {t.lock_key for p in run for e in (p.effect, p.compensation) if e for t in _nodes_written(e)}
        keys: dict[int, Sequence[str]] = {}
        for i, p in enumerate(run):
            ends = [n.lock_key for e in (p.effect, p.compensation) for n in _nodes_read(e)]
            keys[i] = [*p.keys, *(k for k in ends if k in written)]
        groups.extend([run[i] for i in g] for g in generations([p.command for p in run], keys))
        run.clear()

    for p in parsed:
        if p.raw:
            flush()
            groups.append([p])
        else:
            run.append(p)
    flush()
    return [g for g in groups if g]


def nodes_of(target: Target) -> list[NodeTarget]:
    return [target] if isinstance(target, NodeTarget) else [target.start, target.end]
