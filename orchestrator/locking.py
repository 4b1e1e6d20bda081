"""Locks for a protocol that takes none itself: `Locking(inner)` holds a transaction's write locks from
before its first command until it ends (the saga's "semantic lock"). Pure: no I/O, `now` is passed in.

A compensation restores a before-image, which is only right if nobody changed the key in between; so a
saga first asks EXCLUSIVE locks on every key its steps and compensations write (`write_keys`, sorted, one
request), and only then does the inner protocol start. Granted at once: the inner protocol starts in the
same transition. Not granted: the transaction waits in the wrapper's own phase `locking` (nothing sent)
until `LocksGranted` (the inner protocol starts then, with the original intent) or its lock-wait timeout
(`lock wait timed out`: FAILED with a LockTimeoutError, nothing ran). Once started, every event goes to
the inner protocol; when its state becomes terminal the locks are released and the transactions they let
go on are named in `Transition.wake`. A stuck saga keeps its locks: its compensation has not finished.

Every request, grant, wait (with its blockers) and release is a LockEvent in `Transition.lock_requests`,
so the deadlock detector sees sagas' waits too. An intent with `locks=false` bypasses the table (its
author gave up isolation), as does one with no write keys (raw statements that declare none).

The wrapper only calls the inner protocol's public methods (`start`, `decide`, `is_terminal`, ...); its
own phases sit beside the inner ones in the same snapshot (`protocol` stays the inner protocol's name).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator import operator
from orchestrator.lock_waits import AnnouncedWaits
from orchestrator.locks import EXCLUSIVE, LockMode, LockTable
from orchestrator.protocol import (
    Event,
    Handler,
    IntentReceived,
    LocksGranted,
    OperatorReceived,
    OutcomeReceived,
    TimerDue,
    TransactionProtocol,
    Transition,
    TxState,
    dispatch,
    restore_locks,
    unchanged,
)
from orchestrator.saga_model import copy_state, result_of
from polycommit.errors import LockTimeoutError, ProtocolError
from polycommit.events import ErrorInfo, LockEvent, TransactionIntent, error_info
from polycommit.operations import lock_keys

DEFAULT_LOCK_WAIT_MS = 10_000


class LockingPhase(StrEnum):
    """The wrapper's phases; every other phase is the inner protocol's."""

    LOCKING = "locking"  # waiting (FIFO) for the exclusive locks on its write keys; nothing sent yet
    TIMED_OUT = "lock wait timed out"  # terminal: its locks never came, nothing ran (result FAILED)


class LockingEvent(StrEnum):
    INTENT_AGAIN = "intent again"
    STALE_OUTCOME = "stale outcome"  # nothing was sent while locking: from an earlier run of the same tx id
    GRANTED = "locks granted"  # a wake-up (or a timer) finds it holding every lock
    STILL_WAITING = "still waiting"  # a wake-up or a timer before every lock is its own, deadline not passed
    EXPIRED = "lock wait expired"
    OPERATOR = "operator command"


def write_keys(intent: TransactionIntent) -> list[str]:
    """Every key a step or its compensation writes, sorted, each once (`polycommit.parsed.keys_of`)."""
    keys: set[str] = set()
    for step in intent["steps"]:
        keys.update(lock_keys(step["operation"]))
        if step["compensation"] is not None:
            keys.update(lock_keys(step["compensation"]))
    return sorted(keys)


def takes_locks(intent: TransactionIntent) -> bool:
    return intent.get("locks", True)


def lock_event(state: TxState, key: str, action: str, blockers: list[str], now: int, mode: LockMode) -> LockEvent:
    return {
        "tx_id": state["intent"]["tx_id"],
        "resource": key,
        "mode": mode.value,  # type: ignore[typeddict-item]
        "action": action,  # type: ignore[typeddict-item]
        "blockers": blockers,
        "priority": state["intent"]["priority"],
        "started_at_ms": state["started_at_ms"],
        "work_done": sum(1 for s in state["steps"] if s["attempts"] or s["compensation_attempts"]),
        "at_ms": now,
    }


def classify(state: TxState, event: Event, now: int, locks: LockTable) -> LockingEvent:
    tx_id = state["intent"]["tx_id"]
    if isinstance(event, OperatorReceived):
        return LockingEvent.OPERATOR
    if isinstance(event, IntentReceived):
        if event.intent["tx_id"] != tx_id:
            raise ProtocolError(f"{tx_id}: received the intent of {event.intent['tx_id']}")
        return LockingEvent.INTENT_AGAIN
    if isinstance(event, OutcomeReceived):
        if event.outcome["tx_id"] != tx_id:
            raise ProtocolError(f"{tx_id}: outcome for {event.outcome['tx_id']}, not of this one")
        return LockingEvent.STALE_OUTCOME
    if locks.holds_all(tx_id):
        return LockingEvent.GRANTED
    if isinstance(event, TimerDue) and tx_id in locks.expired(now):
        return LockingEvent.EXPIRED
    return LockingEvent.STILL_WAITING


# -- the transitions of the wrapper's own phase (the policy argument of a row is the wrapper) ---------


def _go(state: TxState, event: Event, now: int, wrapper: Locking) -> Transition:
    """Its locks are all its own: the inner protocol starts now, with the intent as it arrived."""
    t = wrapper.inner.start(state["intent"], now)
    t.state["started_at_ms"] = state["started_at_ms"]  # arrival order, and a duration that counts the wait
    keys = wrapper.locks.keys_of(state["intent"]["tx_id"])
    t.lock_requests.extend(lock_event(t.state, key, "GRANTED", [], now, EXCLUSIVE) for key in keys)
    if wrapper.inner.is_terminal(t.state["phase"]):
        wrapper.release(t, now)
    return t


def _timed_out(state: TxState, event: Event, now: int, wrapper: Locking) -> Transition:
    new = copy_state(state, now)
    waited = now - state["started_at_ms"]
    blockers = wrapper.locks.blockers(state["intent"]["tx_id"])
    message = f"locks not granted within {waited} ms (held by {', '.join(blockers) or 'nobody'}); nothing ran"
    new["phase"], new["waiting"], new["due_at_ms"] = LockingPhase.TIMED_OUT, False, 0
    new["error"] = error_info(LockTimeoutError.__name__, message, True)
    t = Transition(new, result=result_of(new, "FAILED", now))
    wrapper.release(t, now)
    return t


def _operator_refused(state: TxState, event: OperatorReceived, now: int, wrapper: Locking) -> Transition:
    return operator.refused(state, event.command, "it is waiting for its locks: nothing ran yet", now)


_L = LockingPhase.LOCKING
_OWN_PHASES: frozenset[str] = frozenset(LockingPhase)
TABLE: dict[tuple[StrEnum, StrEnum], Handler] = {
    (_L, LockingEvent.INTENT_AGAIN): unchanged,
    (_L, LockingEvent.STALE_OUTCOME): unchanged,
    (_L, LockingEvent.GRANTED): _go,
    (_L, LockingEvent.STILL_WAITING): unchanged,  # a timer early, or woken while another still holds a key
    (_L, LockingEvent.EXPIRED): _timed_out,
    (_L, LockingEvent.OPERATOR): _operator_refused,
    **{(LockingPhase.TIMED_OUT, kind): unchanged for kind in LockingEvent},
}


class LockingPhases:
    """The phase questions of a wrapper whose own phases (`LockingPhase`) sit beside its inner protocol's."""

    inner: TransactionProtocol

    def is_terminal(self, phase: str) -> bool:
        return phase == LockingPhase.TIMED_OUT or self.inner.is_terminal(phase)

    def is_in_flight(self, phase: str) -> bool:
        return phase == LockingPhase.LOCKING or self.inner.is_in_flight(phase)

    def is_stuck(self, phase: str) -> bool:
        return phase not in _OWN_PHASES and self.inner.is_stuck(phase)


