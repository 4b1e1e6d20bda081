"""What an event is for a saga in its state: the row kind of its (phase, event) table.

An outcome counts when it is about a step whose command of that kind (execution going forward or
aborting, compensation compensating) is still open: a success from any attempt (after a timeout the first
attempt may still land), a failure only from the attempt in flight. Everything else is stale or late: an
explicit row that changes nothing. An outcome a saga can never receive raises ProtocolError.
"""

from __future__ import annotations

from enum import StrEnum

from orchestrator import saga_operator
from orchestrator.protocol import Event, IntentReceived, OperatorReceived, OutcomeReceived, TimerDue
from orchestrator.saga_model import PENDING, SagaPhase
from polycommit.errors import ProtocolError
from polycommit.events import SagaSnapshot, StepOutcome


class SagaEvent(StrEnum):
    """What an event is, for the state it meets."""

    INTENT_AGAIN = "intent again"  # the intent of a transaction already running
    EXECUTED = "step applied"  # APPLIED or ALREADY_APPLIED, by any attempt, of a step sent and not settled
    EXECUTE_FAILED = "step failed"  # by the attempt in flight
    EXECUTE_SKIPPED = "step skipped"  # its compensation ran first (a replay of a compensated saga)
    COMPENSATED = "compensation applied"  # APPLIED, ALREADY_APPLIED or NOOP, by any attempt
    COMPENSATE_FAILED = "compensation failed"  # by the attempt in flight
    STALE_OUTCOME = "stale outcome"  # for a step not in flight, or a failure of an attempt given up on
    TIMER_DUE = "timer due"
    TIMER_EARLY = "timer early"  # no timer set, or fired before it is due
    OPERATOR_RETRY = "operator retry"  # `polycommit tx retry`, when something waits for its backoff
    OPERATOR_RESOLVE = "operator resolve"  # `polycommit tx resolve` of a step being compensated
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
OPERATOR_KINDS = {"retry": SagaEvent.OPERATOR_RETRY, "resolve": SagaEvent.OPERATOR_RESOLVE}
OPERATOR_KINDS["refused"] = SagaEvent.OPERATOR_REFUSED
# Any attempt's success counts: after a timeout, the first attempt may still land.
_ANY_ATTEMPT = frozenset({SagaEvent.EXECUTED, SagaEvent.COMPENSATED})
# The action whose outcomes a phase waits for; the other action's outcomes are late (rows unchanged).
_ACTION_OF_PHASE = {
    SagaPhase.FORWARD: "EXECUTE",
    SagaPhase.ABORTING: "EXECUTE",
    SagaPhase.COMPENSATING: "COMPENSATE",
    SagaPhase.STUCK: "COMPENSATE",
}


def classify(state: SagaSnapshot, event: Event, now: int) -> SagaEvent:
    if isinstance(event, OperatorReceived):
        return OPERATOR_KINDS[saga_operator.verdict(state, event.command)]
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
    if _ACTION_OF_PHASE.get(SagaPhase(state["phase"])) != outcome["action"]:
        return kind  # an outcome the phase no longer (or not yet) waits for: its row changes nothing
    return kind if _is_open(state, outcome, kind) else SagaEvent.STALE_OUTCOME


def _is_open(state: SagaSnapshot, outcome: StepOutcome, kind: SagaEvent) -> bool:
    """Whether the outcome's step still waits for it."""
    index = outcome["step_index"]
    flight = state["flights"][index]
    if kind in _ANY_ATTEMPT:
        sent = flight["attempt"] >= 1
        if outcome["action"] == "EXECUTE":
            return sent and state["steps"][index]["status"] == PENDING
        return sent and not flight["done"]
    return flight["waiting"] and outcome["attempt"] == flight["attempt"]
