"""The saga coordinator as a pure state machine: a table of (phase, event kind) -> transition.

No awaits and no clock of its own: the driver passes `now` in, so every path, timeouts included, can be
tested with plain lists of events. A saga runs its steps in order. A failed step is retried with
exponential backoff and jitter up to its `retries`; a step past its timeout counts as failed. When a step
cannot succeed, the steps that may have applied are compensated in reverse order; a compensation that
keeps failing is retried with capped backoff forever and the saga is reported `stuck` (P2: never dropped).

`classify` names what an event is for the state it meets (an outcome of the step in flight, a late one,
a timer that is due...), raising ProtocolError for what a saga can never receive; `TABLE` then holds one
row per (phase, kind), late and duplicate events included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator import operator, saga_operator
from orchestrator.protocol import (
    Event,
    Handler,
    IntentReceived,
    OperatorReceived,
    OutcomeReceived,
    TimerDue,
    Transition,
    dispatch,
    unchanged,
)
from orchestrator.saga_model import (
    APPLIED,
    COMPENSATED,
    COMPENSATION_FAILED,
    FAILED,
    IN_FLIGHT,
    MAY_HAVE_APPLIED,
    NOT_APPLIED,
    PENDING,
    PROTOCOL,
    SKIPPED,
    TERMINAL,
    TIMED_OUT,
    TO_COMPENSATE,
    SagaPhase,
    SagaPolicy,
    StepStatus,
    alert,
    copy_state,
    initial_state,
    phase_of,
    problem_step,
    result_of,
    send,
    timeout_ms,
    validate,
)
from polycommit.errors import ProtocolError
from polycommit.events import ErrorInfo, SagaSnapshot, StepOutcome, TransactionIntent, TransactionStatus, error_info

__all__ = [
    "APPLIED",
    "COMPENSATED",
    "COMPENSATION_FAILED",
    "FAILED",
    "MAY_HAVE_APPLIED",
    "NOT_APPLIED",
    "PENDING",
    "SKIPPED",
    "TABLE",
    "TERMINAL",
    "TIMED_OUT",
    "SagaEvent",
    "SagaPhase",
    "SagaPolicy",
    "SagaProtocol",
    "StepStatus",
    "Transition",
    "classify",
    "decide",
    "on_due",
    "on_outcome",
    "result_of",
    "start",
]


class SagaEvent(StrEnum):
    """What an event is, for the state it meets."""

    INTENT_AGAIN = "intent again"  # the intent of a transaction already running
    EXECUTED = "step applied"  # APPLIED or ALREADY_APPLIED, by any attempt, of the step in flight
    EXECUTE_FAILED = "step failed"  # by the attempt in flight
    EXECUTE_SKIPPED = "step skipped"  # its compensation ran first (a replay of a compensated saga)
    COMPENSATED = "compensation applied"  # APPLIED, ALREADY_APPLIED or NOOP, by any attempt
    COMPENSATE_FAILED = "compensation failed"  # by the attempt in flight
    STALE_OUTCOME = "stale outcome"  # for a step not in flight, or a failure of an attempt given up on
    TIMER_DUE = "timer due"
    TIMER_EARLY = "timer early"  # no timer set, or fired before it is due
    OPERATOR_RETRY = "operator retry"  # `polycommit tx retry`, when something waits for its backoff
    OPERATOR_RESOLVE = "operator resolve"  # `polycommit tx resolve` of the step being compensated
    OPERATOR_REFUSED = "operator command refused"  # any operator command the saga cannot carry out now


_OUTCOME_KINDS: dict[str, dict[str, SagaEvent]] = {
    "EXECUTE": {
        "APPLIED": SagaEvent.EXECUTED,
        "ALREADY_APPLIED": SagaEvent.EXECUTED,
        "SKIPPED": SagaEvent.EXECUTE_SKIPPED,
        "FAILED": SagaEvent.EXECUTE_FAILED,
    },
    "COMPENSATE": {
        "APPLIED": SagaEvent.COMPENSATED,
        "ALREADY_APPLIED": SagaEvent.COMPENSATED,
        "NOOP": SagaEvent.COMPENSATED,
        "FAILED": SagaEvent.COMPENSATE_FAILED,
    },
}
_OPERATOR_KINDS = {"retry": SagaEvent.OPERATOR_RETRY, "resolve": SagaEvent.OPERATOR_RESOLVE}
_OPERATOR_KINDS["refused"] = SagaEvent.OPERATOR_REFUSED
# Any attempt's success counts: after a timeout, the first attempt may still land.
_ANY_ATTEMPT = frozenset({SagaEvent.EXECUTED, SagaEvent.COMPENSATED})


def classify(state: SagaSnapshot, event: Event, now: int) -> SagaEvent:
    if isinstance(event, OperatorReceived):
        return _OPERATOR_KINDS[saga_operator.verdict(state, event.command)]
    if isinstance(event, TimerDue):
        due = state["due_at_ms"]
        return SagaEvent.TIMER_DUE if due and now >= due else SagaEvent.TIMER_EARLY
    tx_id = state["intent"]["tx_id"]
    if isinstance(event, IntentReceived):
        if event.intent["tx_id"] != tx_id:
            raise ProtocolError(f"{tx_id}: received the intent of {event.intent['tx_id']}")
        return SagaEvent.INTENT_AGAIN
    if not isinstance(event, OutcomeReceived):  # a saga holds no locks: nothing can be granted to it
        raise ProtocolError(f"{tx_id}: a saga never waits for locks")
    outcome = event.outcome
    kind = _OUTCOME_KINDS.get(outcome["action"], {}).get(outcome["status"])
    if kind is None:
        raise ProtocolError(f"{tx_id}: a saga never receives a {outcome['action']} outcome {outcome['status']}")
    if outcome["tx_id"] != tx_id or not 0 <= outcome["step_index"] < len(state["steps"]):
        raise ProtocolError(f"{tx_id}: outcome for {outcome['tx_id']} step {outcome['step_index']}, not of this saga")
    if outcome["step_index"] != state["current"]:
        return SagaEvent.STALE_OUTCOME
    if kind not in _ANY_ATTEMPT and outcome["attempt"] != state["attempt"]:
        return SagaEvent.STALE_OUTCOME
    return kind


# -- the transitions --------------------------------------------------------------------------------


def _finish(transition: Transition, phase: SagaPhase, status: TransactionStatus, now: int) -> Transition:
    state = transition.state
    state["phase"] = phase
    state["waiting"] = False
    state["due_at_ms"] = 0
    transition.result = result_of(state, status, now)
    return transition


def start(intent: TransactionIntent, now: int, policy: SagaPolicy, refusal: ErrorInfo | None = None) -> Transition:
    """A new intent: validate every step up front (nothing runs if one is invalid), then run step 0."""
    state = initial_state(intent, now)
    transition = Transition(state)
    problem = refusal or validate(intent, policy)
    if problem is not None:
        state["error"] = problem
        if 0 <= problem_step(problem) < len(state["steps"]):
            state["steps"][problem_step(problem)]["error"] = problem
        transition.rejections.append(problem)  # an intent no store could run is poison: kept for inspection
        return _finish(transition, SagaPhase.FAILED, "FAILED", now)
    if not state["steps"]:
        return _finish(transition, SagaPhase.COMPLETED, "COMPLETED", now)
    transition.commands.append(send(state, "EXECUTE", now, policy))
    return transition


def _executed(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    index = state["current"]
    transition = Transition(state)
    state["steps"][index]["status"] = APPLIED
    state["steps"][index]["error"] = None
    state["before_images"][index] = event.outcome["before_image"]
    if index + 1 == len(state["steps"]):
        return _finish(transition, SagaPhase.COMPLETED, "COMPLETED", now)
    state["current"], state["attempt"] = index + 1, 1
    transition.commands.append(send(state, "EXECUTE", now, policy))
    return transition


def _execute_skipped(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    """The step was compensated before (a replay of a compensated saga): it must not run now."""
    state = copy_state(state, now)
    index = state["current"]
    state["steps"][index]["status"] = SKIPPED
    state["error"] = error_info("StepSkipped", f"step {index}: already compensated", False)
    return _begin_compensation(Transition(state), index - 1, now, policy)


def _execute_failed(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    error = event.outcome["error"] or error_info("StepFailed", "no error given", False)
    state["steps"][state["current"]]["error"] = error
    return _retry_or_compensate(Transition(state), error, may_have_applied=False, now=now, policy=policy)


def _retry_or_compensate(
    transition: Transition, error: ErrorInfo, *, may_have_applied: bool, now: int, policy: SagaPolicy
) -> Transition:
    state = transition.state
    index = state["current"]
    retries = state["intent"]["steps"][index]["retries"]
    if error["retriable"] and state["attempt"] <= retries:
        state["waiting"] = False
        state["due_at_ms"] = now + policy.backoff_ms(state["intent"]["tx_id"], state["attempt"])
        return transition
    state["steps"][index]["status"] = TIMED_OUT if may_have_applied else FAILED
    state["error"] = error_info(error["error_class"], f"step {index}: {error['message']}", error["retriable"])
    # The failed step itself is compensated first: undone if it timed out and may have applied after
    # all, fenced (a recorded no-op) if its store reported the failure.
    return _begin_compensation(transition, index, now, policy)


def _begin_compensation(transition: Transition, from_index: int, now: int, policy: SagaPolicy) -> Transition:
    transition.state["phase"] = SagaPhase.COMPENSATING
    return _compensate_next(transition, from_index, now, policy)


def _compensate_next(transition: Transition, from_index: int, now: int, policy: SagaPolicy) -> Transition:
    """Compensate the highest step at or below `from_index` that may have applied, or finish."""
    state = transition.state
    index = from_index
    while index >= 0 and state["steps"][index]["status"] not in TO_COMPENSATE:
        index -= 1
    if index < 0:
        return _finish(transition, SagaPhase.COMPENSATED, "COMPENSATED", now)
    state["current"], state["attempt"] = index, 1
    transition.commands.append(send(state, "COMPENSATE", now, policy))
    return transition


def _compensated(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    index = state["current"]
    transition = Transition(state)
    step = state["steps"][index]
    if step["status"] != FAILED:  # a failed step stays "failed" in the result once fenced
        step["status"] = COMPENSATED if event.outcome["status"] != "NOOP" else NOT_APPLIED
    if state["phase"] == SagaPhase.STUCK:
        transition.alerts.append(alert("resolved", state, f"step {index} compensated", now))
        state["phase"] = SagaPhase.COMPENSATING
    return _compensate_next(transition, index - 1, now, policy)


def _compensate_failed(state: SagaSnapshot, event: OutcomeReceived, now: int, policy: SagaPolicy) -> Transition:
    state = copy_state(state, now)
    error = event.outcome["error"] or error_info("CompensationFailed", "no error given", False)
    # The compensation's own error, kept apart from the step's: an operator must see why the undo fails.
    state["steps"][state["current"]]["compensation_error"] = error
    return _compensation_failed(Transition(state), error, now, policy)


def _compensation_failed(transition: Transition, error: ErrorInfo, now: int, policy: SagaPolicy) -> Transition:
    """Compensations are retried whatever the error: dropping one would leave the stores disagreeing."""
    state = transition.state
    index = state["current"]
    state["waiting"] = False
    state["due_at_ms"] = now + policy.backoff_ms(state["intent"]["tx_id"], state["attempt"])
    if state["attempt"] >= policy.compensation_retries and state["phase"] != SagaPhase.STUCK:
        state["phase"] = SagaPhase.STUCK
        message = f"compensation of step {index} failed {state['attempt']} times: {error['message']}"
        state["steps"][index]["status"] = COMPENSATION_FAILED
        transition.alerts.append(alert("stuck", state, message, now))
        transition.result = result_of(state, "STUCK", now)
    return transition


def _timer_due(state: SagaSnapshot, event: TimerDue, now: int, policy: SagaPolicy) -> Transition:
    """The step in flight timed out, or a scheduled retry is due."""
    state = copy_state(state, now)
    transition = Transition(state)
    forward = state["phase"] == SagaPhase.FORWARD
    if state["waiting"]:  # a timeout: the command in flight counts as failed
        error = error_info("StepTimeout", f"no outcome within {timeout_ms(state, state['current'], policy)} ms", True)
        if forward:
            state["steps"][state["current"]]["error"] = error
            return _retry_or_compensate(transition, error, may_have_applied=True, now=now, policy=policy)
        state["steps"][state["current"]]["compensation_error"] = error
        return _compensation_failed(transition, error, now, policy)
    state["attempt"] += 1
    transition.commands.append(send(state, "EXECUTE" if forward else "COMPENSATE", now, policy))
    return transition


def _operator_retry(state: SagaSnapshot, event: OperatorReceived, now: int, policy: SagaPolicy) -> Transition:
    """The scheduled retry, now: what the timer would do when due, audited."""
    transition = _timer_due(state, TimerDue(), now, policy)
    transition.alerts.append(operator.audit(event.command, now))
    return transition


def _operator_resolved(state: SagaSnapshot, event: OperatorReceived, now: int, policy: SagaPolicy) -> Transition:
    """The operator repaired the step being compensated by hand: compensation goes on before it."""
    state = saga_operator.mark_resolved(state, event.command, now)
    index = state["current"]
    transition = Transition(state, alerts=[operator.audit(event.command, now)])
    return _compensate_next(transition, index - 1, now, policy)


def _operator_refused(state: SagaSnapshot, event: OperatorReceived, now: int, policy: SagaPolicy) -> Transition:
    reason = saga_operator.refusal_reason(state, event.command) or "refused"
    return operator.refused(state, event.command, reason, now)


# -- the table: every (phase, event kind) a saga can meet -------------------------------------------

_F, _C, _S = SagaPhase.FORWARD, SagaPhase.COMPENSATING, SagaPhase.STUCK
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
    **{(phase, kind): _operator_refused for phase in map(SagaPhase, TERMINAL) for kind in _OPERATOR_KINDS.values()},
}


def decide(state: SagaSnapshot, event: Event, now: int, policy: SagaPolicy) -> Transition:
    return dispatch(TABLE, (phase_of(state), classify(state, event, now)), state, event, now, policy)


def on_outcome(state: SagaSnapshot, outcome: StepOutcome, now: int, policy: SagaPolicy) -> Transition:
    """A store reported on a command. Outcomes that no longer matter (late, duplicate) change nothing."""
    return decide(state, OutcomeReceived(outcome), now, policy)


def on_due(state: SagaSnapshot, now: int, policy: SagaPolicy) -> Transition:
    """The step in flight timed out, or a scheduled retry is due."""
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
