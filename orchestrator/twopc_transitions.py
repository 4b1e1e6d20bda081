"""Two-phase commit's transitions: pure functions of (state, event, now, policy), the cells of the table in
`orchestrator.twopc`. They touch no lock table: taking and releasing locks is the protocol's (`TwoPhaseCommit`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from orchestrator import twopc_model as m
from orchestrator.protocol import Event, OutcomeReceived, Transition
from orchestrator.twopc_model import TwoPCPhase, TwoPCPolicy, Vote
from polycommit.events import ErrorInfo, SagaSnapshot, TransactionStatus, error_info


def finish(t: Transition, phase: TwoPCPhase, status: TransactionStatus, now: int) -> Transition:
    t.state["phase"], t.state["waiting"], t.state["due_at_ms"] = phase, False, 0
    t.result = m.result_of(t.state, status, now)
    return t


def send_prepares(t: Transition, now: int, policy: TwoPCPolicy) -> Transition:
    state = t.state
    state["phase"], state["waiting"] = TwoPCPhase.PREPARING, True
    state["due_at_ms"] = now + policy.prepare_window_ms
    for step in state["steps"]:
        step["attempts"] = 1
    t.commands.extend(m.command(state, i, "PREPARE", now) for i in range(len(state["steps"])))
    if not state["steps"]:
        return decide(t, "COMMIT", "nothing to prepare", now, policy)
    return t


def decide(
    t: Transition, outcome: Literal["COMMIT", "ABORT"], reason: str, now: int, policy: TwoPCPolicy
) -> Transition:
    """Take the decision: the Decision record and the phase-2 commands go out in one Kafka transaction."""
    state = t.state
    t.decisions.append(m.decision(state, outcome, reason, now))
    state["phase"] = TwoPCPhase.COMMITTING if outcome == "COMMIT" else TwoPCPhase.ABORTING
    if outcome == "ABORT" and state["error"] is None:
        state["error"] = error_info("Aborted", reason, False)
    return send_phase2(t, range(len(state["steps"])), now, policy)


def send_phase2(t: Transition, indexes: Iterable[int], now: int, policy: TwoPCPolicy) -> Transition:
    state = t.state
    action: Literal["COMMIT", "ABORT"] = "COMMIT" if state["phase"] in m.COMMIT_SIDE else "ABORT"
    for i in indexes:
        state["steps"][i]["compensation_attempts"] += 1
        t.commands.append(m.command(state, i, action, now))
    state["waiting"] = True
    state["due_at_ms"] = now + policy.phase2_resend_ms
    return maybe_end(t, now)


def maybe_end(t: Transition, now: int) -> Transition:
    state = t.state
    if any(s["status"] not in m.ACKNOWLEDGED for s in state["steps"]):
        return t
    committed = state["phase"] in m.COMMIT_SIDE
    return finish(
        t, TwoPCPhase.COMMITTED if committed else TwoPCPhase.ABORTED, "COMMITTED" if committed else "ABORTED", now
    )


def locks_granted(state: SagaSnapshot, event: Event, now: int, policy: TwoPCPolicy) -> Transition:
    return send_prepares(Transition(m.copy_state(state, now)), now, policy)


def lock_wait_over(state: SagaSnapshot, event: Event, now: int, policy: TwoPCPolicy) -> Transition:
    message = f"locks not granted within {policy.lock_wait_ms} ms"
    return abort_unprepared(state, error_info("LockWaitTimeout", message, True), now)


def abort_unprepared(state: SagaSnapshot, error: ErrorInfo, now: int) -> Transition:
    """Nothing was prepared: the decision is ABORT with no phase 2, and the result is ABORTED now."""
    t = Transition(m.copy_state(state, now))
    t.state["error"] = error
    t.decisions.append(m.decision(t.state, "ABORT", error["message"], now))
    for step in t.state["steps"]:
        step["status"] = Vote.ABORTED
    return finish(t, TwoPCPhase.ABORTED, "ABORTED", now)


def admission_wait(state: SagaSnapshot, event: Event, now: int, policy: TwoPCPolicy) -> Transition:
    """Its locks are held; it waits for a place among the transactions preparing (see `Admission`)."""
    t = Transition(m.copy_state(state, now))
    t.state["due_at_ms"] = now + policy.lock_wait_ms
    return t


def vote_yes(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: TwoPCPolicy) -> Transition:
    t = Transition(m.copy_state(state, now))
    t.state["steps"][event.outcome["step_index"]]["status"] = Vote.PREPARED
    if all(s["status"] == Vote.PREPARED for s in t.state["steps"]):
        return decide(t, "COMMIT", "every participant prepared", now, policy)
    return t


def vote_no(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: TwoPCPolicy) -> Transition:
    t = Transition(m.copy_state(state, now))
    index = event.outcome["step_index"]
    error = event.outcome["error"] or error_info("VotedNo", "no reason given", False)
    step = t.state["steps"][index]
    if error["retriable"] and step["attempts"] < policy.prepare_attempts:
        # A no that may turn yes (a PostgreSQL serialization failure, its prepared slots full, a lock
        # timeout): the store undid its attempt, so PREPARE goes again after a backoff (`resend_prepares`).
        # At once, it would meet what refused it again: 20 refusals in ~100 ms, then an abort.
        step["status"] = Vote.RESEND
        step["error"] = error
        resend_at = now + policy.prepare_backoff.backoff_ms(t.state["intent"]["tx_id"], step["attempts"])
        t.state["due_at_ms"] = min(t.state["due_at_ms"] or resend_at, resend_at)
        return t
    t.state["steps"][index]["status"] = Vote.VOTED_NO
    t.state["steps"][index]["error"] = error
    t.state["error"] = error_info(error["error_class"], f"step {index}: {error['message']}", error["retriable"])
    return decide(t, "ABORT", f"step {index} voted no: {error['message']}", now, policy)


def resend_prepares(state: SagaSnapshot, event: Event, now: int, policy: TwoPCPolicy) -> Transition:
    """The backoff of a retriable no is over: PREPARE goes again (a new attempt) to every step waiting for
    it, and the prepare window starts again from this PREPARE (a vote that never comes still aborts)."""
    t = Transition(m.copy_state(state, now))
    for step in t.state["steps"]:
        if step["status"] == Vote.RESEND:
            step["status"] = Vote.PENDING
            step["attempts"] += 1
            t.commands.append(m.command(t.state, step["index"], "PREPARE", now))
    t.state["due_at_ms"] = now + policy.prepare_window_ms
    return t


def window_over(state: SagaSnapshot, event: Event, now: int, policy: TwoPCPolicy) -> Transition:
    t = Transition(m.copy_state(state, now))
    missing = [s["index"] for s in t.state["steps"] if s["status"] == Vote.PENDING]
    message = f"no vote from step(s) {missing} within {policy.prepare_window_ms} ms"
    t.state["error"] = error_info("PrepareTimeout", message, True)
    return decide(t, "ABORT", f"presumed abort: {message}", now, policy)


def acked(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: TwoPCPolicy) -> Transition:
    t = Transition(m.copy_state(state, now))
    step = t.state["steps"][event.outcome["step_index"]]
    step["status"] = Vote.COMMITTED if t.state["phase"] in m.COMMIT_SIDE else Vote.ABORTED
    if t.state["phase"] in m.HAZARD and not any(s["status"] == Vote.PHASE2_FAILED for s in t.state["steps"]):
        t.alerts.append(m.alert("resolved", t.state, f"step {step['index']} acknowledged phase 2", now))
        t.state["phase"] = TwoPCPhase.COMMITTING if t.state["phase"] in m.COMMIT_SIDE else TwoPCPhase.ABORTING
    return maybe_end(t, now)


def phase2_failed(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: TwoPCPolicy) -> Transition:
    """Never dropped: retried with backoff, and reported as a heuristic hazard after `hazard_after` failures."""
    t = Transition(m.copy_state(state, now))
    state_ = t.state
    step = state_["steps"][event.outcome["step_index"]]
    step["status"] = Vote.PHASE2_FAILED
    step["error"] = event.outcome["error"]
    state_["waiting"] = False
    state_["due_at_ms"] = now + policy.backoff.backoff_ms(state_["intent"]["tx_id"], step["compensation_attempts"])
    if step["compensation_attempts"] >= policy.hazard_after and state_["phase"] not in m.HAZARD:
        committing = state_["phase"] in m.COMMIT_SIDE
        state_["phase"] = TwoPCPhase.COMMIT_HAZARD if committing else TwoPCPhase.ABORT_HAZARD
        reason = step["error"]["message"] if step["error"] else "no error given"
        message = (
            f"heuristic hazard: phase 2 of step {step['index']} failed {step['compensation_attempts']} times: {reason}"
        )
        t.alerts.append(m.alert("hazard", state_, message, now))
    return t


def phase2_due(state: SagaSnapshot, event: Event, now: int, policy: TwoPCPolicy) -> Transition:
    """A retry is due, or acknowledgements are overdue: send phase 2 again to every step not acknowledged
    (idempotent in every store)."""
    t = Transition(m.copy_state(state, now))
    t.state["attempt"] += 1
    return send_phase2(t, [s["index"] for s in t.state["steps"] if s["status"] not in m.ACKNOWLEDGED], now, policy)
