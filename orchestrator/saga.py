"""The saga coordinator as a pure state machine: a table of (phase, event kind) -> transition.

No awaits and no clock of its own: the driver passes `now` in, so every path, timeouts included, can be
tested with plain lists of events. Steps with no order between them run in parallel: each is sent as soon
as the steps it waits for applied (orchestrator/saga_order.py). A failed step is retried with exponential
backoff and jitter up to its `retries`; a step past its timeout counts as failed. When a step cannot
succeed, no step is sent any more (phase `aborting`), the steps in flight are awaited, then every step
that may have applied is compensated in reverse order of dependency; a compensation that keeps failing is
retried with capped backoff forever and the saga is reported `stuck` (P2: never dropped).

`classify` (orchestrator/saga_events.py) names what an event is for the state it meets (an outcome of a
step in flight, a late one, a timer that is due...), raising ProtocolError for what a saga can never
receive; `TABLE` then holds one row per (phase, kind), late and duplicate events included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from orchestrator import operator, saga_operator, saga_order
from orchestrator.protocol import (
    Event,
    Handler,
    OperatorReceived,
    OutcomeReceived,
    TimerDue,
    Transition,
    dispatch,
    unchanged,
)
from orchestrator.saga_events import OPERATOR_KINDS, SagaEvent, classify
from orchestrator.saga_model import (
    APPLIED,
    COMPENSATED,
    COMPENSATION_FAILED,
    FAILED,
    IN_FLIGHT,
    MAY_HAVE_APPLIED,
    NOT_APPLIED,
    PROTOCOL,
    SKIPPED,
    TERMINAL,
    TIMED_OUT,
    TO_COMPENSATE,
    SagaPhase,
    SagaPolicy,
    StepStatus,
    alert,
    checked,
    copy_state,
    initial_state,
    phase_of,
    problem_step,
    result_of,
    send,
    timeout_ms,
)
from polycommit.events import ErrorInfo, SagaSnapshot, StepOutcome, TransactionIntent, TransactionStatus, error_info

__all__ = [
    "MAY_HAVE_APPLIED",
    "TABLE",
    "SagaEvent",
    "SagaPhase",
    "SagaPolicy",
    "SagaProtocol",
    "classify",
    "decide",
    "on_due",
    "on_outcome",
    "start",
]


# -- the transitions --------------------------------------------------------------------------------


def _finish(transition: Transition, phase: SagaPhase, status: TransactionStatus, now: int) -> Transition:
    state = transition.state
    state["phase"] = phase
    for flight in state["flights"]:
        flight["waiting"], flight["due_at_ms"] = False, 0
    transition.result = result_of(state, status, now)
    return transition


def start(intent: TransactionIntent, now: int, policy: SagaPolicy, refusal: ErrorInfo | None = None) -> Transition:
    """A new intent: validate every step up front (nothing runs if one is invalid), then send every step
    that waits for no other (one write per store: all of them, in this one transition)."""
    problem, keys = (refusal, []) if refusal else checked(intent, policy)
    state = initial_state(intent, now, keys if problem is None else [frozenset()] * len(intent["steps"]))
    transition = Transition(state)
    if problem is not None:
        state["error"] = problem
        if 0 <= problem_step(problem) < len(state["steps"]):
            state["steps"][problem_step(problem)]["error"] = problem
        transition.rejections.append(problem)  # an intent no store could run is poison: kept for inspection
        return _finish(transition, SagaPhase.FAILED, "FAILED", now)
    _go_forward(transition, now, policy)
    saga_order.summarise(state)
    return transition


def _go_forward(transition: Transition, now: int, policy: SagaPolicy) -> Transition:
    """Complete once every step applied; else send every step whose dependencies all applied."""
    state = transition.state
    if all(s["status"] == APPLIED for s in state["steps"]):
        return _finish(transition, SagaPhase.COMPLETED, "COMPLETED", now)
    for index in list(saga_order.ready_to_execute(state)):
        transition.commands.append(send(state, index, "EXECUTE", now, policy))
    return transition


def _settle(state: SagaSnapshot, index: int, status: StepStatus) -> None:
    state["steps"][index]["status"] = status
    state["flights"][index].update({"waiting": False, "due_at_ms": 0, "done": True})


def _executed(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    index = event.outcome["step_index"]
    _settle(state, index, APPLIED)
    state["steps"][index]["error"] = None
    state["before_images"][index] = event.outcome["before_image"]
    if state["phase"] == SagaPhase.ABORTING:  # applied after all: compensation will undo it
        return _compensate_when_settled(Transition(state), now, policy)
    return _go_forward(Transition(state), now, policy)


def _execute_skipped(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    """The step was compensated before (a replay of a compensated saga): it must not run now."""
    state = copy_state(state, now)
    index = event.outcome["step_index"]
    _settle(state, index, SKIPPED)
    return _abort(
        Transition(state), error_info("StepSkipped", f"step {index}: already compensated", False), now, policy
    )


def _execute_failed(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    index = event.outcome["step_index"]
    error = event.outcome["error"] or error_info("StepFailed", "no error given", False)
    state["steps"][index]["error"] = error
    return _retry_or_fail(Transition(state), index, error, may_have_applied=False, now=now, policy=policy)


def _retry_or_fail(
    transition: Transition, index: int, error: ErrorInfo, *, may_have_applied: bool, now: int, policy: SagaPolicy
) -> Transition:
    """A retry after backoff while the saga goes forward and retries are left; else the step failed for good."""
    state = transition.state
    flight = state["flights"][index]
    retries = state["intent"]["steps"][index]["retries"]
    if state["phase"] == SagaPhase.FORWARD and error["retriable"] and flight["attempt"] <= retries:
        flight["waiting"] = False
        flight["due_at_ms"] = now + policy.backoff_ms(state["intent"]["tx_id"], flight["attempt"])
        return transition
    # The failed step itself is compensated too: undone if it timed out and may have applied after
    # all, fenced (a recorded no-op) if its store reported the failure.
    _settle(state, index, TIMED_OUT if may_have_applied else FAILED)
    message = error_info(error["error_class"], f"step {index}: {error['message']}", error["retriable"])
    return _abort(transition, message, now, policy)


def _abort(transition: Transition, error: ErrorInfo, now: int, policy: SagaPolicy) -> Transition:
    """A step cannot succeed: no step is sent from now on; a retry waiting for its backoff is given up
    (failed, or timed out if its last attempt timed out and so may have applied)."""
    state = transition.state
    if state["phase"] == SagaPhase.FORWARD:
        state["phase"] = SagaPhase.ABORTING
        state["error"] = error  # the first reason the saga could not complete
    for index in saga_order.retry_scheduled(state):
        last = state["steps"][index]["error"]
        _settle(state, index, TIMED_OUT if last and last["error_class"] == "StepTimeout" else FAILED)
    return _compensate_when_settled(transition, now, policy)


def _compensate_when_settled(transition: Transition, now: int, policy: SagaPolicy) -> Transition:
    """Compensation starts once no step is in flight: every step that may have applied is then known."""
    state = transition.state
    if saga_order.in_flight(state):
        return transition
    state["phase"] = SagaPhase.COMPENSATING
    for flight, step in zip(state["flights"], state["steps"], strict=True):
        flight.update({"waiting": False, "attempt": 0, "due_at_ms": 0, "done": step["status"] not in TO_COMPENSATE})
    return _compensate_ready(transition, now, policy)


def _compensate_ready(transition: Transition, now: int, policy: SagaPolicy) -> Transition:
    """Send every compensation whose dependents are all compensated, or finish once none is left."""
    state = transition.state
    if all(f["done"] for f in state["flights"]):
        return _finish(transition, SagaPhase.COMPENSATED, "COMPENSATED", now)
    for index in list(saga_order.ready_to_compensate(state)):
        transition.commands.append(send(state, index, "COMPENSATE", now, policy))
    return transition


def _compensated(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    index = event.outcome["step_index"]
    transition = Transition(state)
    if state["steps"][index]["status"] == FAILED:  # a failed step stays "failed" in the result once fenced
        _settle(state, index, FAILED)
    else:
        _settle(state, index, NOT_APPLIED if event.outcome["status"] == "NOOP" else COMPENSATED)
    _unstick(transition, f"step {index} compensated", now)
    return _compensate_ready(transition, now, policy)


def _unstick(transition: Transition, message: str, now: int) -> None:
    """Stuck ends (an alert says so) once no step's compensation keeps failing."""
    state = transition.state
    if state["phase"] == SagaPhase.STUCK and not any(s["status"] == COMPENSATION_FAILED for s in state["steps"]):
        transition.alerts.append(alert("resolved", state, message, now))
        state["phase"] = SagaPhase.COMPENSATING


