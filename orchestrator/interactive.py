"""Interactive transactions: locks taken on demand before the intent exists, and deadlock victims aborted.
Pure: no I/O, `now` is passed in.

`Interactive` is the saga's lock wrapper (`Locking`) with these phases added, on its one lock table, so
interactive transactions and sagas exclude one another on the same keys. A client's first `LockRequest` opens a
transaction in the phase `open` (a state with no steps, its intent made from the request): each request
asks its keys in one mode, answered by a `LockReply` GRANTED at once or, after a FIFO wait in `open,
waiting`, when the holders release. The intent, when it comes, goes to the lock wrapper's `start` with the
locks already held: it asks only what is still missing (the write keys of steps not locked yet) and the
saga starts at once when it holds them all. A STRONG intent is handed to two-phase commit instead (same
lock table; every write must be locked already): its state names the twopc protocol from then on. A
release, an idle or lock-wait timeout, or a deadlock verdict ends an open transaction with nothing run
(result ABORTED): its locks go and the transactions they let go on are woken; a request that was waiting
gets a LockReply REFUSED with the error.

A verdict acts only on a victim that still waits in this table for a member of the verdict's cycle; any
other verdict (a duplicate, a victim granted or ended since, one this member does not own) changes
nothing, so verdicts may arrive any number of times (the detector delivers at least once). A saga waiting
in the lock wrapper's `locking` phase (an interactive transaction that sent its intent, or any saga whose
keys an open transaction holds) is a victim like an open one.

Restore: an open state's snapshot carries what it holds and what it waits for (see `OpenLocks`, kept in
`before_images[0]`: an open state has no steps, so the field is free and SagaSnapshot keeps its schema).
Once the saga runs, it holds its write keys only: the locks it took only to read go when it starts (its
growing phase is over: strict two-phase locking keeps the write locks to the end, and it is serializable),
so its snapshot is the lock wrapper's and a restore takes back exactly what it held.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from orchestrator import operator
from orchestrator.interactive_model import (
    InteractiveEvent,
    LockRequested,
    OpenEvent,
    OpenLocks,
    OpenPhase,
    VictimChosen,
    open_intent,
    open_lock_event,
    reply,
    victim_error,
    waits_in_cycle,
)
from orchestrator.locking import Locking, LockingPhase, lock_event
from orchestrator.locks import EXCLUSIVE, LockMode
from orchestrator.protocol import (
    Handler,
    IntentReceived,
    LocksGranted,
    OperatorReceived,
    OutcomeReceived,
    TimerDue,
    Transition,
    TxState,
    dispatch,
    unchanged,
)
from orchestrator.saga_model import copy_state, initial_state, result_of
from orchestrator.twopc import TwoPhaseCommit
from orchestrator.twopc_model import write_keys as twopc_write_keys
from polycommit.errors import (
    LockTimeoutError,
    ProtocolError,
    TransactionAbortedError,
    UnsupportedError,
)
from polycommit.events import (
    ErrorInfo,
    LockRequest,
    TransactionIntent,
    error_info,
)

_OWN: frozenset[str] = frozenset(OpenPhase)
_TERMINAL = frozenset({OpenPhase.RELEASED, OpenPhase.VICTIM})


@dataclass
class Interactive(Locking):
    """The saga protocol as the driver sees it: the lock wrapper (sagas under locks) plus the open phases.
    `strong`: the member's two-phase commit, on the same lock table, to which an open transaction's STRONG
    intent is handed (`_commit_strong`); without it a STRONG intent is refused."""

    strong: TwoPhaseCommit | None = None

    def wait_ms(self, state: TxState) -> int:
        return state["intent"].get("lock_wait_ms") or self.lock_wait_ms

    # -- the driver's entry points ------------------------------------------------------------------

    def open(self, request: LockRequest, now: int, refusal: ErrorInfo | None = None) -> Transition:
        """The first LockRequest of a transaction this member does not know."""
        return self.noted(self._open(request, now, refusal))

    def _open(self, request: LockRequest, now: int, refusal: ErrorInfo | None = None) -> Transition:
        state = initial_state(open_intent(request), now)
        state["phase"] = OpenPhase.OPEN
        OpenLocks().into(state)
        rejected = refusal  # the driver's verdict on the record itself (its key, reply address, age)
        if refusal is None and (request["release"] or request["request"] != 1):
            # Not a beginning: the transaction ended (idle, victim, released) and its state with it.
            why = "no such open transaction: it ended (idle, deadlock victim or released); nothing of it ran"
            refusal = error_info(TransactionAbortedError.__name__, why, True)
        if refusal is not None:
            t = self.end(state, now, OpenPhase.RELEASED, refusal)
            t.lock_replies.append(reply(state, request["request"], now, refusal))
            t.rejections.extend([rejected] if rejected is not None else [])  # the record becomes a dead letter
            return t
        return _ask(state, LockRequested(request), now, self)

    def decide(self, state: TxState, event: InteractiveEvent, now: int) -> Transition:
        return self.noted(self._decide_open(state, event, now))

    def _decide_open(self, state: TxState, event: InteractiveEvent, now: int) -> Transition:
        if state["phase"] in _OWN:
            row = (OpenPhase(state["phase"]), self.classify(state, event, now))
            return dispatch(TABLE, row, state, event, now, self)
        if isinstance(event, VictimChosen):
            return self._saga_victim(state, event, now)
        if isinstance(event, LockRequested):  # its intent came already: the client sends none after it
            return Transition(state)
        t = super()._decide(state, event, now)  # noted once, by decide
        if state["phase"] == LockingPhase.LOCKING and t.state["phase"] != LockingPhase.LOCKING:
            self.release_reads(t, now)  # its write keys came: the saga starts
        return t

    def classify(self, state: TxState, event: InteractiveEvent, now: int) -> OpenEvent:
        tx_id = state["intent"]["tx_id"]
        if isinstance(event, LockRequested):
            if event.request["release"]:
                return OpenEvent.RELEASE
            if event.request["request"] <= OpenLocks.of(state).last:
                return OpenEvent.ASKED_AGAIN
            return OpenEvent.ASKED_WHILE_WAITING if state["phase"] == OpenPhase.WAITING else OpenEvent.ASKED
        if isinstance(event, VictimChosen):
            return OpenEvent.VICTIM if waits_in_cycle(self.locks, tx_id, event.verdict) else OpenEvent.STALE_VERDICT
        if isinstance(event, IntentReceived):
            if event.intent["tx_id"] != tx_id:
                raise ProtocolError(f"{tx_id}: received the intent of {event.intent['tx_id']}")
            return OpenEvent.INTENT
        if isinstance(event, OutcomeReceived):
            return OpenEvent.STALE_OUTCOME
        if isinstance(event, OperatorReceived):
            return OpenEvent.OPERATOR
        if state["phase"] == OpenPhase.WAITING and self.locks.holds_all(tx_id):
            return OpenEvent.GRANTED
        if isinstance(event, TimerDue) and state["due_at_ms"] and now >= state["due_at_ms"]:
            return OpenEvent.TIMED_OUT
        return OpenEvent.STILL_WAITING if isinstance(event, LocksGranted) else OpenEvent.TIMER_EARLY

    # -- ending -------------------------------------------------------------------------------------

    def end(self, state: TxState, now: int, phase: OpenPhase, error: ErrorInfo | None) -> Transition:
        """Nothing ran: the result is ABORTED, the locks go, whoever waited for them is woken."""
        new = copy_state(state, now)
        new["phase"], new["due_at_ms"], new["error"] = phase, 0, error
        t = Transition(new, result=result_of(new, "ABORTED", now))
        waiting = OpenLocks.of(state).waiting_request if self.is_open(state["phase"]) else 0
        if waiting:
            refused = error or error_info(TransactionAbortedError.__name__, "released while it waited", True)
            t.lock_replies.append(reply(new, waiting, now, refused))
        self.release(t, now)
        return t

    def _saga_victim(self, state: TxState, event: VictimChosen, now: int) -> Transition:
        """A saga waiting for its write keys (after its intent) is a victim like an open transaction."""
        tx_id = state["intent"]["tx_id"]
        if state["phase"] != LockingPhase.LOCKING or not waits_in_cycle(self.locks, tx_id, event.verdict):
            return Transition(state)
        return self.end(state, now, OpenPhase.VICTIM, victim_error(event.verdict))

    # -- the rest of the protocol's questions ---------------------------------------------------------

    def release_reads(self, t: Transition, now: int) -> None:
        """The saga of `t` starts: it holds every lock it will ever take (its intent came, its write keys are
        EXCLUSIVE), so the keys it holds only SHARED go now. Two-phase locking's growing phase ends here,
        which keeps it serializable, and strict: the write locks stay until the saga ends. A read lock held
        through the saga's steps would only keep writers of what it read waiting."""
        if self.is_terminal(t.state["phase"]):
            return
        tx_id, locks = t.state["intent"]["tx_id"], self.locks
        reads = [
            k for k in locks.keys_of(tx_id) if locks.holds(tx_id, k) and locks.mode_of(tx_id, k) == LockMode.SHARED
        ]
        if not reads:
            return
        t.lock_requests.extend(lock_event(t.state, key, "RELEASED", [], now, LockMode.SHARED) for key in reads)
        t.wake.extend(locks.release_keys(tx_id, reads))
        self.waits.reannounce(t, reads, now)

    def is_open(self, phase: str) -> bool:
        """Before its intent: holding locks taken on demand, maybe waiting for more."""
        return phase in (OpenPhase.OPEN, OpenPhase.WAITING)

    def is_terminal(self, phase: str) -> bool:
        return phase in _TERMINAL or super().is_terminal(phase)

    def is_in_flight(self, phase: str) -> bool:
        return phase in (OpenPhase.OPEN, OpenPhase.WAITING) or super().is_in_flight(phase)

    def is_stuck(self, phase: str) -> bool:
        return phase not in _OWN and super().is_stuck(phase)

    def _opened(self, states: Iterable[TxState]) -> list[TxState]:
        opened = [s for s in states if s.get("protocol") == self.name and s["phase"] in (_O, _W)]
        return sorted(opened, key=lambda s: (s["started_at_ms"], s["intent"]["tx_id"]))

    def restore_holders(self, states: Iterable[TxState]) -> None:
        """The locks open transactions held (in the mode each was held), and the running sagas'."""
        states = list(states)
        for state in self._opened(states):
            held = OpenLocks.of(state).held
            for mode in (LockMode.SHARED, EXCLUSIVE):
                self.locks.request(state["intent"]["tx_id"], [k for k, m in held.items() if m == mode], mode)
        super().restore_holders(states)

    def restore_waiters(self, states: Iterable[TxState]) -> list[str]:
        """The sagas' waits, then the open transactions' (the request each was waiting on)."""
        states = list(states)
        woken = super().restore_waiters(states)
        for state in self._opened(states):
            info, tx_id = OpenLocks.of(state), state["intent"]["tx_id"]
            if info.waiting_request:
                self.locks.request(tx_id, info.waiting_keys, LockMode(info.waiting_mode), state["due_at_ms"])
                self.locks.request(tx_id, info.waiting_shared, LockMode.SHARED, state["due_at_ms"])
                if self.locks.holds_all(tx_id):
                    woken.append(tx_id)
        return woken


