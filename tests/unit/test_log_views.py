"""The operators' views of the log as pure folds: dead letters, the statuses in `results`, recovery's report.

Records in, state out, no broker: what `polycommit dead-letters`, `status`, `recover` and the checker's
history compute once the tooling has read a topic.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from polycommit.codec import default_codec
from polycommit.deadletters import dead_letter
from polycommit.errors import InvalidOperationError
from projections import dead_letters, recovery, results


def _letter_bytes(offset: int, at_ms: int, key: bytes | None, payload: bytes) -> bytes:
    record = SimpleNamespace(topic="t.commands.postgres", partition=0, offset=offset, key=key, value=payload)
    letter: dict[str, Any] = dict(dead_letter(record, InvalidOperationError("bad"), "postgres", tx_id="tx"))
    letter["at_ms"] = at_ms
    return default_codec().encode("DeadLetter", letter)


def test_dead_letters_come_oldest_first_with_the_payload_as_its_size_and_garbage_skipped() -> None:
    values = [_letter_bytes(2, 200, b"k2", b"xyz"), b"not avro at all", _letter_bytes(1, 100, None, b"ab"), None]
    letters = dead_letters.fold(default_codec(), values)
    assert [letter["offset"] for letter in letters] == [1, 2]
    assert [letter["payload"] for letter in letters] == ["2 bytes", "3 bytes"]
    assert [letter["key"] for letter in letters] == [None, "k2"]
    assert letters[0]["error_class"] == "InvalidOperationError"


def test_a_dead_letter_limit_keeps_the_newest() -> None:
    values = [_letter_bytes(i, 1000 - i, None, b"") for i in range(5)]
    assert [letter["offset"] for letter in dead_letters.fold(default_codec(), values, limit=2)] == [1, 0]


def test_results_keep_each_distinct_status_in_order_and_a_repeat_once() -> None:
    state = results.fold([("a", "COMPLETED"), ("b", "stuck"), ("a", "completed"), ("b", "COMPENSATED"), ("a", "x")])
    assert state == {"a": ["completed", "x"], "b": ["stuck", "compensated"]}
    assert results.final(state["a"]) == "completed"  # the last terminal status wins over a later other one
    assert results.final(["stuck"]) == "stuck"
    assert results.final([]) is None


def test_the_log_corrects_what_a_client_heard_and_keeps_what_only_the_client_heard() -> None:
    client = {"a": ["completed"], "b": ["failed"], "c": ["completed"]}
    merged = results.merge(client, {"a": ["compensated"], "b": ["failed"], "d": ["completed"]})
    assert merged == {"a": ["compensated", "completed"], "b": ["failed"], "c": ["completed"], "d": ["completed"]}


def _snapshot(phase: str) -> Any:
    return {"phase": phase}


def test_recovery_waits_for_the_open_transactions_but_not_the_stuck_ones() -> None:
    report = recovery.begin({"a": _snapshot("forward"), "b": _snapshot("compensating"), "s": _snapshot("stuck")})
    assert recovery.waiting(report) == {"a", "b"}
    recovery.record(report, "a", "COMPLETED")
    recovery.record(report, "elsewhere", "COMPLETED")  # not in flight when recovery began: not ours
    assert recovery.waiting(report) == {"b"}
    done = recovery.finish(report, 1.5)
    assert done.finished == {"a": "completed"}
    assert done.unfinished == ["b"]
    assert done.still_stuck == ["s"]
    assert not done.ok
    assert done.to_json()["phases"] == {"forward": 1, "compensating": 1, "stuck": 1}


def test_a_stuck_transaction_that_resolves_during_recovery_is_finished_not_stuck() -> None:
    report = recovery.begin({"s": _snapshot("stuck"), "t": _snapshot("forward")})
    recovery.record(report, "s", "compensated")
    recovery.record(report, "t", "stuck")
    done = recovery.finish(report, 0.1)
    assert done.still_stuck == ["t"]
    assert done.unfinished == []
    assert done.finished == {"s": "compensated", "t": "stuck"}


def test_recovery_reports_per_transaction_the_prepared_batches_settled_for_it() -> None:
    report = recovery.begin({"a": _snapshot("preparing"), "b": _snapshot("committing"), "c": _snapshot("forward")})
    report.settled = [
        {"gid": "pc_x_b1", "action": "COMMIT", "why": "COMMIT", "transactions": "a,b"},
        {"gid": "pc_x_b2", "action": "ROLLBACK", "why": "ABORT", "transactions": "b"},
        {"gid": "pc_x_a_0", "action": "ROLLBACK", "why": "presumed abort"},  # a one-step gid: no members
    ]
    transactions = recovery.finish(report, 0.1).to_json()["transactions"]
    assert transactions["a"]["settled_gids"] == ["pc_x_b1: COMMIT"]
    assert transactions["b"]["settled_gids"] == ["pc_x_b1: COMMIT", "pc_x_b2: ROLLBACK"]
    assert transactions["c"]["settled_gids"] == []
