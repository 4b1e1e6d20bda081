"""Operations: validation refuses what no store could run; lock keys name resources canonically."""

from __future__ import annotations

import pytest

from consumers.base import Marker, Plan, generations, plan
from orchestrator.admission import reply_target
from polycommit import operations as ops
from polycommit.client import Saga, TransactionResult
from polycommit.errors import InvalidOperationError, PayloadTooLargeError, UnknownStoreError
from polycommit.events import Operation, StepAction, StoreCommand
from polycommit.parsed import PointsOperation, RawOperation, RowOperation, keys_of, parse_operation
from projections import tx_state

LIMIT = 1024 * 1024


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        ({**ops.upsert_row("t", {"id": 1}, {}), "store": "mongodb"}, UnknownStoreError),
        ({**ops.upsert_row("t", {"id": 1}, {}), "kind": "truncate"}, InvalidOperationError),
        (ops.upsert_row("t; DROP TABLE x", {"id": 1}, {}), InvalidOperationError),
        (ops.upsert_row("t", {}, {"v": 1}), InvalidOperationError),
        (ops.upsert_row("t", {"id": 1}, {"bad column": 1}), InvalidOperationError),
        ({**ops.upsert_row("t", {"id": 1}, {}), "key": "not json"}, InvalidOperationError),
        (ops.upsert_row("t", {"id": 1}, {"v": "x" * (LIMIT + 1)}), PayloadTooLargeError),
        (ops.upsert_points("c", []), InvalidOperationError),
        (ops.upsert_points("c", [ops.point(1, [])]), InvalidOperationError),
        (ops.sql("   "), InvalidOperationError),
        (ops.merge_node("Label`) DETACH DELETE n //", {"id": 1}), InvalidOperationError),
        (
            {**ops.merge_relationship("R", ops.node("A", {"id": 1}), ops.node("B", {"id": 2})), "to_node": None},
            InvalidOperationError,
        ),
    ],
)
def test_invalid_operations_are_refused_with_typed_errors(operation: Operation, error: type[Exception]) -> None:
    with pytest.raises(error):
        ops.validate_operation(operation, LIMIT)


def test_valid_operations_pass() -> None:
    for operation in (
        ops.upsert_row("documents", {"id": "d1"}, {"title": "t"}),
        ops.delete_row("documents", {"id": "d1"}),
        ops.upsert_points("docs", [ops.point("d1", [0.1, 0.2], {"a": 1})]),
        ops.delete_points("docs", ["d1"]),
        ops.merge_node("Doc", {"id": 1}, {"x": 2}),
        ops.merge_relationship("WROTE", ops.node("A", {"id": 1}), ops.node("B", {"id": 2})),
        ops.sql("SELECT 1"),
        ops.cypher("RETURN 1"),
    ):
        ops.validate_operation(operation, LIMIT)


def test_lock_keys_are_canonical() -> None:
    a = ops.lock_keys(ops.upsert_row("t", {"b": 2, "a": 1}, {"v": 1}))
    b = ops.lock_keys(ops.delete_row("t", {"a": 1, "b": 2}))
    assert a == b == ['postgres:t:{"a":1,"b":2}']
    assert ops.lock_keys(ops.upsert_points("c", [ops.point("x", [1.0])])) == [f"qdrant:c:{ops.point_id('x')}"]
    assert ops.lock_keys(ops.sql("UPDATE t SET v = 1", lock_keys=["postgres:t:*"])) == ["postgres:t:*"]


def test_point_ids_are_deterministic() -> None:
    assert ops.point_id(7) == ops.point_id("7") == "7"
    assert ops.point_id("doc-1") == ops.point_id("doc-1") != ops.point_id("doc-2")


def _command(action: StepAction) -> StoreCommand:
    return {
        "tx_id": "t",
        "step_index": 0,
        "action": action,
        "attempt": 1,
        "operation": ops.sql("SELECT 1"),
        "compensation": None,
        "before_image": None,
        "issued_at_ms": 0,
        "isolation": "READ_COMMITTED",
    }


def test_marker_plan_table() -> None:
    done, pending = Marker("{}"), Marker("{}", pending=True)
    assert plan(_command("EXECUTE"), None, None) is Plan.APPLY_EXECUTE
    assert plan(_command("EXECUTE"), done, None) is Plan.ALREADY_APPLIED
    assert plan(_command("EXECUTE"), pending, None) is Plan.APPLY_EXECUTE
    assert plan(_command("EXECUTE"), None, done) is Plan.SKIP
    assert plan(_command("COMPENSATE"), None, None) is Plan.RECORD_NOOP_COMPENSATION
    assert plan(_command("COMPENSATE"), done, None) is Plan.APPLY_COMPENSATION
    assert plan(_command("COMPENSATE"), done, done) is Plan.ALREADY_APPLIED
    with pytest.raises(ValueError):
        plan(_command("PREPARE"), None, None)


