"""Two-phase commit's table: all yes commits, one no or the window passing aborts everyone, late and
duplicate votes change nothing, phase 2 is retried forever (hazard, then resolved), locks serialize
transactions on the same key and a restore rebuilds them."""

from __future__ import annotations

from typing import Any

import pytest
from step_replies import reply

from orchestrator import registry
from orchestrator.protocol import IntentReceived, LocksGranted, OperatorReceived, OutcomeReceived, TimerDue, Transition
from orchestrator.saga import SagaPolicy
from orchestrator.twopc import TABLE, TwoPCEvent, TwoPhaseCommit
from orchestrator.twopc_model import TwoPCPhase
from polycommit import operations as ops
from polycommit.client import Transaction
from polycommit.errors import ProtocolError
from polycommit.events import SagaSnapshot, StepOutcome

POLICY = SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=3)


def intent(tx_id: str = "tx-1", row: int = 1) -> Any:
    tx = Transaction(name="strong", consistency="STRONG", tx_id=tx_id)
    tx.add(ops.upsert_row("t", {"id": row}, {"v": 1}))
    tx.add(ops.merge_node("N", {"id": row}))
    tx.add(ops.upsert_points("c", [ops.point(row, [0.1, 0.2])]))
    return tx.intent("polycommit.replies:0", "test")


def feed(protocol: TwoPhaseCommit, state: SagaSnapshot, outcomes: list[StepOutcome], now: int = 10) -> Transition:
    t = Transition(state)
    for outcome in outcomes:
        t = protocol.decide(t.state, OutcomeReceived(outcome), now)
    return t


def prepared() -> tuple[TwoPhaseCommit, Transition]:
    protocol = TwoPhaseCommit(POLICY)
    t = protocol.start(intent(), 0)
    assert t.state["phase"] == TwoPCPhase.PREPARING
    assert [c["action"] for c in t.commands] == ["PREPARE"] * 3  # all at once
    return protocol, t


def test_all_yes_commits_with_the_decision_and_phase_2_in_one_transition() -> None:
    protocol, t = prepared()
    votes = [reply(c, "PREPARED") for c in t.commands]
    state = t.state
    for vote in votes[:-1]:
        step = protocol.decide(state, OutcomeReceived(vote), 5)
        assert not step.decisions and not step.commands
        state = step.state
    decided = protocol.decide(state, OutcomeReceived(votes[-1]), 6)
    assert [d["outcome"] for d in decided.decisions] == ["COMMIT"]
    assert decided.decisions[0]["participants"] == ["neo4j", "postgres", "qdrant"]
    assert [c["action"] for c in decided.commands] == ["COMMIT"] * 3
    assert decided.result is None  # told committed only once every store acknowledged
    done = feed(protocol, decided.state, [reply(c, "APPLIED") for c in decided.commands])
    assert done.result is not None and done.result["status"] == "COMMITTED"
    assert {e["action"] for e in done.lock_requests} == {"RELEASED"}
    assert "tx-1" not in protocol.locks


def test_one_no_aborts_every_step_and_late_votes_change_nothing() -> None:
    protocol, t = prepared()
    votes = [reply(c, "PREPARED") for c in t.commands]
    yes = protocol.decide(t.state, OutcomeReceived(votes[0]), 5)
    no = protocol.decide(yes.state, OutcomeReceived(reply(t.commands[1], "VOTED_NO")), 6)
    assert [d["outcome"] for d in no.decisions] == ["ABORT"]
    assert [(c["action"], c["step_index"]) for c in no.commands] == [("ABORT", 0), ("ABORT", 1), ("ABORT", 2)]
    late = protocol.decide(no.state, OutcomeReceived(votes[2]), 7)
    assert late.state is no.state and not late.commands and not late.decisions
    done = feed(protocol, no.state, [reply(c, "NOOP") for c in no.commands])
    assert done.result is not None and done.result["status"] == "ABORTED"
    assert done.result["error"] is not None and "step 1" in done.result["error"]["message"]


