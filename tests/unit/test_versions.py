"""Optimistic concurrency without servers: expected versions parsed, checked and bumped by each store's effects."""

from __future__ import annotations

import json

import pytest

from consumers.base import Plan
from consumers.command import TypedCommand, parse_command
from consumers.neo4j import effects as graph
from consumers.planner import batch_groups, plan_batch
from consumers.postgres import effects as rows
from consumers.qdrant import effects as points
from consumers.qdrant.backend import PointData
from consumers.qdrant.effects import PointWrites
from consumers.twophase import as_saga
from polycommit import operations as ops
from polycommit import versioning
from polycommit.errors import InvalidOperationError, PermanentError, VersionConflict
from polycommit.events import Operation, StepAction, store_command
from polycommit.parsed import NodeOperation, PointsOperation, RawOperation, RowOperation, keys_of, parse_operation

LIMIT = 1024 * 1024


def typed(tx: str, action: StepAction, op: Operation, step: int = 0) -> TypedCommand:
    return parse_command(store_command(tx, step, action, op, issued_at_ms=0), op["store"], LIMIT)  # type: ignore[arg-type]


# -- the operation carries it ---------------------------------------------------------------------------


def test_every_structured_builder_carries_its_expected_version_into_the_parsed_operation() -> None:
    built = [
        ops.upsert_row("t", {"id": 1}, {"v": 1}, expected_version=3),
        ops.delete_row("t", {"id": 1}, expected_version=3),
        ops.upsert_points("c", [ops.point(1, [1.0], {})], expected_version=3),
        ops.delete_points("c", [1], expected_version=3),
        ops.merge_node("N", {"id": 1}, expected_version=3),
        ops.delete_node("N", {"id": 1}, expected_version=3),
        ops.merge_relationship("R", ops.node("N", {"id": 1}), ops.node("N", {"id": 2}), expected_version=3),
        ops.delete_relationship("R", ops.node("N", {"id": 1}), ops.node("N", {"id": 2}), expected_version=3),
    ]
    for op in built:
        parsed = parse_operation(op, LIMIT)
        assert not isinstance(parsed, RawOperation) and parsed.expected_version == 3, op["kind"]
    assert parse_operation(ops.upsert_row("t", {"id": 1}, {}), LIMIT).expected_version is None  # type: ignore[union-attr]


@pytest.mark.parametrize("expected", [-1, True, 1.5])
def test_an_expected_version_that_is_not_a_natural_number_is_refused(expected: object) -> None:
    op = ops.upsert_row("t", {"id": 1}, {})
    op["expected_version"] = expected  # type: ignore[typeddict-item]
    with pytest.raises(InvalidOperationError, match="expected_version"):
        parse_operation(op, LIMIT)


def test_raw_steps_cannot_expect_a_version() -> None:
    for raw in (ops.sql("UPDATE t SET v = 1"), ops.cypher("MATCH (n) RETURN n")):
        raw["expected_version"] = 0
        with pytest.raises(InvalidOperationError, match="structured operations only"):
            parse_operation(raw, LIMIT)


def test_a_version_conflict_is_permanent_and_names_what_it_saw() -> None:
    problem = versioning.conflict("postgres:t:{}", 2, 5)
    assert isinstance(problem, VersionConflict) and isinstance(problem, PermanentError)
    assert not problem.retriable and problem.error_class == "VersionConflict"
    assert (problem.resource, problem.expected, problem.actual) == ("postgres:t:{}", 2, 5)
    assert versioning.conflict("k", None, 5) is None and versioning.conflict("k", 5, 5) is None


def test_a_decided_commit_applies_without_its_expected_version() -> None:
    commit = typed("a", "EXECUTE", ops.merge_node("N", {"id": 1}, expected_version=4))
    commit.source["action"] = "COMMIT"
    executed = as_saga(commit)
    assert executed.action == "EXECUTE"
    assert isinstance(executed.operation, NodeOperation) and executed.operation.expected_version is None


# -- PostgreSQL -------------------------------------------------------------------------------------------