# -- the transitions of the open phases (the policy argument of a row is the Interactive protocol) ----


def _ask(state: TxState, event: LockRequested, now: int, p: Interactive) -> Transition:
    """Ask the request's keys: granted now (reply GRANTED) or queued behind their holders (reply later)."""
    request, tx_id = event.request, state["intent"]["tx_id"]
    keys, mode = sorted(set(request["keys"])), LockMode(request["mode"])
    shared = sorted(set(request.get("shared_keys") or ()) - set(keys))  # a v1 request has none
    new, info = copy_state(state, now), OpenLocks.of(state)
    info.last = request["request"]
    deadline = now + p.wait_ms(state)
    t = Transition(new)
    # Both modes' keys queue before any other request is served: one arrival, so a transaction that held
    # nothing before asks its commit-time locks (writes EXCLUSIVE, reads SHARED) without risk of a cycle.
    p.locks.request(tx_id, keys, mode, deadline)
    if p.locks.request(tx_id, shared, LockMode.SHARED, deadline):
        info.held.update({k: str(p.locks.mode_of(tx_id, k)) for k in (*keys, *shared)})
        new["phase"], new["due_at_ms"] = OpenPhase.OPEN, now + p.wait_ms(state)  # the idle deadline
        t.lock_replies.append(reply(new, request["request"], now))
    else:
        info.wait(request["request"], keys, mode, shared)
        new["phase"], new["due_at_ms"] = OpenPhase.WAITING, deadline
        t.cycles.extend((tx_id, other) for other in p.locks.mutual_waits(tx_id))
    info.into(new)
    for key, key_mode in [*((k, mode) for k in keys), *((k, LockMode.SHARED) for k in shared)]:
        blockers = p.locks.blockers_on(tx_id, key)
        action = "WAITING" if blockers else "GRANTED"
        t.lock_requests.append(open_lock_event(new, key, action, blockers, now, key_mode, len(info.held)))
    return t