def test_a_retriable_no_sends_prepare_again_after_a_backoff_and_a_stale_no_changes_nothing() -> None:
    protocol, t = prepared()
    busy = reply(t.commands[0], "VOTED_NO", retriable=True)
    backing_off = protocol.decide(t.state, OutcomeReceived(busy), 5)
    assert not backing_off.decisions and not backing_off.commands  # not at once: it would meet the same refusal
    assert backing_off.state["steps"][0]["status"] == "resend"
    due = backing_off.state["due_at_ms"]
    assert 5 < due < 1000  # before the prepare window's end
    assert protocol.decide(backing_off.state, OutcomeReceived(busy), 6).state is backing_off.state  # a duplicate
    assert protocol.decide(backing_off.state, TimerDue(), due - 1).state is backing_off.state
    again = protocol.decide(backing_off.state, TimerDue(), due)
    assert not again.decisions and [(c["action"], c["attempt"]) for c in again.commands] == [("PREPARE", 2)]
    assert again.state["due_at_ms"] == due + 1000  # a new prepare window from this PREPARE
    assert protocol.decide(again.state, OutcomeReceived(busy), due + 1).state is again.state  # attempt 1's no
    yes = protocol.decide(again.state, OutcomeReceived(reply(again.commands[0], "PREPARED")), due + 2)
    assert yes.state["steps"][0]["status"] == "prepared"


def test_retriable_noes_back_off_longer_each_time_then_abort_after_the_last_attempt() -> None:
    protocol, t = prepared()
    state, command, waits = t.state, t.commands[0], []
    for _ in range(protocol.policy.prepare_attempts - 1):
        now = state["updated_at_ms"]
        backing_off = protocol.decide(state, OutcomeReceived(reply(command, "VOTED_NO", retriable=True)), now)
        waits.append(backing_off.state["due_at_ms"] - now)
        again = protocol.decide(backing_off.state, TimerDue(), backing_off.state["due_at_ms"])
        state, command = again.state, again.commands[0]
    assert waits[3] > waits[0] and max(waits) <= protocol.policy.prepare_backoff.backoff_max_ms
    last = protocol.decide(state, OutcomeReceived(reply(command, "VOTED_NO", retriable=True)), state["updated_at_ms"])
    assert [d["outcome"] for d in last.decisions] == ["ABORT"]
    assert last.state["error"] is not None and last.state["error"]["retriable"]  # the client may run it again


def test_a_no_backing_off_past_the_window_is_sent_again_and_the_window_counts_from_there() -> None:
    protocol, t = prepared()
    backing_off = protocol.decide(t.state, OutcomeReceived(reply(t.commands[0], "VOTED_NO", retriable=True)), 995)
    assert backing_off.state["due_at_ms"] == 1000  # the window ends before the backoff would
    over = protocol.decide(backing_off.state, TimerDue(), 1000)
    assert [c["action"] for c in over.commands] == ["PREPARE"] and not over.decisions  # a window from here
    late = protocol.decide(over.state, TimerDue(), 2000)
    assert [d["outcome"] for d in late.decisions] == ["ABORT"]
    assert late.state["error"] is not None and "[0, 1, 2]" in late.state["error"]["message"]


def test_a_duplicate_vote_is_an_explicit_no_op_row() -> None:
    protocol, t = prepared()
    vote = reply(t.commands[0], "PREPARED")
    once = protocol.decide(t.state, OutcomeReceived(vote), 5)
    twice = protocol.decide(once.state, OutcomeReceived(vote), 6)
    assert twice.state is once.state
    assert TABLE[(TwoPCPhase.PREPARING, TwoPCEvent.STALE_VOTE)].__name__ == "unchanged"


