"""What changelog-only coordinator loops put off (orchestrator/deferred.py): taken whole by the next
commit, later states and offsets winning, due DEFER_MS after the first loop put off."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition

from orchestrator.deferred import DEFER_MS, Deferred

OUTCOMES = TopicPartition("p.outcomes", 0)


def state(tx_id: str, phase: str) -> Any:
    return {"intent": {"tx_id": tx_id}, "phase": phase}


def test_nothing_put_off_is_never_due_and_lets_the_poll_wait() -> None:
    deferred = Deferred()
    assert not deferred and not deferred.due(10**9)
    assert deferred.wait_ms(0, 100) == 100
    deferred.put_off({}, {}, [], now=5)  # a loop that read and touched nothing
    assert not deferred and deferred.wait_ms(5, 100) == 100


def test_loops_put_off_are_taken_whole_by_the_next_commit_with_later_states_and_offsets_winning() -> None:
    deferred = Deferred()
    deferred.put_off({"T1": state("T1", "one step done")}, {OUTCOMES: 5}, ["span-1"], now=1000)
    deferred.put_off({"T1": state("T1", "two steps done"), "T2": state("T2", "one step done")}, {OUTCOMES: 7}, [], 1010)
    assert deferred and not deferred.due(1000 + DEFER_MS - 1) and deferred.due(1000 + DEFER_MS)
    assert deferred.wait_ms(1020, 100) == DEFER_MS - 20  # the poll wakes when it is due
    deferred.put_off({"T2": state("T2", "done")}, {OUTCOMES: 9}, ["span-2"], 1020)  # a loop that publishes
    touched, offsets, spans = deferred.take()
    assert {tx: s["phase"] for tx, s in touched.items()} == {"T1": "two steps done", "T2": "done"}
    assert offsets == {OUTCOMES: 9} and spans == ["span-1", "span-2"]
    assert not deferred and deferred.touched == {} and deferred.offsets == {}  # nothing left put off