def _granted(state: TxState, event: InteractiveEvent, now: int, p: Interactive) -> Transition:
    tx_id, new, info = state["intent"]["tx_id"], copy_state(state, now), OpenLocks.of(state)
    keys, request = [*info.waiting_keys, *info.waiting_shared], info.waiting_request
    info.granted({k: str(p.locks.mode_of(tx_id, k)) for k in keys})
    info.into(new)
    new["phase"], new["due_at_ms"] = OpenPhase.OPEN, now + p.wait_ms(state)
    t = Transition(new, lock_replies=[reply(new, request, now)])
    for key in keys:
        mode = p.locks.mode_of(tx_id, key) or EXCLUSIVE
        t.lock_requests.append(open_lock_event(new, key, "GRANTED", [], now, mode, len(info.held)))
    return t


def _refuse_request(state: TxState, event: LockRequested, now: int, p: Interactive) -> Transition:
    """One request at a time (the SDK sends them so): a second one while the first waits is refused alone."""
    why = f"request {event.request['request']} came while request {OpenLocks.of(state).last} still waits"
    refused = error_info(UnsupportedError.__name__, why, False)
    return Transition(state, lock_replies=[reply(state, event.request["request"], now, refused)])


def _release(state: TxState, event: InteractiveEvent, now: int, p: Interactive) -> Transition:
    return p.end(state, now, OpenPhase.RELEASED, None)


