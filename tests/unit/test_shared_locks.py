"""One lock table per coordinator member for every protocol that locks (`orchestrator.registry.protocols`):
a saga, an interactive transaction and a two-phase commit on the same key exclude one another; a release
by one protocol wakes a waiter of another; a restore takes back every protocol's holders before any
waiter; a deadlock between an interactive transaction and a two-phase commit is broken either way."""

from __future__ import annotations

from typing import Any

from lock_requests import request
from step_replies import reply

from orchestrator import registry
from orchestrator.interactive import Interactive
from orchestrator.interactive_model import LockRequested, VictimChosen
from orchestrator.lock_waits import waits_of
from orchestrator.locking import LockingPhase
from orchestrator.members import lock_scope_warning
from orchestrator.protocol import (
    IntentReceived,
    LocksGranted,
    OutcomeReceived,
    TransactionProtocol,
    Transition,
    restore_locks,
)
from orchestrator.saga import SagaPolicy
from orchestrator.twopc import TwoPhaseCommit
from orchestrator.twopc_model import TwoPCPhase
from polycommit import operations as ops
from polycommit.client import Saga, Transaction
from polycommit.events import DeadlockVerdict, LockRequest

POLICY = SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=2)
ROW = 'postgres:t:{"id":1}'


def member() -> tuple[Interactive, TwoPhaseCommit]:
    protocols = registry.protocols(POLICY)
    sagas, twopc = protocols["saga"], protocols["twopc"]
    assert isinstance(sagas, Interactive) and isinstance(twopc, TwoPhaseCommit)
    return sagas, twopc


def saga_intent(tx_id: str, row: int = 1) -> Any:
    saga = Saga("eventual", tx_id=tx_id)
    saga.step(ops.upsert_row("t", {"id": row}, {"v": tx_id}))
    saga.step(ops.merge_node("N", {"id": row}, {"v": tx_id}))
    return saga.intent("polycommit.replies:0", "test")


def strong_intent(tx_id: str, row: int = 1, node: int = 1) -> Any:
    tx = Transaction(name="strong", consistency="STRONG", tx_id=tx_id)
    tx.add(ops.upsert_row("t", {"id": row}, {"v": tx_id}))
    tx.add(ops.merge_node("N", {"id": node}))
    return tx.intent("polycommit.replies:0", "test")


def run(protocol: TransactionProtocol, t: Transition, status: str = "APPLIED") -> Transition:
    """Answer every command (PREPARED for a prepare) until none is sent: the transaction ends."""
    pending, last = list(t.commands), t
    while pending:
        command = pending.pop(0)
        answer = "PREPARED" if command["action"] == "PREPARE" else status
        last = protocol.decide(last.state, OutcomeReceived(reply(command, answer)), 10)
        pending.extend(last.commands)
    return last


def lock_request(tx_id: str, n: int, keys: list[str], mode: str = "EXCLUSIVE") -> LockRequest:
    return request(tx_id, n, keys, mode, isolation="SERIALIZABLE")


def test_a_two_phase_commit_waits_for_a_saga_on_its_key_and_prepares_when_the_saga_completes() -> None:
    sagas, twopc = member()
    saga = sagas.start(saga_intent("saga-1"), 0)
    assert saga.commands and sagas.locks.holds("saga-1", ROW)
    strong = twopc.start(strong_intent("strong-1"), 1)
    assert strong.state["phase"] == TwoPCPhase.LOCKING and not strong.commands  # nothing prepared
    assert twopc.locks.blockers("strong-1") == ["saga-1"]
    done = run(sagas, saga)
    assert done.result is not None and done.result["status"] == "COMPLETED"
    assert done.wake == ["strong-1"]  # the saga's release wakes the other protocol's waiter
    prepares = twopc.decide(strong.state, LocksGranted(), 20)
    assert [c["action"] for c in prepares.commands] == ["PREPARE", "PREPARE"]


def test_a_saga_waits_for_a_two_phase_commit_on_its_key_and_starts_when_it_commits() -> None:
    sagas, twopc = member()
    strong = twopc.start(strong_intent("strong-1"), 0)
    assert [c["action"] for c in strong.commands] == ["PREPARE", "PREPARE"]
    saga = sagas.start(saga_intent("saga-1"), 1)
    assert saga.state["phase"] == LockingPhase.LOCKING and not saga.commands
    committed = run(twopc, strong)
    assert committed.result is not None and committed.result["status"] == "COMMITTED"
    assert committed.wake == ["saga-1"]
    started = sagas.decide(saga.state, LocksGranted(), 20)
    assert started.commands and started.commands[0]["action"] == "EXECUTE"


def test_a_restore_takes_back_every_protocols_holders_before_any_waiter() -> None:
    sagas, twopc = member()
    strong = twopc.start(strong_intent("strong-1"), 0)  # preparing: holds the row
    saga = sagas.start(saga_intent("saga-1"), 1)  # waits for it
    assert strong.state["phase"] == TwoPCPhase.PREPARING and saga.state["phase"] == LockingPhase.LOCKING
    fresh_sagas, fresh_twopc = member()
    # The saga protocol is restored first: one restore per protocol would queue the saga on a free table
    # and grant it the key the two-phase commit still holds (two writers of one row).
    woken = restore_locks([fresh_sagas, fresh_twopc], [saga.state, strong.state])
    assert woken == []
    assert fresh_twopc.locks.holds("strong-1", ROW) and not fresh_sagas.locks.holds("saga-1", ROW)
    assert fresh_sagas.locks.blockers("saga-1") == ["strong-1"]


