"""Which Neo4j batches apply their effects in the transaction's first query (consumers/neo4j/first_group.py):
exactly those whose plan without markers is one group applying every command with one effect query."""

from __future__ import annotations

import uuid

from consumers.command import TypedCommand, parse_command
from consumers.neo4j.effects import effects_of
from consumers.neo4j.first_group import first_group
from polycommit import operations as ops
from polycommit.events import Operation, StepAction, store_command

LABEL = "Item"


def typed(op: Operation, action: StepAction = "EXECUTE", tx_id: str | None = None) -> TypedCommand:
    source = store_command(tx_id or uuid.uuid4().hex, 0, action, op, issued_at_ms=0)
    return parse_command(source, "neo4j", 1024 * 1024)


def first(commands: list[TypedCommand]) -> list[int] | None:
    """The row indexes of the batch's first group, or None when it goes the usual way."""
    group = first_group(commands, {i: effects_of(c) for i, c in enumerate(commands)})
    return None if group is None else [row["i"] for row in group.rows]


def test_fresh_node_merges_of_one_shape_on_distinct_keys_ride_on_the_first_query() -> None:
    batch = [typed(ops.merge_node(LABEL, {"id": f"k{i}"}, {"v": i})) for i in range(3)]
    assert first(batch) == [0, 1, 2]
    group = first_group(batch, {i: effects_of(c) for i, c in enumerate(batch)})
    assert group is not None and "WHERE size(markers) = 0" in group.query


def test_batches_whose_plan_is_not_one_group_of_simple_node_writes_go_the_usual_way() -> None:
    merge = typed(ops.merge_node(LABEL, {"id": "a"}, {"v": 1}))
    unusual = {
        "the same key twice": [merge, typed(ops.merge_node(LABEL, {"id": "a"}, {"v": 2}))],
        "the same step twice": [merge, merge],
        "a compensation": [merge, typed(ops.merge_node(LABEL, {"id": "b"}, {"v": 1}), "COMPENSATE")],
        "two shapes": [merge, typed(ops.merge_node("Other", {"id": "b"}, {"v": 1}))],
        "a delete, which can be refused": [typed(ops.delete_node(LABEL, {"id": "b"}))],
        "an expected version": [typed(ops.merge_node(LABEL, {"id": "b"}, {"v": 1}, expected_version=3))],
        "raw Cypher": [typed(ops.cypher("MERGE (n:Item {id: 'c'})"))],
        "a relationship": [
            typed(ops.merge_relationship("OWNS", ops.node(LABEL, {"id": "a"}), ops.node(LABEL, {"id": "b"})))
        ],
    }
    assert {name: first(batch) for name, batch in unusual.items()} == dict.fromkeys(unusual)
