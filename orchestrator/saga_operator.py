"""Which operator commands a saga can carry out, for the state it is in, and what each one changes.

RETRY sends every command that waits for its backoff now (a stuck compensation, or a step's scheduled
retry). RESOLVE_STEP records that an operator repaired a step being compensated by hand, so the saga
goes on compensating the steps it depends on. Anything else (a command in flight, another step, a saga going
forward or ended) is refused with its reason. The rows that use these, and the
classification of a command into an event kind, live in orchestrator/saga.py.
"""

from __future__ import annotations

from typing import Literal

from orchestrator import saga_order
from orchestrator.saga_model import COMPENSATION_FAILED, RESOLVED_BY_OPERATOR, SagaPhase, copy_state, phase_of
from polycommit.errors import ProtocolError
from polycommit.events import OperatorCommand, SagaSnapshot

_COMPENSATING = frozenset({SagaPhase.COMPENSATING, SagaPhase.STUCK})


def refusal_reason(state: SagaSnapshot, command: OperatorCommand) -> str | None:
    """Why the saga cannot carry this command out now, or None."""
    phase = phase_of(state)
    if phase not in (SagaPhase.FORWARD, SagaPhase.ABORTING, *_COMPENSATING):
        return f"the saga has ended ({phase.value})"
    if command["action"] == "RETRY":
        if saga_order.retry_scheduled(state):
            return None
        waiting = saga_order.in_flight(state)
        if waiting:
            attempt = state["flights"][waiting[0]]["attempt"]
            return f"step {waiting[0]}'s command (attempt {attempt}) is in flight; wait for its outcome"
        return "nothing is waiting to be retried"
    if command["action"] == "RESOLVE_STEP":
        if phase not in _COMPENSATING:
            return f"only a step being compensated can be resolved (the saga is {phase.value})"
        being = saga_order.being_compensated(state)
        if command["step_index"] not in being:
            which = f"step {being[0]} is" if len(being) == 1 else f"steps {', '.join(map(str, being))} are"
            return f"{which} being compensated, not step {command['step_index']}"
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
    """A copy of the state with the step repaired by hand, and compensating again unless another step's
    compensation keeps failing."""
    state = copy_state(state, now)
    index = command["step_index"]
    step = state["steps"][index]
    step["status"] = RESOLVED_BY_OPERATOR
    step["resolved_by"] = command["operator"] or "unknown"
    # Done: a late outcome of the resolved step's compensation is stale from now on.
    state["flights"][index].update({"waiting": False, "due_at_ms": 0, "done": True})
    if not any(s["status"] == COMPENSATION_FAILED for s in state["steps"]):
        state["phase"] = SagaPhase.COMPENSATING
    return state