def test_a_deadlock_between_an_interactive_transaction_and_a_two_phase_commit_is_closed_and_broken() -> None:
    sagas, twopc = member()
    node = 'neo4j:N:{"id":1}'
    opened = sagas.open(lock_request("open-1", 1, [node]), 0)  # holds the node
    assert sagas.locks.holds("open-1", node)
    strong = twopc.start(strong_intent("strong-1"), 1)  # the row is free, the node is not
    assert twopc.locks.holds("strong-1", ROW) and twopc.locks.blockers("strong-1") == ["open-1"]
    asked = sagas.decide(opened.state, LockRequested(lock_request("open-1", 2, [ROW])), 2)
    assert ("open-1", "strong-1") in asked.cycles  # the request that closed a cycle of two names it
    verdict: DeadlockVerdict = {"cycle": ["open-1", "strong-1"], "victim": "strong-1", "scores": {}, "at_ms": 3}
    broken = twopc.decide(strong.state, VictimChosen(verdict), 3)
    assert broken.result is not None and broken.result["status"] == "ABORTED"
    assert broken.result["error"] is not None and broken.result["error"]["error_class"] == "DeadlockVictimError"
    assert [d["outcome"] for d in broken.decisions] == ["ABORT"] and not broken.commands  # nothing prepared
    assert broken.wake == ["open-1"] and "strong-1" not in twopc.locks
    again = twopc.decide(broken.state, VictimChosen(verdict), 4)  # at least once: a second copy
    assert again.state is broken.state and not again.decisions


def test_a_verdict_on_a_two_phase_commit_past_its_locks_changes_nothing() -> None:
    _sagas, twopc = member()
    strong = twopc.start(strong_intent("strong-1"), 0)
    verdict: DeadlockVerdict = {"cycle": ["x", "strong-1"], "victim": "strong-1", "scores": {}, "at_ms": 1}
    stale = twopc.decide(strong.state, VictimChosen(verdict), 1)
    assert stale.state is strong.state and not stale.decisions


def test_a_waiting_two_phase_commit_is_announced_again_until_its_locks_come() -> None:
    protocols = registry.protocols(POLICY)
    sagas, twopc = protocols["saga"], protocols["twopc"]
    saga = sagas.start(saga_intent("saga-1"), 0)
    strong = twopc.start(strong_intent("strong-1"), 1)
    again = waits_of(protocols, 2001)  # what the coordinator publishes every REANNOUNCE_MS
    assert sorted((e["tx_id"], e["resource"], e["blockers"], e["at_ms"]) for e in again) == [
        ("strong-1", 'neo4j:N:{"id":1}', ["saga-1"], 2001),
        ("strong-1", ROW, ["saga-1"], 2001),
    ]
    done = run(sagas, saga)
    granted = twopc.decide(strong.state, LocksGranted(), 2002)
    assert "strong-1" in done.wake and {e["action"] for e in granted.lock_requests} == {"GRANTED"}
    assert waits_of(protocols, 4001) == []


def test_a_member_owning_some_of_the_transaction_partitions_is_warned_that_its_locks_are_its_own() -> None:
    assert lock_scope_warning({0, 1, 2, 3}, 4) is None  # the only member: every transaction, one table
    assert lock_scope_warning(set(), 4) is None  # nothing assigned (yet): nothing to coordinate
    warning = lock_scope_warning({1, 3}, 4)
    assert warning is not None and "2 of 4" in warning and "do not wait for its locks" in warning


NODE = 'neo4j:N:{"id":1}'


def strong_writing_the_row(tx_id: str) -> Any:
    tx = Transaction(name="interactive", consistency="STRONG", tx_id=tx_id)
    tx.add(ops.upsert_row("t", {"id": 1}, {"v": tx_id}))
    return tx.intent("polycommit.replies:0", "test")


def test_an_interactive_strong_intent_is_handed_to_two_phase_commit_under_the_locks_it_holds() -> None:
    sagas, twopc = member()
    read = sagas.open(lock_request("T1", 1, [NODE], "SHARED"), 0)  # a read at SERIALIZABLE
    wrote = sagas.decide(read.state, LockRequested(lock_request("T1", 2, [ROW])), 1)  # the write's lock
    writer = sagas.open(lock_request("W", 1, [NODE]), 2)  # another transaction waits for the read key
    assert sagas.locks.blockers("W") == ["T1"]
    t = sagas.decide(wrote.state, IntentReceived(strong_writing_the_row("T1")), 3)
    assert t.state["protocol"] == "twopc" and t.state["phase"] == TwoPCPhase.PREPARING
    assert [c["action"] for c in t.commands] == ["PREPARE"]  # at once: its write lock was held
    assert ("RELEASED", NODE) in [(e["action"], e["resource"]) for e in t.lock_requests]  # the read lock goes
    assert t.wake == ["W"] and twopc.locks.holds("T1", ROW) and not twopc.locks.holds("T1", NODE)
    assert writer.state["phase"] == "open, waiting"
    committed = run(twopc, t)  # from here on the driver hands its events to two-phase commit
    assert committed.result is not None and committed.result["status"] == "COMMITTED"
    assert "T1" not in twopc.locks


def test_an_interactive_strong_intent_writing_a_key_it_did_not_lock_is_refused_and_frees_its_locks() -> None:
    sagas, _twopc = member()
    opened = sagas.open(lock_request("T1", 1, [NODE]), 0)  # locks the node, but the intent writes the row
    t = sagas.decide(opened.state, IntentReceived(strong_writing_the_row("T1")), 1)
    assert t.result is not None and t.result["status"] == "FAILED" and not t.commands
    assert t.result["error"] is not None and t.result["error"]["error_class"] == "UnsupportedError"
    assert "T1" not in sagas.locks