def _timed_out(state: TxState, event: InteractiveEvent, now: int, p: Interactive) -> Transition:
    tx_id = state["intent"]["tx_id"]
    if state["phase"] == OpenPhase.WAITING:
        held_by = ", ".join(p.locks.blockers(tx_id)) or "nobody"
        message = f"locks not granted within {p.wait_ms(state)} ms (held by {held_by}); nothing ran"
        return p.end(state, now, OpenPhase.RELEASED, error_info(LockTimeoutError.__name__, message, True))
    message = f"open for {p.wait_ms(state)} ms with no request and no intent: aborted, nothing ran"
    return p.end(state, now, OpenPhase.RELEASED, error_info(TransactionAbortedError.__name__, message, True))


def _victim(state: TxState, event: VictimChosen, now: int, p: Interactive) -> Transition:
    return p.end(state, now, OpenPhase.VICTIM, victim_error(event.verdict))


def _commit(state: TxState, event: IntentReceived, now: int, p: Interactive) -> Transition:
    """The intent: its saga starts under the locks held, asking only the write keys still missing (a
    STRONG intent goes to two-phase commit instead, `_commit_strong`)."""
    intent = event.intent
    refusal = None
    if intent["consistency"] == "STRONG" and p.strong is not None:
        refusal = _unlocked_writes(state, intent, p)
        if refusal is None:
            return _commit_strong(state, intent, now, p, p.strong)
    elif intent["consistency"] != "EVENTUAL":
        why = f"consistency {intent['consistency']} is not run for an interactive transaction"
        refusal = error_info(UnsupportedError.__name__, why, False)
    t = Locking.start(p, intent, now, refusal)
    t.state["started_at_ms"] = state["started_at_ms"]  # its age counts from its first lock (victim score)
    for lock in t.lock_requests:
        lock["started_at_ms"] = state["started_at_ms"]
    if Locking.is_terminal(p, t.state["phase"]):
        p.release(t, now)  # refused, or no steps: nothing runs, the open locks go
    elif t.state["phase"] != LockingPhase.LOCKING:
        p.release_reads(t, now)  # every write key held already: the saga starts
    return t


