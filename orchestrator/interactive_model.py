"""The vocabulary of interactive transactions (orchestrator/interactive.py): their phases and events, what
an open transaction's snapshot carries, and the records it answers with. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator.locking import lock_event
from orchestrator.locks import EXCLUSIVE, LockMode, LockTable
from orchestrator.protocol import Event, TxState
from polycommit.errors import DeadlockVictimError
from polycommit.events import (
    DeadlockVerdict,
    ErrorInfo,
    LockEvent,
    LockReply,
    LockRequest,
    TransactionIntent,
    error_info,
)
from projections.wait_for import Member, judge


class OpenPhase(StrEnum):
    """The phases of an interactive transaction before its intent; every other phase is the wrapper's."""

    OPEN = "open"  # holds the locks it asked for; no request waiting, no intent yet
    WAITING = "open, waiting"  # one LockRequest waits (FIFO) for other transactions' locks
    RELEASED = "released"  # terminal: ended before its intent (released, idle, lock wait over): nothing ran
    VICTIM = "deadlock victim"  # terminal: aborted by a deadlock verdict while it waited: nothing ran


class OpenEvent(StrEnum):
    ASKED = "lock request"
    ASKED_AGAIN = "lock request again"  # a request number already handled
    ASKED_WHILE_WAITING = "lock request while another waits"
    RELEASE = "release"
    INTENT = "intent"
    GRANTED = "locks granted"
    STILL_WAITING = "still waiting"  # a wake-up or a timer before every lock is its own
    TIMER_EARLY = "timer early"
    TIMED_OUT = "timed out"  # idle (open) or lock wait (waiting) longer than its timeout
    VICTIM = "deadlock victim"
    STALE_VERDICT = "stale verdict"  # a duplicate, or the victim no longer waits in this cycle
    STALE_OUTCOME = "stale outcome"  # nothing was sent: from an earlier run of the same tx id
    OPERATOR = "operator command"


@dataclass(frozen=True)
class LockRequested:
    """A client's LockRequest for this transaction."""

    request: LockRequest


@dataclass(frozen=True)
class VictimChosen:
    """A deadlock verdict naming this transaction."""

    verdict: DeadlockVerdict


InteractiveEvent = Event | LockRequested | VictimChosen


@dataclass
class OpenLocks:
    """What an open transaction holds (key -> mode), the request it waits on, and the last request number."""

    held: dict[str, str] = field(default_factory=dict)
    waiting_request: int = 0  # the request that waits (0: none), for which keys in which mode
    waiting_keys: list[str] = field(default_factory=list)
    waiting_mode: str = EXCLUSIVE.value
    waiting_shared: list[str] = field(default_factory=list)  # asked SHARED in the same request
    last: int = 0

    @classmethod
    def of(cls, state: TxState) -> OpenLocks:
        text = state["before_images"][0] if state["before_images"] else None
        return cls(**json.loads(text)) if text else cls()

    def into(self, state: TxState) -> None:
        state["before_images"] = [json.dumps(vars(self), sort_keys=True)]

    def wait(self, request: int, keys: list[str], mode: LockMode, shared: list[str]) -> None:
        self.waiting_request, self.waiting_keys, self.waiting_mode = request, keys, mode.value
        self.waiting_shared = shared

    def granted(self, modes: dict[str, str]) -> None:
        self.held.update(modes)
        self.waiting_request, self.waiting_keys, self.waiting_shared = 0, [], []


def open_intent(request: LockRequest) -> TransactionIntent:
    """The intent an open transaction is known by until its own arrives: no steps, the request's options."""
    return {
        "tx_id": request["tx_id"],
        "name": request["name"],
        "consistency": "EVENTUAL",
        "isolation": request["isolation"],
        "priority": request["priority"],
        "steps": [],
        "reply_to": request["reply_to"],
        "client_id": request["client_id"],
        "created_at_ms": request["created_at_ms"],
        "locks": True,
        "lock_wait_ms": request["lock_wait_ms"],
    }


def reply(state: TxState, request: int, now: int, error: ErrorInfo | None = None) -> LockReply:
    tx_id = state["intent"]["tx_id"]
    if error is None:
        return {"tx_id": tx_id, "request": request, "status": "GRANTED", "error": None, "at_ms": now}
    return {"tx_id": tx_id, "request": request, "status": "REFUSED", "error": error, "at_ms": now}


def waits_in_cycle(locks: LockTable, tx_id: str, verdict: DeadlockVerdict) -> bool:
    """`tx_id` still waits in this table for a member of the verdict's cycle: the verdict is current."""
    if tx_id not in locks or locks.holds_all(tx_id):
        return False
    return bool(set(locks.blockers(tx_id)) & set(verdict["cycle"]))


def victim_error(verdict: DeadlockVerdict) -> ErrorInfo:
    cycle = " -> ".join(verdict["cycle"])
    message = f"chosen as the deadlock victim of the cycle {cycle}; nothing ran, its locks were released"
    return error_info(DeadlockVictimError.__name__, message, True)


def open_lock_event(
    state: TxState, key: str, action: str, blockers: list[str], now: int, mode: LockMode, held: int
) -> LockEvent:
    event = lock_event(state, key, action, blockers, now, mode)
    event["work_done"] = held  # the locks it holds: what aborting it would throw away
    return event


def work_done(state: TxState) -> int:
    """The work the score counts, as the transaction's lock events tell the detector: the locks an open
    transaction holds, the steps a saga has run."""
    if state["phase"] in (OpenPhase.OPEN, OpenPhase.WAITING):
        return len(OpenLocks.of(state).held)
    return int(lock_event(state, "", "WAITING", [], 0, EXCLUSIVE)["work_done"])


def verdict_on(cycle: tuple[str, ...], states: list[TxState], now: int) -> DeadlockVerdict:
    """The verdict the detector would give on a cycle of these transactions (`projections.wait_for.judge`)."""
    members = [Member(s["intent"]["tx_id"], s["intent"]["priority"], s["started_at_ms"], work_done(s)) for s in states]
    chosen = judge(cycle, members, now)
    return {"cycle": list(cycle), "victim": chosen.victim, "scores": chosen.scores, "at_ms": now}
