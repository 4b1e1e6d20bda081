"""The checker's pure rules, on synthetic histories: key states, the log's own rules, leftovers.

Two-phase commit is written to its contract (Decision records, PREPARE outcomes, `pc_` gids) before it
runs: these histories are what its log will look like.
"""

from __future__ import annotations

import json
from typing import Any

from polycommit import operations as ops
from polycommit.client import Transaction
from polycommit.tooling.checker.expectations import expectations
from polycommit.tooling.checker.history import History
from polycommit.tooling.checker.keys import Applied, key_states, resource_of
from polycommit.tooling.checker.leftovers import orphans, prepared_left, scopes
from polycommit.tooling.checker.log import fold, log_violations
from polycommit.tooling.checker.report import (
    APPLIED_TWICE,
    CONFLICTING,
    EFFECT_MISSING,
    EFFECT_PRESENT,
    EFFECT_WRONG,
    LOST,
    ORPHAN,
    PREPARED_LEFT,
    UNDECIDED,
)
from polycommit.tooling.checker.verdict import Found, judge_effects, triage

ROW = {"id": "r1"}


def row_write(tx_id: str, v: int | None, step: int = 0) -> Any:
    op = ops.upsert_row("t", ROW, {"v": v}) if v is not None else ops.delete_row("t", ROW)
    return expectations(tx_id, step, op)


def image(row: dict[str, Any] | None) -> str:
    return json.dumps({"row": row})


def judge(
    expects: list[Any], finals: dict[str, str], applied: dict[Any, Applied], row: Any, grants: Any = None
) -> list[str]:
    states, _ = key_states(expects, finals, applied, fresh_keys=False, grants=grants)
    rows = {("t", ("id",), json.dumps(ROW)): [row]} if row is not None else {}
    return [v.kind for v in judge_effects(states, finals, Found(rows, {}, {}))]


def test_a_compensated_update_of_an_existing_row_must_bring_the_old_value_back() -> None:
    applied = {("b", 0): Applied(2.0, image({"id": "r1", "v": 1}))}
    finals = {"b": "compensated"}
    assert judge(row_write("b", 5), finals, applied, {"id": "r1", "v": 1}) == []
    assert judge(row_write("b", 5), finals, applied, {"id": "r1", "v": 5}) == [EFFECT_PRESENT]
    assert judge(row_write("b", 5), finals, applied, {"id": "r1", "v": 1, "w": 0}) == [EFFECT_PRESENT]
    # Deleting the row is not an undo: it existed before.
    assert judge(row_write("b", 5), finals, applied, None) == [EFFECT_PRESENT]


def test_a_compensated_delete_must_restore_the_row() -> None:
    applied = {("d", 0): Applied(1.0, image({"id": "r1", "v": 3}))}
    assert judge(row_write("d", None), {"d": "compensated"}, applied, {"id": "r1", "v": 3}) == []
    assert judge(row_write("d", None), {"d": "compensated"}, applied, None) == [EFFECT_PRESENT]


def test_the_last_completed_writer_in_applied_order_decides_a_shared_key() -> None:
    expects = [*row_write("a", 1), *row_write("b", 2), *row_write("c", 3)]
    finals = {"a": "completed", "b": "completed", "c": "compensated"}
    # b applied before a: a is the last completed writer; c was undone.
    applied = {("a", 0): Applied(3.0), ("b", 0): Applied(1.0), ("c", 0): Applied(4.0, image({"id": "r1", "v": 1}))}
    assert judge(expects, finals, applied, {"id": "r1", "v": 1}) == []
    assert judge(expects, finals, applied, {"id": "r1", "v": 2}) == [EFFECT_WRONG]
    assert judge(expects, finals, applied, None) == [EFFECT_MISSING]


RESOURCE = 'postgres:t:{"id":"r1"}'


def test_the_lock_grant_order_decides_a_shared_key_and_a_stale_earlier_value_is_a_violation() -> None:
    """Planted: two sagas on one key, the second granted it after the first ended; the store still holds
    the first one's value (a compensation-like overwrite, or a lost write) although the second completed."""
    expects = [*row_write("a", 1), *row_write("b", 2)]
    finals = {"a": "completed", "b": "completed"}
    applied = {("a", 0): Applied(5.0), ("b", 0): Applied(1.0)}  # the stores' clocks say otherwise
    grants = {RESOURCE: ["a", "b"]}
    wrong = judge(expects, finals, applied, {"id": "r1", "v": 1}, grants)
    assert wrong == [EFFECT_WRONG]
    states, _ = key_states(expects, finals, applied, fresh_keys=False, grants=grants)
    assert [s.expect.tx_id for s in states] == ["b"]  # the violation names the later, completed writer
    assert judge(expects, finals, applied, {"id": "r1", "v": 2}, grants) == []
    # Without the lock log, applied order decides (b applied first, so a's value is right).
    assert judge(expects, finals, applied, {"id": "r1", "v": 1}) == []