def test_generations_split_where_a_key_repeats() -> None:
    commands = [_command("EXECUTE")] * 5
    keys = {0: ["a"], 1: ["b"], 2: ["a"], 3: ["c"], 4: ["b", "d"]}
    assert generations(commands, keys) == [[0, 1], [2, 3, 4]]


def test_reply_targets() -> None:
    assert reply_target("polycommit.replies:3") == ("polycommit.replies", 3)
    assert reply_target("my-topic") == ("my-topic", None)
    assert reply_target("") is None


def test_the_changelog_fold_keeps_only_transactions_in_flight() -> None:
    intent = Saga("x", tx_id="a").step(ops.sql("SELECT 1")).intent("", "")
    snapshot = {"intent": intent, "phase": "forward", "started_at_ms": 1}
    stuck = {**snapshot, "phase": "stuck"}
    done = {**snapshot, "phase": "completed"}
    state = tx_state.fold([("a", snapshot), ("b", stuck), ("c", snapshot), ("c", None), ("a", done)])  # type: ignore[list-item]
    assert set(state) == {"b"}
    assert tx_state.summary(state) == {"stuck": 1}
    assert [s["phase"] for s in tx_state.stuck(state)] == ["stuck"]


def test_a_result_event_becomes_a_client_result() -> None:
    event = {
        "tx_id": "t",
        "name": "n",
        "status": "COMPENSATED",
        "started_at_ms": 10,
        "finished_at_ms": 25,
        "error": {"error_class": "StoreError", "message": "boom", "retriable": False},
        "steps": [
            {
                "index": 0,
                "name": "s",
                "store": "postgres",
                "status": "compensated",
                "attempts": 1,
                "compensation_attempts": 1,
                "error": None,
            }
        ],
    }
    result = TransactionResult.from_event(event)
    assert (result.status, result.duration_ms, result.ok) == ("compensated", 15, False)
    assert result.error == "StoreError: boom"


# -- raw SQL that would control the PostgreSQL consumer's shared transaction (issue 9, defect 6) --


@pytest.mark.parametrize(
    "statement",
    [
        "COMMIT",
        "rollback",
        "/* hidden */ BEGIN",
        "START TRANSACTION",
        "SAVEPOINT s",
        "RELEASE SAVEPOINT s",
        "PREPARE TRANSACTION 'x'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "END",
        "UPDATE t SET v = 1; COMMIT",
    ],
)
def test_transaction_control_in_raw_sql_is_refused_when_parsed(statement: str) -> None:
    with pytest.raises(InvalidOperationError):
        ops.validate_operation(ops.sql(statement), 1024 * 1024)


@pytest.mark.parametrize("statement", ["SELECT 'COMMIT; BEGIN'", "SELECT 1 -- ; COMMIT", "SELECT $$;COMMIT$$;"])
def test_transaction_words_inside_literals_and_comments_are_not_refused(statement: str) -> None:
    ops.validate_operation(ops.sql(statement), 1024 * 1024)


# -- typed operations ------------------------------------------------------------------------------


def test_operations_parse_into_typed_values() -> None:
    row = parse_operation(ops.upsert_row("t", {"id": 1}, {"v": 2}), LIMIT)
    assert row == RowOperation("upsert_row", "t", {"id": 1}, {"v": 2})
    points = parse_operation(ops.delete_points("c", ["007", 8]), LIMIT)
    assert isinstance(points, PointsOperation) and points.ids == ("7", "8")
    raw = parse_operation(ops.sql("UPDATE t SET v = $1", [3], lock_keys=["postgres:t:x"]), LIMIT)
    assert raw == RawOperation("postgres", "UPDATE t SET v = $1", (3,), ("postgres:t:x",))
    assert keys_of(points) == ops.lock_keys(ops.delete_points("c", [7, 8])) == ["qdrant:c:7", "qdrant:c:8"]


def test_an_operation_asked_about_again_is_not_parsed_again_and_keeps_its_limits() -> None:
    op = ops.upsert_row("t", {"id": 1}, {"v": "x" * 100})
    parsed = parse_operation(op, LIMIT)
    assert parse_operation(op, LIMIT) is parsed  # the coordinator's later questions reuse the parse
    assert ops.operation_keys(op, LIMIT) == keys_of(parsed) == ['postgres:t:{"id":1}']
    with pytest.raises(PayloadTooLargeError):
        parse_operation(op, 50)  # a smaller limit still refuses it, parsed or not
    equal: Operation = {**op}  # an equal operation, another dict: parsed on its own
    assert parse_operation(equal, LIMIT) == parsed and parse_operation(equal, LIMIT) is not parsed
    bad: Operation = {**op, "key": "not json"}
    for _ in range(2):  # what failed to parse is not kept: it fails each time
        with pytest.raises(InvalidOperationError):
            parse_operation(bad, LIMIT)
