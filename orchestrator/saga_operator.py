"""Which operator commands a saga can carry out, for the state it is in, and what each one changes.

RETRY sends the command that waits for its backoff now (a stuck compensation, or a step's scheduled
retry). RESOLVE_STEP records that an operator repaired the step being compensated by hand, so the saga
goes on compensating the steps before it. Anything else (a command in flight, another step, a saga going
forward or ended) is refused with its reason. The rows that use these, and the
classification of a command into an event kind, live in orchestrator/saga.py.
"""

from __future__ import annotations

from typing import Literal

from orchestrator.saga_model import RESOLVED_BY_OPERATOR, SagaPhase, copy_state, phase_of
from polycommit.errors import ProtocolError
from polycommit.events import OperatorCommand, SagaSnapshot

_COMPENSATING = frozenset({SagaPhase.COMPENSATING, SagaPhase.STUCK})


def refusal_reason(state: SagaSnapshot, command: OperatorCommand) -> str | None:
    """Why the saga cannot carry this command out now, or None."""
    phase = phase_of(state)
    if phase not in (SagaPhase.FORWARD, *_COMPENSATING):
        return f"the saga has ended ({phase.value})"
    if command["action"] == "RETRY":
        if state["waiting"]:
            return f"step {state['current']}'s command (attempt {state['attempt']}) is in flight; wait for its outcome"
        if not state["due_at_ms"]:
            return "nothing is waiting to be retried"
        return None
    if command["action"] == "RESOLVE_STEP":
        if phase not in _COMPENSATING:
            return "only a step being compensated can be resolved (the saga is going forward)"
        if command["step_index"] != state["current"]:
            return f"step {state['current']} is being compensated, not step {command['step_index']}"
        return None
    return f"unknown action {command['action']!r}"


def verdict(state: SagaSnapshot, command: OperatorCommand) -> Literal["retry", "resolve", "refused"]:
    """What the command is for this state (saga.py turns it into the event kind of its table)."""
    if command["tx_id"] != state["intent"]["tx_id"]:
        raise ProtocolError(f"{state['intent']['tx_id']}: received an operator command for {command['tx_id']}")
    if refusal_reason(state, command) is not None:
        return "refused"
    return "retry" if command["action"] == "RETRY" else "resolve"


def mark_resolved(state: SagaSnapshot, command: OperatorCommand, now: int) -> SagaSnapshot:
    """A copy of the state with the current step repaired by hand and the saga compensating again."""
    state = copy_state(state, now)
    step = state["steps"][state["current"]]
    step["status"] = RESOLVED_BY_OPERATOR
    step["resolved_by"] = command["operator"] or "unknown"
    state["phase"] = SagaPhase.COMPENSATING
    state["waiting"] = False  # a late outcome of the resolved step's compensation is stale from now on
    state["due_at_ms"] = 0
    return state