def _unlocked_writes(state: TxState, intent: TransactionIntent, p: Interactive) -> ErrorInfo | None:
    """A STRONG intent must find every key it writes locked EXCLUSIVE already (the SDK locks each write
    as it adds it): its reads' locks go as its two-phase commit starts, which is serializable only if no
    lock is taken after that; a key still to wait for would keep them past a restore, which does not
    know them."""
    tx_id = state["intent"]["tx_id"]
    missing = [
        k for k in twopc_write_keys(intent) if p.locks.mode_of(tx_id, k) != EXCLUSIVE or not p.locks.holds(tx_id, k)
    ]
    if not missing:
        return None
    why = f"an interactive STRONG transaction locks every write before its intent; not locked: {', '.join(missing[:3])}"
    return error_info(UnsupportedError.__name__, why, False)


def _commit_strong(
    state: TxState, intent: TransactionIntent, now: int, p: Interactive, strong: TwoPhaseCommit
) -> Transition:
    """Two-phase commit takes the transaction over, its write locks held (asking again for them changes
    nothing), so it prepares at once; the keys it only read go now, like a saga's when it starts. Its
    state names the twopc protocol from here on, so the driver hands it every later event."""
    t = strong.start(intent, now)
    t.state["started_at_ms"] = state["started_at_ms"]  # its age counts from its first lock (victim score)
    for lock in t.lock_requests:
        lock["started_at_ms"] = state["started_at_ms"]
    if strong.is_terminal(t.state["phase"]):
        p.release(t, now)  # invalid: nothing runs, the open locks go
    else:
        p.release_reads(t, now)
    return t


def _operator_refused(state: TxState, event: OperatorReceived, now: int, p: Interactive) -> Transition:
    return operator.refused(state, event.command, "it is open: no intent yet, nothing ran", now)


_O, _W = OpenPhase.OPEN, OpenPhase.WAITING
_BOTH: dict[OpenEvent, Handler] = {
    OpenEvent.ASKED_AGAIN: unchanged,
    OpenEvent.RELEASE: _release,
    OpenEvent.INTENT: _commit,
    OpenEvent.TIMER_EARLY: unchanged,
    OpenEvent.TIMED_OUT: _timed_out,
    OpenEvent.STALE_VERDICT: unchanged,
    OpenEvent.STALE_OUTCOME: unchanged,
    OpenEvent.OPERATOR: _operator_refused,
}
TABLE: dict[tuple[StrEnum, StrEnum], Handler] = {
    **{(_O, kind): handler for kind, handler in _BOTH.items()},
    **{(_W, kind): handler for kind, handler in _BOTH.items()},
    (_O, OpenEvent.ASKED): _ask,
    (_O, OpenEvent.STILL_WAITING): unchanged,  # a duplicate wake-up
    (_W, OpenEvent.ASKED_WHILE_WAITING): _refuse_request,
    (_W, OpenEvent.GRANTED): _granted,
    (_W, OpenEvent.STILL_WAITING): unchanged,
    (_W, OpenEvent.VICTIM): _victim,
    (_O, OpenEvent.VICTIM): _victim,  # never: an open transaction holding all it asked waits for nobody
    **{(phase, kind): unchanged for phase in _TERMINAL for kind in OpenEvent},
}
