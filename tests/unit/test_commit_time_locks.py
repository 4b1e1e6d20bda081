"""A transaction's commit-time locks (polycommit.interactive, lock_at="commit"): ONE LockRequest asks the
writes' keys EXCLUSIVE and the keys only read SHARED (`shared_keys`), queued at one arrival, so two such
requests never close a cycle, however their keys cross; a waiting one is restored in both modes."""

from __future__ import annotations

from lock_requests import request

from orchestrator import registry
from orchestrator.interactive import Interactive
from orchestrator.interactive_model import LockRequested, OpenLocks
from orchestrator.locks import EXCLUSIVE, SHARED
from orchestrator.protocol import LocksGranted, restore_locks
from orchestrator.saga import SagaPolicy
from polycommit.events import LockRequest

POLICY = SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=2)
A, B = 'postgres:t:{"id":"a"}', 'postgres:t:{"id":"b"}'


def table() -> Interactive:
    sagas = registry.protocols(POLICY)["saga"]
    assert isinstance(sagas, Interactive)
    return sagas


def at_commit(tx_id: str, writes: list[str], reads: list[str], n: int = 1) -> LockRequest:
    return request(tx_id, n, writes, "EXCLUSIVE", shared_keys=reads, isolation="SERIALIZABLE")


def test_one_request_holds_its_writes_exclusive_and_its_reads_shared() -> None:
    p = table()
    t = p.open(at_commit("T1", [A], [B]), 0)
    assert [r["status"] for r in t.lock_replies] == ["GRANTED"]
    assert p.locks.holders(A) == {"T1": EXCLUSIVE} and p.locks.holders(B) == {"T1": SHARED}
    assert OpenLocks.of(t.state).held == {A: "EXCLUSIVE", B: "SHARED"}
    assert [(e["resource"], e["mode"], e["action"]) for e in t.lock_requests] == [
        (A, "EXCLUSIVE", "GRANTED"),
        (B, "SHARED", "GRANTED"),
    ]
    reader = p.open(at_commit("T2", [], [B]), 1)  # another reader of B shares it
    writer = p.open(at_commit("T3", [B], []), 2)  # a writer of B waits for both readers
    assert [r["status"] for r in reader.lock_replies] == ["GRANTED"] and not writer.lock_replies
    assert p.locks.blockers("T3") == ["T1", "T2"]


def test_crossing_commit_time_requests_wait_in_one_order_and_never_close_a_cycle() -> None:
    p = table()
    first = p.open(at_commit("T1", [A], [B]), 0)  # writes a, read b
    second = p.open(at_commit("T2", [B], [A]), 1)  # writes b, read a: the keys cross
    assert first.lock_replies and not second.lock_replies
    assert p.locks.blockers("T2") == ["T1"] and p.locks.blockers("T1") == []
    assert second.cycles == [] and p.locks.mutual_waits("T2") == []
    released = p.decide(first.state, LockRequested({**at_commit("T1", [], [], 2), "release": True}), 5)
    assert released.wake == ["T2"]
    granted = p.decide(second.state, LocksGranted(), 6)
    assert [(r["request"], r["status"]) for r in granted.lock_replies] == [(1, "GRANTED")]
    assert p.locks.holders(B) == {"T2": EXCLUSIVE} and p.locks.holders(A) == {"T2": SHARED}
    assert OpenLocks.of(granted.state).held == {A: "SHARED", B: "EXCLUSIVE"}


def test_a_waiting_commit_time_request_is_restored_in_both_modes() -> None:
    p = table()
    first = p.open(at_commit("T1", [A], []), 0)
    second = p.open(at_commit("T2", [B], [A]), 1)  # b granted, a (SHARED) waits for T1
    assert OpenLocks.of(second.state).waiting_shared == [A]
    fresh = table()
    assert restore_locks([fresh], [first.state, second.state]) == []
    assert fresh.locks.holders(A) == {"T1": EXCLUSIVE} and fresh.locks.holders(B) == {"T2": EXCLUSIVE}
    assert fresh.locks.blockers("T2") == ["T1"]
    assert fresh.locks.release("T1") == ["T2"]
    assert fresh.locks.mode_of("T2", A) == SHARED and fresh.locks.holds("T2", A)