@dataclass
class Locking(LockingPhases):
    """`inner`, run under exclusive locks on its write keys, on its coordinator member's lock table (one
    table for every protocol that locks: see `orchestrator.registry.protocols`)."""

    inner: TransactionProtocol
    lock_wait_ms: int = DEFAULT_LOCK_WAIT_MS  # an intent's own `lock_wait_ms` wins when it gives one
    waits: AnnouncedWaits = field(default_factory=AnnouncedWaits)  # the member's table, shared by every protocol

    @property
    def locks(self) -> LockTable:
        return self.waits.locks

    @property
    def name(self) -> str:
        return self.inner.name

    def start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        return self.noted(self._start(intent, now, refusal))

    def decide(self, state: TxState, event: Event, now: int) -> Transition:
        return self.noted(self._decide(state, event, now))

    def noted(self, t: Transition) -> Transition:
        return self.waits.noted(t)

    def _start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        first = self.inner.start(intent, now, refusal)
        if refusal is not None or not takes_locks(intent) or self.inner.is_terminal(first.state["phase"]):
            return first  # refused or invalid (nothing will run), done already, or opted out
        keys = write_keys(intent)
        if not keys:
            return first
        tx_id = intent["tx_id"]
        deadline = now + (intent.get("lock_wait_ms") or self.lock_wait_ms)
        granted = self.locks.request(tx_id, keys, EXCLUSIVE, deadline)
        if granted:
            first.lock_requests.extend(lock_event(first.state, k, "GRANTED", [], now, EXCLUSIVE) for k in keys)
            return first
        t = Transition(waiting_state(first.state, deadline, now))
        t.cycles.extend((tx_id, other) for other in self.locks.mutual_waits(tx_id))
        for key in keys:  # per key: a key already its own is GRANTED, the others WAITING behind their blockers
            blockers = self.locks.blockers_on(tx_id, key)
            t.lock_requests.append(
                lock_event(t.state, key, "WAITING" if blockers else "GRANTED", blockers, now, EXCLUSIVE)
            )
        return t

    def _decide(self, state: TxState, event: Event, now: int) -> Transition:
        if state["phase"] in _OWN_PHASES:
            row = (LockingPhase(state["phase"]), classify(state, event, now, self.locks))
            return dispatch(TABLE, row, state, event, now, self)
        if isinstance(event, LocksGranted):  # a duplicate wake-up, or a restored holder granted late
            return Transition(state)
        t = self.inner.decide(state, event, now)
        if t.state is not state and self.inner.is_terminal(t.state["phase"]):
            self.release(t, now)
        return t

    def release(self, t: Transition, now: int) -> None:
        """The transaction of `t` ended: its locks go, and whoever they let go on is woken."""
        tx_id = t.state["intent"]["tx_id"]
        if tx_id not in self.locks:
            return
        keys = self.locks.keys_of(tx_id)
        for key in keys:  # in the mode it held (an interactive transaction's read locks are SHARED)
            mode = self.locks.mode_of(tx_id, key) or EXCLUSIVE
            t.lock_requests.append(lock_event(t.state, key, "RELEASED", [], now, mode))
        t.wake.extend(self.locks.release(tx_id))
        self.waits.reannounce(t, keys, now)

    def _restorable(self, states: Iterable[TxState]) -> list[TxState]:
        """Its sagas in flight (waiting in `locking` or running) that take locks, in arrival order
        (started_at_ms, then tx id); a subclass's own phases (interactive `open`) are its to restore."""
        ours = [
            s
            for s in states
            if s.get("protocol") == self.name
            and (s["phase"] == _L or self.inner.is_in_flight(s["phase"]))
            and takes_locks(s["intent"])
        ]
        return sorted(ours, key=lambda s: (s["started_at_ms"], s["intent"]["tx_id"]))

    def restore_holders(self, states: Iterable[TxState]) -> None:
        """Take back the locks of the sagas that were running (they held their write keys)."""
        for state in self._restorable(states):
            if state["phase"] != _L:
                self.locks.request(state["intent"]["tx_id"], write_keys(state["intent"]), EXCLUSIVE)

    def restore_waiters(self, states: Iterable[TxState]) -> list[str]:
        """Queue again, in arrival order, the sagas that waited for their locks; returns those that hold
        them all now, to be woken."""
        waiting = [s for s in self._restorable(states) if s["phase"] == _L]
        for state in waiting:
            self.locks.request(state["intent"]["tx_id"], write_keys(state["intent"]), EXCLUSIVE, state["due_at_ms"])
        return [s["intent"]["tx_id"] for s in waiting if self.locks.holds_all(s["intent"]["tx_id"])]

    def restored(self, states: Iterable[TxState]) -> list[str]:
        """`restore_locks` with this protocol alone on the table (the driver restores them all together)."""
        return restore_locks([self], states)

    def forgotten(self, tx_ids: Iterable[str]) -> list[str]:
        """Drop the locks of transactions this member no longer owns; returns the waiters now granted."""
        woken: list[str] = []
        for tx_id in tx_ids:
            if tx_id in self.locks:
                woken.extend(self.locks.release(tx_id))
        return woken


def waiting_state(started: TxState, deadline: int, now: int) -> TxState:
    """The state of a transaction queued for its locks: the inner protocol's first state with nothing
    sent (its commands are dropped and sent only once the locks are granted, by a fresh start)."""
    state = copy_state(started, now)
    state["phase"], state["waiting"], state["due_at_ms"] = LockingPhase.LOCKING, False, deadline
    for step in state["steps"]:
        step["attempts"] = step["compensation_attempts"] = 0
    return state