def _compensate_failed(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    index = event.outcome["step_index"]
    error = event.outcome["error"] or error_info("CompensationFailed", "no error given", False)
    # The compensation's own error, kept apart from the step's: an operator must see why the undo fails.
    state["steps"][index]["compensation_error"] = error
    return _compensation_failed(Transition(state), index, error, now, policy)


def _compensation_failed(
    transition: Transition, index: int, error: ErrorInfo, now: int, policy: SagaPolicy
) -> Transition:
    """Compensations are retried whatever the error: dropping one would leave the stores disagreeing."""
    state = transition.state
    flight = state["flights"][index]
    flight["waiting"] = False
    flight["due_at_ms"] = now + policy.backoff_ms(state["intent"]["tx_id"], flight["attempt"])
    step = state["steps"][index]
    if flight["attempt"] >= policy.compensation_retries and step["status"] != COMPENSATION_FAILED:
        message = f"compensation of step {index} failed {flight['attempt']} times: {error['message']}"
        step["status"] = COMPENSATION_FAILED
        transition.alerts.append(alert("stuck", state, message, now))
        if state["phase"] != SagaPhase.STUCK:
            state["phase"] = SagaPhase.STUCK
            transition.result = result_of(state, "STUCK", now)
    return transition


def _timer_due(state: SagaSnapshot, event: TimerDue, now: int, policy: SagaPolicy) -> Transition:
    """Every step whose time came: a command in flight timed out (it counts as failed), or a retry is due."""
    state = copy_state(state, now)
    transition = Transition(state)
    for index in saga_order.due_steps(state, now):
        flight = state["flights"][index]
        if not flight["due_at_ms"] or flight["due_at_ms"] > now:
            continue  # settled by an earlier step's timeout in this same transition
        if not flight["waiting"]:
            _resend(transition, index, now, policy)
        elif saga_order.is_compensating(state):
            error = error_info("StepTimeout", f"no outcome within {policy.default_timeout_ms} ms", True)
            state["steps"][index]["compensation_error"] = error
            _compensation_failed(transition, index, error, now, policy)
        else:
            error = error_info("StepTimeout", f"no outcome within {timeout_ms(state, index, policy)} ms", True)
            state["steps"][index]["error"] = error
            _retry_or_fail(transition, index, error, may_have_applied=True, now=now, policy=policy)
    return transition


def _resend(transition: Transition, index: int, now: int, policy: SagaPolicy) -> None:
    action: Literal["EXECUTE", "COMPENSATE"] = (
        "COMPENSATE" if saga_order.is_compensating(transition.state) else "EXECUTE"
    )
    transition.commands.append(send(transition.state, index, action, now, policy))


def _operator_retry(state: SagaSnapshot, event: OperatorReceived, now: int, policy: SagaPolicy) -> Transition:
    """Every scheduled retry, now: what the timer would do when due, audited."""
    state = copy_state(state, now)
    transition = Transition(state, alerts=[operator.audit(event.command, now)])
    for index in saga_order.retry_scheduled(state):
        _resend(transition, index, now, policy)
    return transition


def _operator_resolved(state: SagaSnapshot, event: OperatorReceived, now: int, policy: SagaPolicy) -> Transition:
    """The operator repaired a step being compensated by hand: compensation goes on before it."""
    state = saga_operator.mark_resolved(state, event.command, now)
    transition = Transition(state, alerts=[operator.audit(event.command, now)])
    return _compensate_ready(transition, now, policy)


def _operator_refused(state: SagaSnapshot, event: OperatorReceived, now: int, policy: SagaPolicy) -> Transition:
    reason = saga_operator.refusal_reason(state, event.command) or "refused"
    return operator.refused(state, event.command, reason, now)


# -- the table: every (phase, event kind) a saga can meet -------------------------------------------

_F, _A, _C, _S = SagaPhase.FORWARD, SagaPhase.ABORTING, SagaPhase.COMPENSATING, SagaPhase.STUCK
_COMPENSATING_ROWS: dict[SagaEvent, Handler] = {
    SagaEvent.INTENT_AGAIN: unchanged,  # a duplicate of an intent in flight
    SagaEvent.EXECUTED: unchanged,  # a late success of a step being compensated: the compensation undoes it
    SagaEvent.EXECUTE_FAILED: unchanged,  # late: the step is already being compensated
    SagaEvent.EXECUTE_SKIPPED: unchanged,  # late: the step is already being compensated
    SagaEvent.COMPENSATED: _compensated,
    SagaEvent.COMPENSATE_FAILED: _compensate_failed,
    SagaEvent.STALE_OUTCOME: unchanged,
    SagaEvent.TIMER_DUE: _timer_due,  # a compensation timed out (counts as failed), or its retry is due
    SagaEvent.TIMER_EARLY: unchanged,
    SagaEvent.OPERATOR_RETRY: _operator_retry,
    SagaEvent.OPERATOR_RESOLVE: _operator_resolved,
    SagaEvent.OPERATOR_REFUSED: _operator_refused,
}
TABLE: dict[tuple[StrEnum, StrEnum], Handler] = {
    (_F, SagaEvent.INTENT_AGAIN): unchanged,  # a duplicate of an intent in flight
    (_F, SagaEvent.EXECUTED): _executed,
    (_F, SagaEvent.EXECUTE_FAILED): _execute_failed,
    (_F, SagaEvent.EXECUTE_SKIPPED): _execute_skipped,
    # Going forward, no compensation was sent: these are redeliveries from an earlier run of the same
    # transaction id (an intent sent again after its saga ended).
    (_F, SagaEvent.COMPENSATED): unchanged,
    (_F, SagaEvent.COMPENSATE_FAILED): unchanged,
    (_F, SagaEvent.STALE_OUTCOME): unchanged,
    (_F, SagaEvent.TIMER_DUE): _timer_due,  # a step timed out (counts as failed), or its retry is due
    (_F, SagaEvent.TIMER_EARLY): unchanged,
    # Aborting: the steps still in flight settle (no retry, no new step), then compensation starts.
    (_A, SagaEvent.INTENT_AGAIN): unchanged,
    (_A, SagaEvent.EXECUTED): _executed,  # applied after all: it will be compensated
    (_A, SagaEvent.EXECUTE_FAILED): _execute_failed,  # failed for good: no retry once aborting
    (_A, SagaEvent.EXECUTE_SKIPPED): _execute_skipped,
    (_A, SagaEvent.COMPENSATED): unchanged,  # no compensation sent yet: redeliveries, as going forward
    (_A, SagaEvent.COMPENSATE_FAILED): unchanged,
    (_A, SagaEvent.STALE_OUTCOME): unchanged,
    (_A, SagaEvent.TIMER_DUE): _timer_due,  # a step in flight timed out: it may have applied
    (_A, SagaEvent.TIMER_EARLY): unchanged,
    # Nothing waits for a retry while aborting and no step is being compensated: refused with the reason.
    **{(_A, kind): _operator_refused for kind in OPERATOR_KINDS.values()},
    **{(_C, kind): handler for kind, handler in _COMPENSATING_ROWS.items()},
    # Stuck is compensating with an alert raised: the same rows (a success also resolves the alert).
    **{(_S, kind): handler for kind, handler in _COMPENSATING_ROWS.items()},
    # After the end every event is late or a duplicate, and a terminal state never changes.
    **{(phase, kind): unchanged for phase in map(SagaPhase, TERMINAL) for kind in SagaEvent},
    # Operator commands: classify lets through only what the phase allows; every other row refuses
    # explicitly (an alert saying why), never a crash and never a silent drop.
    (_F, SagaEvent.OPERATOR_RETRY): _operator_retry,  # a step's scheduled retry, now
    (_F, SagaEvent.OPERATOR_RESOLVE): _operator_refused,
    (_F, SagaEvent.OPERATOR_REFUSED): _operator_refused,
    **{(phase, kind): _operator_refused for phase in map(SagaPhase, TERMINAL) for kind in OPERATOR_KINDS.values()},
}


def decide(state: SagaSnapshot, event: Event, now: int, policy: SagaPolicy) -> Transition:
    state = saga_order.upgrade(state)  # a snapshot written before per-step flights: rebuilt once
    transition = dispatch(TABLE, (phase_of(state), classify(state, event, now)), state, event, now, policy)
    if transition.state is not state:  # a new state, the transition's own: its summary fields follow its steps
        saga_order.summarise(transition.state)
    return transition


def on_outcome(state: SagaSnapshot, outcome: StepOutcome, now: int, policy: SagaPolicy) -> Transition:
    """A store reported on a command. Outcomes that no longer matter (late, duplicate) change nothing."""
    return decide(state, OutcomeReceived(outcome), now, policy)


def on_due(state: SagaSnapshot, now: int, policy: SagaPolicy) -> Transition:
    """A step in flight timed out, or a scheduled retry is due."""
    return decide(state, TimerDue(), now, policy)


@dataclass(frozen=True)
class SagaProtocol:
    """The saga as the driver sees it (orchestrator/registry.py registers it under "saga")."""

    policy: SagaPolicy = field(default_factory=SagaPolicy)
    name: str = PROTOCOL

    def start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        return start(intent, now, self.policy, refusal)

    def decide(self, state: SagaSnapshot, event: Event, now: int) -> Transition:
        return decide(state, event, now, self.policy)

    def is_terminal(self, phase: str) -> bool:
        return phase in TERMINAL

    def is_in_flight(self, phase: str) -> bool:
        return phase in IN_FLIGHT

    def is_stuck(self, phase: str) -> bool:
        return phase == SagaPhase.STUCK
