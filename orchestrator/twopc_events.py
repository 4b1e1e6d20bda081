"""What an event is for a two-phase commit in its state: the row kind of its (phase, event) table.

Votes of a step still pending count; a duplicate vote, a vote after the decision, an acknowledgement of
an action never decided are named stale (explicit rows that change nothing); an outcome two-phase commit
can never receive raises ProtocolError.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from orchestrator import twopc_model as m
from orchestrator.locks import LockTable
from orchestrator.protocol import Event, IntentReceived, LocksGranted, OperatorReceived, PartitionGranted, TimerDue
from orchestrator.twopc_model import TwoPCPhase, Vote
from polycommit.errors import ProtocolError
from polycommit.events import SagaSnapshot


class TwoPCEvent(StrEnum):
    INTENT_AGAIN = "intent again"
    LOCKS_GRANTED = "locks granted"
    VOTE_YES = "vote yes"  # PREPARED from a step still pending
    VOTE_NO = "vote no"  # VOTED_NO (or FAILED) from a step still pending
    STALE_VOTE = "stale vote"  # a duplicate, or a vote after the decision
    ACKED = "phase 2 acknowledged"  # APPLIED / ALREADY_APPLIED / NOOP of the decided action
    PHASE2_FAILED = "phase 2 failed"
    STALE_ACK = "stale acknowledgement"  # a duplicate, or of an action this transaction never decided
    TIMER_DUE = "timer due"
    RESEND_DUE = "resend due"  # the timer while preparing, with a step whose retriable no's backoff is over
    TIMER_EARLY = "timer early"
    ADMISSION_WAIT = "admission wait"  # the lock-wait timer of one that holds its locks, queued for admission


_VOTES = {"PREPARED": TwoPCEvent.VOTE_YES, "VOTED_NO": TwoPCEvent.VOTE_NO, "FAILED": TwoPCEvent.VOTE_NO}
_ACKS = {"APPLIED": TwoPCEvent.ACKED, "ALREADY_APPLIED": TwoPCEvent.ACKED, "NOOP": TwoPCEvent.ACKED}


def classify(state: SagaSnapshot, event: Event, now: int, locks: LockTable, admitted: Iterable[str] = ()) -> TwoPCEvent:
    tx_id = state["intent"]["tx_id"]
    if isinstance(event, TimerDue):
        due = state["due_at_ms"]
        if not (due and now >= due):
            return TwoPCEvent.TIMER_EARLY
        if state["phase"] == TwoPCPhase.LOCKING and locks.holds_all(tx_id):
            return TwoPCEvent.ADMISSION_WAIT  # flow control, not a lock wait: it never times out
        if state["phase"] == TwoPCPhase.PREPARING and any(s["status"] == Vote.RESEND for s in state["steps"]):
            return TwoPCEvent.RESEND_DUE
        return TwoPCEvent.TIMER_DUE
    if isinstance(event, LocksGranted):
        go = locks.holds_all(tx_id) and tx_id in admitted
        return TwoPCEvent.LOCKS_GRANTED if go else TwoPCEvent.TIMER_EARLY
    if isinstance(event, OperatorReceived):  # the protocol answers these before the table (see decide)
        raise ProtocolError(f"{tx_id}: an operator command has no row in the two-phase commit table")
    if isinstance(event, IntentReceived):
        if event.intent["tx_id"] != tx_id:
            raise ProtocolError(f"{tx_id}: received the intent of {event.intent['tx_id']}")
        return TwoPCEvent.INTENT_AGAIN
    if isinstance(event, PartitionGranted):  # two-phase commit never asks the partitioned lock manager
        raise ProtocolError(f"{tx_id}: a partition's lock grant has no row in the two-phase commit table")
    outcome = event.outcome
    if outcome["tx_id"] != tx_id or not 0 <= outcome["step_index"] < len(state["steps"]):
        raise ProtocolError(f"{tx_id}: outcome for {outcome['tx_id']} step {outcome['step_index']}, not of this one")
    step = state["steps"][outcome["step_index"]]
    if outcome["action"] == "PREPARE" and outcome["status"] in _VOTES:
        if step["status"] != Vote.PENDING:
            return TwoPCEvent.STALE_VOTE
        kind = _VOTES[outcome["status"]]
        if kind is TwoPCEvent.VOTE_NO and outcome["attempt"] != step["attempts"]:
            return TwoPCEvent.STALE_VOTE  # a no from an attempt already sent again
        return kind
    if outcome["action"] in ("COMMIT", "ABORT") and outcome["status"] in (*_ACKS, "FAILED"):
        decided = "COMMIT" if state["phase"] in m.COMMIT_SIDE else "ABORT" if state["phase"] in m.ABORT_SIDE else None
        if outcome["action"] != decided or step["status"] in m.ACKNOWLEDGED:
            return TwoPCEvent.STALE_ACK
        return _ACKS.get(outcome["status"], TwoPCEvent.PHASE2_FAILED)
    raise ProtocolError(f"{tx_id}: two-phase commit never receives a {outcome['action']} outcome {outcome['status']}")