def test_postgres_checks_each_row_against_its_locked_version_and_an_absent_one_is_zero() -> None:
    a = RowOperation("upsert_row", "t", {"id": 1}, {}, expected_version=2)
    b = RowOperation("upsert_row", "t", {"id": 2}, {}, expected_version=0)
    c = RowOperation("delete_row", "t", {"id": 3}, {})
    assert rows.resource(a) == keys_of(a)[0]
    assert rows.checks_versions([c]) is False and rows.checks_versions([a, c]) is True
    versions = {rows.resource(a): 2, rows.resource(c): 7}
    assert rows.version_conflicts([(0, a), (1, b), (2, c)], versions) == {}
    stale = rows.version_conflicts([(0, a), (1, b)], {rows.resource(a): 3, rows.resource(b): 1})
    assert sorted(stale) == [0, 1] and (stale[1].expected, stale[1].actual) == (0, 1)


def test_a_postgres_restore_expects_no_version() -> None:
    op = RowOperation("upsert_row", "t", {"id": 1}, {"v": 2}, expected_version=1)
    assert rows.restoring(op, '{"row": {"id": 1, "v": 1}}').expected_version is None
    assert rows.restoring(op, '{"row": null}').expected_version is None


# -- Neo4j ------------------------------------------------------------------------------------------------


def test_neo4j_effects_carry_the_expected_version_and_the_lock_key_as_resource() -> None:
    node = parse_operation(ops.merge_node("N", {"id": 1}, {"x": 1}, expected_version=2), LIMIT)
    rel = parse_operation(
        ops.merge_relationship("R", ops.node("N", {"id": 1}), ops.node("M", {"id": 2}), expected_version=0), LIMIT
    )
    node_effect, rel_effect = graph.effect_of(node), graph.effect_of(rel)
    assert (node_effect.resource, node_effect.expected_version) == (keys_of(node)[0], 2)
    assert (rel_effect.resource, rel_effect.expected_version) == (keys_of(rel)[0], 0)
    assert graph.effect_of(parse_operation(ops.cypher("RETURN 1"), LIMIT)).resource is None
    restore = graph.restoring(node_effect.target, '{"node": {"id": 1}}')  # type: ignore[arg-type]
    assert restore.expected_version is None and restore.resource == node_effect.resource


def test_neo4j_conflicts_are_the_effects_whose_key_moved_on() -> None:
    first = graph.effect_of(parse_operation(ops.merge_node("N", {"id": 1}, expected_version=1), LIMIT))
    second = graph.effect_of(parse_operation(ops.delete_node("N", {"id": 2}, expected_version=0), LIMIT))
    free = graph.effect_of(parse_operation(ops.merge_node("N", {"id": 3}), LIMIT))
    assert first.resource and second.resource and free.resource
    fine = {first.resource: 1, free.resource: 9}
    assert graph.version_conflicts([first, second, free], fine) == {}
    moved = graph.version_conflicts([first, second, free], {first.resource: 2, second.resource: 4})
    assert sorted(moved) == [0, 1] and moved[1].actual == 4


# -- Qdrant -----------------------------------------------------------------------------------------------


def _writes(op: Operation, size: int = 2) -> tuple[PointsOperation, PointWrites]:
    parsed = parse_operation(op, LIMIT)
    assert isinstance(parsed, PointsOperation)
    return parsed, points.writes_of(parsed, {"c": size})


def test_qdrant_writes_carry_a_bumped_version_and_deletes_leave_a_tombstone() -> None:
    _, upserts = _writes(ops.upsert_points("c", [ops.point(1, [1.0, 0.0], {"n": 1}), ops.point(2, [0.0, 1.0])]))
    stored = points.versioned(upserts, {"1": 4})
    assert stored.upserts["c"]["1"]["payload"] == {"n": 1, versioning.VERSION_FIELD: 5}
    assert stored.upserts["c"]["2"]["payload"] == {versioning.VERSION_FIELD: 1}  # never written: 0 -> 1
    assert upserts.upserts["c"]["1"]["payload"] == {"n": 1}  # the step's own writes are left as they were
    _, deletes = _writes(ops.delete_points("c", [1]))
    gone = points.versioned(deletes, {"1": 5})
    assert gone.deletes == {"c": ["1"]}
    grave = gone.upserts[versioning.TOMBSTONES][versioning.tombstone_id("c", "1")]
    assert versioning.payload_version(grave["payload"]) == 6