def test_a_compensated_later_writer_contributes_nothing_and_a_writer_without_a_lock_falls_back() -> None:
    expects = [*row_write("a", 1), *row_write("c", 3)]
    finals = {"a": "completed", "c": "compensated"}
    applied = {("a", 0): Applied(1.0), ("c", 0): Applied(2.0, image({"id": "r1", "v": 1}))}
    grants = {RESOURCE: ["a", "c"]}
    assert judge(expects, finals, applied, {"id": "r1", "v": 1}, grants) == []
    assert judge(expects, finals, applied, {"id": "r1", "v": 3}, grants) == [EFFECT_WRONG]
    # b opted out of locks (no grant): the applied times order the writers (b first, a last).
    both = [*row_write("a", 1), *row_write("b", 2)]
    done = {"a": "completed", "b": "completed"}
    times = {("a", 0): Applied(3.0), ("b", 0): Applied(1.0)}
    assert judge(both, done, times, {"id": "r1", "v": 1}, {RESOURCE: ["a"]}) == []
    assert judge(both, done, times, {"id": "r1", "v": 2}, {RESOURCE: ["a"]}) == [EFFECT_WRONG]


def test_a_writer_that_never_got_the_lock_nor_applied_does_not_turn_the_order_to_applied_times() -> None:
    """Found by `chaos --mode mixed --hot-keys`: a saga that timed out waiting for the key (FAILED, nothing
    ran) made the checker order the others by applied time, which put a saga's write after a later
    two-phase commit's (its stores' clocks say so) and reported the right final value as wrong."""
    expects = [*row_write("saga", 1), *row_write("strong", 2), *row_write("timed-out", 3)]
    finals = {"saga": "completed", "strong": "committed", "timed-out": "failed"}
    applied = {("saga", 0): Applied(5.0), ("strong", 0): Applied(1.0)}  # no marker of the timed-out one
    grants = {RESOURCE: ["saga", "strong"]}
    assert judge(expects, finals, applied, {"id": "r1", "v": 2}, grants) == []
    assert judge(expects, finals, applied, {"id": "r1", "v": 1}, grants) == [EFFECT_WRONG]
    # One that applied without a grant (it opted out of locks) still turns the order to applied times.
    applied[("timed-out", 0)] = Applied(0.5)
    finals["timed-out"] = "completed"
    assert judge(expects, finals, applied, {"id": "r1", "v": 1}, grants) == []


def test_an_expectation_names_its_resource_as_its_lock_key() -> None:
    for op in (
        ops.upsert_row("t", {"id": "r1"}, {"v": 1}),
        ops.upsert_points("c", [ops.point("p1", [0.1, 0.2])]),
        ops.merge_node("N", {"id": 7}, {"v": 1}),
    ):
        assert [resource_of(e) for e in expectations("a", 0, op)] == ops.lock_keys(op)


def test_the_log_fold_keeps_each_resources_grants_in_order() -> None:
    def event(tx_id: str, action: str) -> dict[str, Any]:
        return {"tx_id": tx_id, "resource": RESOURCE, "action": action}

    locks = [event("a", "GRANTED"), event("b", "WAITING"), event("a", "RELEASED"), event("b", "GRANTED")]
    _, facts = fold([], [], [], [], 0, locks)
    assert facts.grants == {RESOURCE: ["a", "b"]}


def test_a_key_written_by_a_transaction_still_running_or_stuck_is_pending() -> None:
    expects = [*row_write("a", 1), *row_write("s", 2)]
    for status in ("stuck", "in-flight"):
        states, pending = key_states(expects, {"a": "completed", "s": status}, {}, fresh_keys=False)
        assert (states, pending) == ([], 1)


def test_with_fresh_keys_an_undone_write_with_no_before_image_must_be_absent() -> None:
    states, _ = key_states(row_write("b", 5), {"b": "failed"}, {}, fresh_keys=True)
    assert [s.values for s in states] == [None]
    assert key_states(row_write("b", 5), {"b": "failed"}, {}, fresh_keys=False) == ([], 0)


def outcome(tx_id: str, action: str, status: str, step: int = 0) -> dict[str, Any]:
    return {"tx_id": tx_id, "step_index": step, "action": action, "status": status, "at_ms": 1, "before_image": None}


