"""The shared batch planner (the exactly-once table with its in-batch marker view, and groups), and outcomes."""

from __future__ import annotations

import json

from consumers.base import INLINE_BEFORE_IMAGE_BYTES, Marker, Plan, Timing, is_reference, outcome
from consumers.command import TypedCommand, parse_command
from consumers.planner import batch_groups, plan_batch
from polycommit import operations as ops
from polycommit.events import Operation, StepAction, store_command
from polycommit.parsed import keys_of

LIMIT = 1024 * 1024


def typed(tx: str, action: StepAction, op: Operation, step: int = 0) -> TypedCommand:
    return parse_command(store_command(tx, step, action, op, issued_at_ms=0), op["store"], LIMIT)  # type: ignore[arg-type]


def test_a_step_planned_earlier_in_the_batch_counts_as_recorded() -> None:
    op = ops.upsert_row("t", {"id": 1}, {"v": 1})
    batch = [
        typed("a", "EXECUTE", op),
        typed("a", "EXECUTE", op),
        typed("a", "COMPENSATE", op),
        typed("a", "EXECUTE", op),
    ]
    planned = plan_batch(batch, {})
    assert [p.decision for p in planned] == [
        Plan.APPLY_EXECUTE,
        Plan.ALREADY_APPLIED,
        Plan.APPLY_COMPENSATION,
        Plan.SKIP,
    ]
    assert planned[1].earlier == 0 and planned[2].earlier == 0 and planned[2].execute is None


def test_markers_from_the_store_decide_and_are_handed_on() -> None:
    op = ops.upsert_row("t", {"id": 1}, {"v": 1})
    stored = Marker('{"row":{"id":1,"v":0}}')
    planned = plan_batch([typed("a", "COMPENSATE", op), typed("b", "COMPENSATE", op)], {"a/0/EXECUTE": stored})
    assert [p.decision for p in planned] == [Plan.APPLY_COMPENSATION, Plan.RECORD_NOOP_COMPENSATION]
    assert planned[0].execute == stored and planned[0].earlier is None


def test_groups_split_on_a_repeated_key_and_keep_a_step_in_order() -> None:
    a, b = ops.upsert_row("t", {"id": 1}, {}), ops.upsert_row("t", {"id": 2}, {})
    batch = [typed("x", "EXECUTE", a), typed("y", "EXECUTE", b), typed("z", "EXECUTE", a), typed("y", "COMPENSATE", b)]
    planned = plan_batch(batch, {})
    groups = batch_groups(planned, lambda p: keys_of(p.command.operation))
    assert [[p.position for p in g] for g in groups] == [[0, 1], [2, 3]]
    alone = batch_groups(planned, lambda p: keys_of(p.command.operation), alone=lambda p: p.position == 1)
    assert [[p.position for p in g] for g in alone] == [[0], [1], [2, 3]]


def test_reads_conflict_only_with_writes_of_the_same_run() -> None:
    a, b = ops.upsert_row("t", {"id": 1}, {}), ops.upsert_row("t", {"id": 2}, {})
    planned = plan_batch([typed("x", "EXECUTE", a), typed("y", "EXECUTE", b)], {})
    groups = batch_groups(
        planned,
        lambda p: keys_of(p.command.operation) if p.position == 0 else [],
        reads=lambda p: ['postgres:t:{"id":1}'] if p.position == 1 else [],
    )
    assert [[p.position for p in g] for g in groups] == [[0], [1]]


def test_a_before_image_too_big_to_travel_becomes_a_reference_to_the_marker() -> None:
    command = store_command("tx", 3, "EXECUTE", ops.upsert_row("t", {"id": 1}, {}), issued_at_ms=0)
    small, big = '{"row":null}', '{"row":"' + "x" * INLINE_BEFORE_IMAGE_BYTES + '"}'
    timing = Timing(0, 0)
    assert outcome(command, "postgres", "APPLIED", timing, before_image=small)["before_image"] == small
    travelled = outcome(command, "postgres", "APPLIED", timing, before_image=big)["before_image"]
    assert travelled is not None and is_reference(travelled)
    assert json.loads(travelled) == {"in_marker": "tx/3/EXECUTE"}
