"""What every protocol does with an operator's command: the audit alert, and the explicit refusal.

`polycommit tx retry|resolve` publish an `OperatorCommand` to the intents topic keyed by tx id; the driver
hands it to the transaction's protocol as `OperatorReceived`. A protocol's table carries it out (sagas:
orchestrator/saga_operator.py) or refuses it with `refused` below: an `operator_refused` alert with the
reason, never an exception, since an operator's mistake is not poison. Two-phase commit's hazards use the
same commands: its table adds rows for the `OperatorReceived` kinds it supports and refuses the rest here.
"""

from __future__ import annotations

from orchestrator.protocol import Transition, TxState
from polycommit.events import Alert, OperatorCommand

AUDIT_ALERT = "operator"  # a command that was carried out: who, when, what, and the note
REFUSED_ALERT = "operator_refused"  # a command that was not, and why


def describe(command: OperatorCommand) -> str:
    step = f" step {command['step_index']}" if command["action"] == "RESOLVE_STEP" else ""
    note = f": {command['note']}" if command["note"] else ""
    return f"{command['action']}{step} by {command['operator'] or 'unknown'} at {command['at_ms']}{note}"


def audit(command: OperatorCommand, now: int) -> Alert:
    return {"kind": AUDIT_ALERT, "tx_id": command["tx_id"], "message": describe(command), "at_ms": now}


def refusal(command: OperatorCommand, reason: str, now: int) -> Alert:
    message = f"{describe(command)} refused: {reason}"
    return {"kind": REFUSED_ALERT, "tx_id": command["tx_id"], "message": message, "at_ms": now}


def refused(state: TxState, command: OperatorCommand, reason: str, now: int) -> Transition:
    """The transition of a refused command: the state unchanged, one alert saying why."""
    return Transition(state, alerts=[refusal(command, reason, now)])