def intent(tx_id: str, consistency: str = "STRONG") -> dict[str, Any]:
    tx = Transaction(tx_id=tx_id, consistency=consistency)  # type: ignore[arg-type]
    tx.add(ops.upsert_row("t", {"id": tx_id}, {"v": 1}))
    return dict(tx.intent("", "test"))


def decision(tx_id: str, outcome: str) -> dict[str, Any]:
    return {"tx_id": tx_id, "outcome": outcome, "participants": ["postgres"], "reason": "", "at_ms": 1}


def test_votes_without_a_decision_are_undecided_and_a_decision_is_the_commit_point() -> None:
    history, facts = fold(
        [intent("u"), intent("c")],
        [outcome("u", "PREPARE", "PREPARED"), outcome("c", "PREPARE", "PREPARED")],
        [],
        [decision("c", "COMMIT")],
    )
    assert [(v.tx_id, v.kind) for v in log_violations(history, facts)] == [("u", UNDECIDED)]
    assert history.final("c") == "committed"
    assert history.final("u") is None and history.open_is_pending


def test_a_step_applied_twice_and_two_different_decisions_are_violations() -> None:
    history, facts = fold(
        [intent("a", "EVENTUAL"), intent("b")],
        [
            outcome("a", "EXECUTE", "APPLIED"),
            outcome("a", "EXECUTE", "ALREADY_APPLIED"),
            outcome("a", "EXECUTE", "APPLIED"),
        ],
        [],
        [decision("b", "COMMIT"), decision("b", "ABORT")],
    )
    assert sorted((v.tx_id, v.kind) for v in log_violations(history, facts)) == [
        ("a", APPLIED_TWICE),
        ("b", CONFLICTING),
    ]


def test_a_replayed_intent_is_one_transaction_and_the_vote_carries_the_before_image() -> None:
    vote = {**outcome("a", "PREPARE", "PREPARED"), "at_ms": 7, "before_image": image(None)}
    history, facts = fold([intent("a"), intent("a")], [vote], [], [])
    assert list(history.intents) == ["a"]
    assert facts.applied[("a", 0)] == Applied(7.0, image(None))


def test_orphans_are_scanned_in_the_key_space_the_log_names_only() -> None:
    expects = [e for i in range(3) for e in expectations(f"t{i}", 0, ops.upsert_row("t", {"id": f"run1-{i}"}, {}))]
    (scope,) = scopes(expects)
    assert (scope.target, scope.column, scope.prefix) == ("t", "id", "run1-")
    found = orphans(scope, ["run1-0", "run1-1", "run1-2", "run1-x"])
    assert [(v.kind, v.store) for v in found] == [(ORPHAN, "postgres")]
    # Keys that share no prefix give no scan: every row of the table would be an "orphan".
    assert scopes(expectations("t", 0, ops.upsert_row("t", {"id": "a"}, {}))) == []


def test_a_prepared_transaction_is_left_over_once_its_transaction_is_decided() -> None:
    history, _ = fold([intent("11111111-aaaa"), intent("22222222-bbbb")], [], [], [decision("11111111-aaaa", "ABORT")])
    gids = ["pc_11111111-aaaa_0", "pc_22222222bbbb_0", "pc_someone-else", "other_11111111-aaaa"]
    found, pending = prepared_left(gids, history)
    assert [(v.tx_id, v.kind) for v in found] == [("11111111-aaaa", PREPARED_LEFT)]
    assert pending == 1


def test_no_result_is_lost_for_a_workload_and_in_flight_for_the_log() -> None:
    workload = History()
    workload.invoke(Transaction(tx_id="a"))
    assert [v.kind for v in triage(workload).violations] == [LOST]
    log, _ = fold([intent("a", "EVENTUAL")], [], [], [])
    found = triage(log)
    assert (found.violations, found.statuses) == ([], {"in-flight": 1})


def test_a_point_comes_back_as_its_before_image_and_an_unreadable_image_judges_nothing() -> None:
    pid = ops.point_id("p1")
    (expect,) = expectations("q", 0, ops.upsert_points("c", [ops.point(pid, [1.0, 0.0], {"v": 2})]))
    before = json.dumps({"points": {pid: {"vector": [0.0, 1.0], "payload": {"v": 1}}}})
    (state,) = key_states([expect], {"q": "compensated"}, {("q", 0): Applied(1.0, before)}, fresh_keys=True)[0]
    assert (state.values, state.vector, state.restored) == ({"v": 1}, [0.0, 1.0], True)
    unreadable = {("q", 0): Applied(1.0, "{not json")}
    assert key_states([expect], {"q": "compensated"}, unreadable, fresh_keys=True) == ([], 0)
