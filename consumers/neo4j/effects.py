"""What a Neo4j command does to the graph, without I/O: its effects, and how a batch of them is grouped.

A typed command becomes `Effects`: its effect and its compensation's effect. `writes` and `reads` name
the keys by which the shared planner (consumers/planner.py) groups a batch into generations whose
effects may share one UNWIND query per (kind, shape), the result staying that of applying it in order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from consumers.command import TypedCommand
from polycommit import versioning
from polycommit.errors import InvalidOperationError, VersionConflict
from polycommit.events import NodeRef, Store
from polycommit.parsed import (
    NodeKey,
    NodeOperation,
    ParsedOperation,
    RawOperation,
    RelationshipOperation,
    dumps,
    json_object,
)

STORE: Store = "neo4j"

NodeShape: TypeAlias = tuple[str, tuple[str, ...]]  # (label, sorted key property names)
RelShape: TypeAlias = tuple[str, NodeShape, NodeShape]  # (type, start shape, end shape)
EffectKind = Literal["merge", "replace", "delete", "erase", "cypher", "noop"]


# -- what a command does to the graph ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeTarget:
    label: str
    key: dict[str, Any]
    # Computed once: planning and grouping read them for every command (a cached_property takes a lock).
    shape: NodeShape = field(init=False, compare=False)
    lock_key: str = field(init=False, compare=False)  # the format of polycommit.parsed.keys_of

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (self.label, tuple(sorted(self.key))))
        object.__setattr__(self, "lock_key", f"neo4j:{NodeKey(self.label, self.key).name}")


@dataclass(frozen=True)
class RelTarget:
    type: str
    start: NodeTarget
    end: NodeTarget
    shape: RelShape = field(init=False, compare=False)
    lock_key: str = field(init=False, compare=False)  # the format of polycommit.parsed.keys_of

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (self.type, self.start.shape, self.end.shape))
        start, end = NodeKey(self.start.label, self.start.key), NodeKey(self.end.label, self.end.key)
        object.__setattr__(self, "lock_key", f"neo4j:{self.type}:{start.name}->{end.name}")


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
    expected_version: int | None = None  # the operation's (a restore never expects one)

    @property
    def resource(self) -> str | None:
        """The key whose version this effect bumps (polycommit.versioning); None for raw Cypher."""
        return self.target.lock_key if self.target is not None else None


@dataclass(frozen=True)
class Effects:
    """What a typed command does to the graph: its effect, its declared compensation's, and whether it
    runs alone (a raw statement may touch any key)."""

    effect: Effect
    compensation: Effect | None
    raw: bool

    def targets(self) -> list[Target]:
        return [e.target for e in (self.effect, self.compensation) if e is not None and e.target is not None]


def node_target(node: NodeKey) -> NodeTarget:
    return NodeTarget(node.label, node.key)


def end_target(ref: NodeRef | None) -> NodeTarget:
    """The end node of a relationship as the wire names it (for reads by the tests and the checker)."""
    if ref is None:
        raise InvalidOperationError("a relationship needs both end nodes")
    return NodeTarget(ref["label"], json_object(ref["key"], "node key"))


def effect_of(op: ParsedOperation) -> Effect:
    """The effect of a parsed neo4j operation, applied as an EXECUTE."""
    if isinstance(op, RawOperation):
        assert isinstance(op.params, dict)  # parse_operation gives Cypher named parameters
        return Effect("cypher", statement=op.statement, params=op.params)
    if isinstance(op, NodeOperation):
        kind: EffectKind = "merge" if op.kind == "merge_node" else "delete"
        return Effect(kind, node_target(op.node), op.properties, expected_version=op.expected_version)
    if isinstance(op, RelationshipOperation):
        rel = RelTarget(op.type, node_target(op.start), node_target(op.end))
        kind = "merge" if op.kind == "merge_relationship" else "delete"
        return Effect(kind, rel, op.properties, expected_version=op.expected_version)
    raise InvalidOperationError(f"the neo4j participant cannot run {type(op).__name__}")


def effects_of(command: TypedCommand) -> Effects:
    effect = effect_of(command.operation)
    compensation = effect_of(command.compensation) if command.compensation is not None else None
    raw = effect.kind == "cypher" or (
        command.action == "COMPENSATE" and compensation is not None and compensation.kind == "cypher"
    )
    return Effects(effect, compensation, raw)


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


def _nodes_written(effect: Effect) -> list[NodeTarget]:
    return [effect.target] if isinstance(effect.target, NodeTarget) else []


def _nodes_read(effect: Effect | None) -> list[NodeTarget]:
    if effect is not None and isinstance(effect.target, RelTarget):
        return [effect.target.start, effect.target.end]
    return []


def writes(command: TypedCommand, effects: Effects) -> list[str]:
    """The keys a command writes: its operations' lock keys and the nodes its effects write."""
    keys = [
        *command.lock_keys(),
        *(t.lock_key for e in (effects.effect, effects.compensation) if e for t in _nodes_written(e)),
    ]
    return list(dict.fromkeys(keys))


def reads(effects: Effects) -> list[str]:
    """The nodes a relationship needs to exist: they conflict only with a node write in the same run, so
    "merge A, then merge A->B" never tries the relationship before A exists, while many relationships
    to one hub node that nobody writes still go in one query."""
    return [n.lock_key for e in (effects.effect, effects.compensation) for n in _nodes_read(e)]


def nodes_of(target: Target) -> list[NodeTarget]:
    return [target] if isinstance(target, NodeTarget) else [target.start, target.end]


def version_conflicts(effects: Sequence[Effect], versions: Mapping[str, int]) -> dict[int, VersionConflict]:
    """The effects (by index) whose expected version is not their key's (absent: 0, never written)."""
    found: dict[int, VersionConflict] = {}
    for i, effect in enumerate(effects):
        if effect.resource is None:
            continue
        problem = versioning.conflict(effect.resource, effect.expected_version, versions.get(effect.resource, 0))
        if problem is not None:
            found[i] = problem
    return found