def test_the_prepare_window_passing_is_presumed_abort() -> None:
    protocol, t = prepared()
    early = protocol.decide(t.state, TimerDue(), 999)
    assert early.state is t.state
    late = protocol.decide(t.state, TimerDue(), 1000)
    assert [d["outcome"] for d in late.decisions] == ["ABORT"]
    assert late.state["error"] is not None and late.state["error"]["error_class"] == "PrepareTimeout"
    assert all(c["action"] == "ABORT" for c in late.commands)


def test_failed_phase_2_is_retried_reported_as_hazard_and_resolved() -> None:
    protocol, t = prepared()
    decided = feed(protocol, t.state, [reply(c, "PREPARED") for c in t.commands])
    commit = decided.commands[0]
    state = feed(protocol, decided.state, [reply(c, "APPLIED") for c in decided.commands[1:]]).state
    alerts: list[str] = []
    now = 100
    for _ in range(3):
        failed = protocol.decide(state, OutcomeReceived(reply(commit, "FAILED", retriable=True)), now)
        alerts += [a["kind"] for a in failed.alerts]
        assert failed.result is None and failed.state["due_at_ms"] > now  # retried, never dropped
        now = failed.state["due_at_ms"]
        retry = protocol.decide(failed.state, TimerDue(), now)
        assert [(c["action"], c["step_index"]) for c in retry.commands] == [("COMMIT", 0)]
        commit, state = retry.commands[0], retry.state
    assert alerts == ["hazard"]
    assert registry.is_stuck(state)
    done = protocol.decide(state, OutcomeReceived(reply(commit, "ALREADY_APPLIED")), now + 1)
    assert [a["kind"] for a in done.alerts] == ["resolved"]
    assert done.result is not None and done.result["status"] == "COMMITTED"


def test_a_second_transaction_on_the_same_key_waits_then_prepares_when_the_first_ends() -> None:
    protocol, first = prepared()
    second = protocol.start(intent("tx-2"), 1)
    assert second.state["phase"] == TwoPCPhase.LOCKING and not second.commands
    assert {e["action"] for e in second.lock_requests} == {"WAITING"}
    assert all(e["blockers"] == ["tx-1"] for e in second.lock_requests)
    assert protocol.decide(second.state, LocksGranted(), 2).state is second.state  # not yet its turn
    decided = feed(protocol, first.state, [reply(c, "PREPARED") for c in first.commands])
    done = feed(protocol, decided.state, [reply(c, "APPLIED") for c in decided.commands])
    assert done.wake == ["tx-2"]
    woken = protocol.decide(second.state, LocksGranted(), 20)
    assert [c["action"] for c in woken.commands] == ["PREPARE"] * 3
    assert {e["action"] for e in woken.lock_requests} == {"GRANTED"} and len(woken.lock_requests) == 3


def test_a_lock_wait_past_its_timeout_aborts_with_nothing_prepared() -> None:
    protocol, _ = prepared()
    second = protocol.start(intent("tx-2"), 1)
    over = protocol.decide(second.state, TimerDue(), second.state["due_at_ms"])
    assert over.result is not None and over.result["status"] == "ABORTED"
    assert [d["outcome"] for d in over.decisions] == ["ABORT"] and not over.commands
    assert "tx-2" not in protocol.locks


def test_disjoint_keys_do_not_wait() -> None:
    protocol, _ = prepared()
    other = protocol.start(intent("tx-2", row=2), 1)
    assert [c["action"] for c in other.commands] == ["PREPARE"] * 3


def test_a_restore_rebuilds_the_lock_table_holders_first() -> None:
    protocol, first = prepared()
    second = protocol.start(intent("tx-2"), 1)
    fresh = TwoPhaseCommit(POLICY)
    assert fresh.restored([second.state, first.state]) == []
    assert fresh.locks.holds_all("tx-1") and not fresh.locks.holds_all("tx-2")
    alone = TwoPhaseCommit(POLICY)
    assert alone.restored([second.state]) == ["tx-2"]  # its holder ended: it is woken