def test_a_deleted_point_keeps_its_version_so_expecting_zero_fails() -> None:
    op, writes = _writes(ops.upsert_points("c", [ops.point(1, [1.0, 0.0])], expected_version=0))
    grave: dict[str, PointData] = {
        versioning.tombstone_id("c", "1"): {"vector": [1.0], "payload": {versioning.VERSION_FIELD: 6}}
    }
    versions = points.current_versions(writes.touched(), {"c": {}}, grave)
    assert versions == {"1": 6}
    problem = points.version_conflict(op, versions)
    assert problem is not None and (problem.expected, problem.actual) == (0, 6)
    alive: dict[str, dict[str, PointData]] = {
        "c": {"1": {"vector": [1.0, 0.0], "payload": {versioning.VERSION_FIELD: 8}}}
    }
    assert points.current_versions(writes.touched(), alive, grave) == {"1": 8}  # the live point's own wins


def test_one_expected_version_applies_to_every_point_of_the_operation() -> None:
    op, _ = _writes(ops.upsert_points("c", [ops.point(1, [1.0, 0.0]), ops.point(2, [0.0, 1.0])], expected_version=3))
    assert points.version_conflict(op, {"1": 3, "2": 3}) is None
    problem = points.version_conflict(op, {"1": 3, "2": 4})
    assert problem is not None and problem.resource == "qdrant:c:2"


def test_a_qdrant_before_image_keeps_the_users_payload_and_records_the_versions() -> None:
    _, writes = _writes(ops.upsert_points("c", [ops.point(1, [1.0, 0.0]), ops.point(2, [0.0, 1.0])]))
    found: dict[str, dict[str, PointData]] = {
        "c": {"1": {"vector": [1.0, 0.0], "payload": {"n": 1, versioning.VERSION_FIELD: 4}}}
    }
    image = points.before_image(writes, found, {"1": 4, "2": 2})
    assert json.loads(image) == {
        "points": {"1": {"vector": [1.0, 0.0], "payload": {"n": 1}}, "2": None},
        "versions": {"1": 4, "2": 2},
    }
    assert points.recorded_versions(image) == {"1": 4, "2": 2}
    assert points.recorded_versions('{"points": {}}') == {}  # a marker from before versions existed
    restore = points.restore_writes("c", image)
    assert restore.upserts["c"]["1"]["payload"] == {"n": 1} and restore.deletes == {"c": ["2"]}


def test_the_version_field_and_the_tombstone_collection_are_reserved() -> None:
    with pytest.raises(InvalidOperationError, match="reserved"):
        _writes(ops.upsert_points("c", [ops.point(1, [1.0, 0.0], {versioning.VERSION_FIELD: 9})]))
    parsed = parse_operation(ops.delete_points(versioning.TOMBSTONES, [1]), LIMIT)
    assert isinstance(parsed, PointsOperation)
    with pytest.raises(InvalidOperationError, match="reserved"):
        points.writes_of(parsed, {versioning.TOMBSTONES: 1})


# -- one key twice in one batch ---------------------------------------------------------------------------


def test_two_commands_on_one_key_in_one_batch_run_in_successive_groups() -> None:
    """Each group locks, checks and bumps its keys before the next runs, in the same local transaction,
    so the second writer of a key sees the first one's bump (and its expected version is judged on it)."""
    first = ops.upsert_row("t", {"id": 1}, {"v": 1}, expected_version=0)
    second = ops.upsert_row("t", {"id": 1}, {"v": 2}, expected_version=1)
    other = ops.upsert_row("t", {"id": 2}, {"v": 1}, expected_version=0)
    planned = plan_batch(
        [typed("a", "EXECUTE", first), typed("b", "EXECUTE", other), typed("c", "EXECUTE", second)], {}
    )
    assert [p.decision for p in planned] == [Plan.APPLY_EXECUTE] * 3
    groups = batch_groups(planned, rows.writes)
    assert [[p.position for p in g] for g in groups] == [[0, 1], [2]]
