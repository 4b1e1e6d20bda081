"""Which batches may apply their effects in the transaction's first query, before their markers are known.

A batch transaction's first query reads the markers and locks the versions; the planner then decides from
the markers, and each group's effect query follows, one round trip each. For the common batch (fresh
EXECUTEs of node writes of one shape, on distinct keys, no expected version) the plan without markers is
known in advance: every command applies, as one group. Its effect query then rides on the first query,
guarded to run only if the batch has no marker at all (`cypher.read_markers_lock_versions_then`); when
one exists, nothing was written and the batch is planned and applied as usual. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumers.command import TypedCommand
from consumers.neo4j.cypher import node_effect_query, read_markers_lock_versions_then, row_of
from consumers.neo4j.effects import Effects, NodeTarget
from consumers.neo4j.unit import planned_groups
from consumers.planner import Planned

_SIMPLE_KINDS = frozenset({"merge", "replace"})  # node writes that no state of the graph can refuse


@dataclass(frozen=True)
class FirstGroup:
    """The first query with the batch's one effect query in it, that query's rows, and the plan it
    assumes (no marker): the batch's plan whenever the first query finds none."""

    query: str
    rows: list[dict[str, Any]]
    planned: list[Planned]
    groups: list[list[Planned]]


def first_group(commands: Sequence[TypedCommand], effects: Mapping[int, Effects]) -> FirstGroup | None:
    """The batch's effects as part of its first query, when without markers its plan is one group that
    applies every command in order with a single effect query; None otherwise."""
    if not commands or len(effects) != len(commands) or any(c.action != "EXECUTE" for c in commands):
        return None
    shown = [effects[i] for i in range(len(commands))]
    first = shown[0].effect
    if not isinstance(first.target, NodeTarget):
        return None
    for e in shown:
        effect = e.effect
        if e.raw or effect.kind not in _SIMPLE_KINDS or effect.expected_version is not None:
            return None
        if not isinstance(effect.target, NodeTarget) or effect.target.shape != first.target.shape:
            return None
        if effect.kind != first.kind:
            return None
    planned, groups = planned_groups(commands, effects, {})
    if len(groups) != 1 or [p.position for p in groups[0]] != list(range(len(commands))):
        return None  # a step or a key twice: the usual path orders them
    rows = [{"i": i, **row_of(e.effect)} for i, e in enumerate(shown)]
    query = read_markers_lock_versions_then(node_effect_query(first.kind, first.target.shape))
    return FirstGroup(query, rows, planned, groups)