def test_an_invalid_intent_fails_before_anything_is_locked() -> None:
    tx = Transaction(name="bad", consistency="STRONG", tx_id="tx-bad")
    bad = ops.upsert_row("t", {"id": 1}, {"v": 1})
    bad["target"] = "no such; table"  # not a plain identifier: no store could run it
    tx.add(bad)
    protocol = TwoPhaseCommit(POLICY)
    t = protocol.start(tx.intent("", "test"), 0)
    assert t.result is not None and t.result["status"] == "FAILED" and t.rejections
    assert len(protocol.locks) == 0


def test_an_intent_again_and_a_saga_outcome() -> None:
    protocol, t = prepared()
    assert protocol.decide(t.state, IntentReceived(t.state["intent"]), 1).state is t.state
    saga_outcome = reply({**t.commands[0], "action": "EXECUTE"}, "APPLIED")
    with pytest.raises(ProtocolError):
        protocol.decide(t.state, OutcomeReceived(saga_outcome), 1)


def test_every_phase_has_a_row_for_every_event_it_can_meet() -> None:
    for phase in TwoPCPhase:
        if phase in (TwoPCPhase.LOCKING, TwoPCPhase.PREPARING):
            continue
        assert all((phase, kind) in TABLE for kind in TwoPCEvent)


def test_admission_caps_the_transactions_past_their_locks_and_lets_the_next_in_when_one_ends() -> None:
    protocol = TwoPhaseCommit(POLICY)
    protocol.admission.capacity = 1
    first = protocol.start(intent("tx-1", row=1), 0)
    second = protocol.start(intent("tx-2", row=2), 1)  # disjoint keys, but no room
    assert [c["action"] for c in first.commands] == ["PREPARE"] * 3
    assert second.state["phase"] == TwoPCPhase.LOCKING and not second.commands
    assert protocol.decide(second.state, LocksGranted(), 2).state is second.state
    rearmed = protocol.decide(second.state, TimerDue(), second.state["due_at_ms"])  # queued: never a timeout
    assert rearmed.result is None and rearmed.state["due_at_ms"] > second.state["due_at_ms"]
    decided = feed(protocol, first.state, [reply(c, "PREPARED") for c in first.commands])
    done = feed(protocol, decided.state, [reply(c, "APPLIED") for c in decided.commands])
    assert done.wake == ["tx-2"]
    assert [c["action"] for c in protocol.decide(rearmed.state, LocksGranted(), 20).commands] == ["PREPARE"] * 3
    fresh = TwoPhaseCommit(POLICY)
    fresh.admission.capacity = 1
    assert fresh.restored([second.state, first.state]) == ["tx-2"]  # it holds its locks: woken ...
    assert not fresh.decide(second.state, LocksGranted(), 30).commands  # ... but tx-1 holds the only place


def operator_command(action: str, step: int = 0) -> Any:
    return {"tx_id": "tx-1", "action": action, "step_index": step, "operator": "ops", "note": "", "at_ms": 1}


def test_an_operator_retry_of_a_decided_transaction_sends_phase_2_again_now_and_is_audited() -> None:
    protocol, t = prepared()
    decided = feed(protocol, t.state, [reply(c, "PREPARED") for c in t.commands])
    assert decided.state["phase"] == TwoPCPhase.COMMITTING
    retried = protocol.decide(decided.state, OperatorReceived(operator_command("RETRY")), 20)
    assert [c["action"] for c in retried.commands] == ["COMMIT"] * 3
    assert [a["kind"] for a in retried.alerts] == ["operator"]


def test_operator_commands_two_phase_commit_cannot_carry_out_are_refused_not_crashed() -> None:
    protocol, t = prepared()
    for command, state in (
        (operator_command("RETRY"), t.state),  # still preparing: nothing decided to send again
        (operator_command("RESOLVE_STEP"), t.state),  # a decision is never waived step by step
    ):
        refused = protocol.decide(state, OperatorReceived(command), 20)
        assert refused.state is state and not refused.commands
        assert [a["kind"] for a in refused.alerts] == ["operator_refused"]
