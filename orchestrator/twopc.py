"""Two-phase commit (consistency=STRONG) as a pure state machine: a table of (phase, event kind) -> transition.

A transaction first takes exclusive locks on its write keys (`orchestrator.locks`, one table per
coordinator member, shared with the sagas), waiting FIFO up to the lock-wait timeout. Then
PREPARE goes to every step at once. All votes yes -> decision COMMIT; any no, or the prepare window
passing -> decision ABORT (presumed abort). The Decision record is published in the same Kafka
transaction as the phase-2 commands; since consumers read committed records only, no participant ever
sees a phase-2 command whose decision is not durable: that Kafka transaction's commit IS the commit
point. Phase 2 goes to every step (ABORT too, to fence a late PREPARE); a failed phase-2 command is
retried with backoff forever and reported as a heuristic hazard after `hazard_after` failures. The
result (COMMITTED / ABORTED) comes once every step acknowledged phase 2; then the locks are released
and the transactions they let go on are named in `Transition.wake`.

No awaits, no clock: `now` is passed in. The lock table (and the admission queue) is the only state
outside the snapshot, and `restore_holders` / `restore_waiters` rebuild it from snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from orchestrator import operator
from orchestrator import twopc_model as m
from orchestrator import twopc_transitions as tr
from orchestrator.interactive_model import VictimChosen, victim_error, waits_in_cycle
from orchestrator.lock_waits import AnnouncedWaits
from orchestrator.locks import EXCLUSIVE, Admission, LockTable
from orchestrator.protocol import (
    Event,
    Handler,
    LocksGranted,
    OperatorReceived,
    TimerDue,
    Transition,
    dispatch,
    restore_locks,
    unchanged,
)
from orchestrator.saga_model import SagaPolicy, problem_step, validate
from orchestrator.twopc_events import TwoPCEvent as TwoPCEvent
from orchestrator.twopc_events import classify as classify
from orchestrator.twopc_model import TwoPCPhase, TwoPCPolicy, phase_of, write_keys
from polycommit.errors import PolycommitError, ProtocolError
from polycommit.events import (
    ErrorInfo,
    OperatorCommand,
    SagaSnapshot,
    TransactionIntent,
)

# -- the table ----------------------------------------------------------------------------------------

_L, _P = TwoPCPhase.LOCKING, TwoPCPhase.PREPARING
_OUTCOMES = (TwoPCEvent.VOTE_YES, TwoPCEvent.VOTE_NO, TwoPCEvent.STALE_VOTE, TwoPCEvent.ACKED)
_PHASE2_ROWS: dict[TwoPCEvent, Handler] = {
    TwoPCEvent.INTENT_AGAIN: unchanged,
    TwoPCEvent.LOCKS_GRANTED: unchanged,  # a duplicate wake-up: its prepares went out long ago
    TwoPCEvent.VOTE_YES: unchanged,  # cannot happen (decided steps are never pending), kept explicit
    TwoPCEvent.VOTE_NO: unchanged,
    TwoPCEvent.STALE_VOTE: unchanged,  # a vote arriving after the decision
    TwoPCEvent.ACKED: tr.acked,
    TwoPCEvent.PHASE2_FAILED: tr.phase2_failed,
    TwoPCEvent.STALE_ACK: unchanged,
    TwoPCEvent.TIMER_DUE: tr.phase2_due,
    TwoPCEvent.TIMER_EARLY: unchanged,
    TwoPCEvent.ADMISSION_WAIT: unchanged,  # only classified in LOCKING
    TwoPCEvent.RESEND_DUE: unchanged,  # only classified in PREPARING
}
TABLE: dict[tuple[StrEnum, StrEnum], Handler] = {
    (_L, TwoPCEvent.INTENT_AGAIN): unchanged,
    (_L, TwoPCEvent.LOCKS_GRANTED): tr.locks_granted,
    (_L, TwoPCEvent.TIMER_DUE): tr.lock_wait_over,
    (_L, TwoPCEvent.TIMER_EARLY): unchanged,  # also a wake-up while some lock is still held by another
    (_L, TwoPCEvent.ADMISSION_WAIT): tr.admission_wait,
    (_L, TwoPCEvent.RESEND_DUE): unchanged,  # only classified in PREPARING
    # Nothing was sent while locking: outcomes are from an earlier run of the same transaction id.
    **{(_L, kind): unchanged for kind in (*_OUTCOMES, TwoPCEvent.PHASE2_FAILED, TwoPCEvent.STALE_ACK)},
    (_P, TwoPCEvent.INTENT_AGAIN): unchanged,
    (_P, TwoPCEvent.LOCKS_GRANTED): unchanged,
    (_P, TwoPCEvent.VOTE_YES): tr.vote_yes,
    (_P, TwoPCEvent.VOTE_NO): tr.vote_no,
    (_P, TwoPCEvent.STALE_VOTE): unchanged,  # a duplicate vote
    (_P, TwoPCEvent.TIMER_DUE): tr.window_over,  # presumed abort
    (_P, TwoPCEvent.RESEND_DUE): tr.resend_prepares,  # a retriable no's backoff is over
    (_P, TwoPCEvent.TIMER_EARLY): unchanged,
    (_P, TwoPCEvent.STALE_ACK): unchanged,  # from an earlier run of the same transaction id
    (_P, TwoPCEvent.ADMISSION_WAIT): unchanged,  # only classified in LOCKING
    **{(TwoPCPhase(p), kind): h for p in (m.COMMIT_SIDE | m.ABORT_SIDE) for kind, h in _PHASE2_ROWS.items()},
    **{(phase, kind): unchanged for phase in map(TwoPCPhase, m.TERMINAL) for kind in TwoPCEvent},
}


@dataclass
class TwoPhaseCommit:
    """Two-phase commit as the driver sees it (registered under "twopc"), on its member's lock table."""

    saga_policy: SagaPolicy = field(default_factory=SagaPolicy)
    name: str = m.PROTOCOL
    waits: AnnouncedWaits = field(default_factory=AnnouncedWaits)  # the member's table, shared by every protocol
    policy: TwoPCPolicy = field(init=False)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.policy = TwoPCPolicy.from_saga(self.saga_policy)
        self.admission = Admission(self.policy.max_active)

    @property
    def locks(self) -> LockTable:
        return self.waits.locks

    def start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        return self.waits.noted(self._start(intent, now, refusal))

    def _start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        state = m.initial_state(intent, now)
        t = Transition(state)
        problem = refusal or validate(intent, self.saga_policy)
        if problem is not None:
            state["error"] = problem
            if 0 <= problem_step(problem) < len(state["steps"]):
                state["steps"][problem_step(problem)]["error"] = problem
            t.rejections.append(problem)
            return tr.finish(t, TwoPCPhase.FAILED, "FAILED", now)
        return self._lock(t, now)

    def _lock(self, t: Transition, now: int) -> Transition:
        state, tx_id = t.state, t.state["intent"]["tx_id"]
        try:
            keys = write_keys(state["intent"])
        except PolycommitError as exc:  # validated above; kept for a defensive typed refusal
            raise ProtocolError(f"{tx_id}: {exc}") from exc
        deadline = now + self.policy.lock_wait_ms
        granted = self.locks.request(tx_id, keys, EXCLUSIVE, deadline)
        t.cycles.extend((tx_id, other) for other in self.locks.mutual_waits(tx_id))  # see Transition.cycles
        for key in keys:
            held = self.locks.holds(tx_id, key)
            action: m.LockAction = "GRANTED" if held else "WAITING"
            t.lock_requests.append(m.lock_event(state, key, action, self.locks.blockers_on(tx_id, key), now))
        if granted and self.admission.admit(tx_id):
            return tr.send_prepares(t, now, self.policy)
        state["due_at_ms"] = deadline
        return t

    def decide(self, state: SagaSnapshot, event: Event | VictimChosen, now: int) -> Transition:
        return self.waits.noted(self._decide(state, event, now))

    def _decide(self, state: SagaSnapshot, event: Event | VictimChosen, now: int) -> Transition:
        if isinstance(event, OperatorReceived):
            return self._operator(state, event.command, now)
        if isinstance(event, VictimChosen):
            return self._victim(state, event, now)
        tx_id = state["intent"]["tx_id"]
        if isinstance(event, LocksGranted) and phase_of(state) == TwoPCPhase.LOCKING and self.locks.holds_all(tx_id):
            self.admission.admit(tx_id)  # its locks came (maybe from another protocol's release): a place next
        row = (phase_of(state), classify(state, event, now, self.locks, self.admission.active))
        t = dispatch(TABLE, row, state, event, now, self.policy)
        if row == (TwoPCPhase.LOCKING, TwoPCEvent.LOCKS_GRANTED):  # for the detector: waits that ended
            keys = self.locks.keys_of(state["intent"]["tx_id"])
            t.lock_requests.extend(m.lock_event(t.state, key, "GRANTED", [], now) for key in keys)
        if t.state is not state and t.state["phase"] in m.TERMINAL:
            self._release(t, now)
        return t

    def _victim(self, state: SagaSnapshot, event: VictimChosen, now: int) -> Transition:
        """A deadlock victim (the shared lock table lets it wait in a cycle with interactive transactions
        or sagas): only while it still waits there, with nothing prepared; it aborts like a lock-wait
        timeout and its locks go. Any other verdict (stale, duplicate) changes nothing."""
        tx_id = state["intent"]["tx_id"]
        if phase_of(state) != TwoPCPhase.LOCKING or not waits_in_cycle(self.locks, tx_id, event.verdict):
            return Transition(state)
        error = victim_error(event.verdict)
        t = tr.abort_unprepared(state, error, now)
        self._release(t, now)
        return t

    def _operator(self, state: SagaSnapshot, command: OperatorCommand, now: int) -> Transition:
        """`tx retry` of a decided transaction sends phase 2 again now (idempotent in every store), the
        lever for a hazard once its cause is fixed; anything else is refused with the reason, never a crash.
        A step cannot be "resolved by hand" here: the decision must reach every store, not be waived."""
        phase = phase_of(state)
        if command["action"] != "RETRY":
            return operator.refused(state, command, "two-phase commit retries phase 2; it resolves no step", now)
        if phase not in m.COMMIT_SIDE | m.ABORT_SIDE:
            return operator.refused(state, command, f"nothing to retry while {phase.value}", now)
        t = tr.phase2_due(state, TimerDue(), now, self.policy)
        t.alerts.append(operator.audit(command, now))
        return t

    def _release(self, t: Transition, now: int) -> None:
        tx_id = t.state["intent"]["tx_id"]
        keys = self.locks.keys_of(tx_id)
        for key in keys:
            t.lock_requests.append(m.lock_event(t.state, key, "RELEASED", [], now))
        t.wake.extend(self._go_on(self.locks.release(tx_id), [tx_id]))
        self.waits.reannounce(t, keys, now)

    def _go_on(self, granted: Iterable[str], gone: Iterable[str]) -> list[str]:
        """Who may go on now: those just granted their locks (of any protocol on the shared table; a
        two-phase commit among them is admitted, or queued for a place, when its wake-up comes), and those
        admitted in the places of the transactions `gone`."""
        woken = list(granted)
        for tx in gone:
            woken.extend(t for t in self.admission.leave(tx) if t not in woken)
        return woken

    def _restorable(self, states: Iterable[SagaSnapshot]) -> list[SagaSnapshot]:
        ours = [s for s in states if s.get("protocol") == m.PROTOCOL and s["phase"] in m.IN_FLIGHT]
        return sorted(ours, key=lambda s: (s["started_at_ms"], s["intent"]["tx_id"]))

    def restore_holders(self, states: Iterable[SagaSnapshot]) -> None:
        """Past their locks (preparing or in phase 2): they held their keys and a place (`Admission`)."""
        for state in self._restorable(states):
            if state["phase"] != TwoPCPhase.LOCKING:
                self.locks.request(state["intent"]["tx_id"], write_keys(state["intent"]), EXCLUSIVE)
                if state["phase"] in m.HOLDS_LOCKS:
                    self.admission.active.add(state["intent"]["tx_id"])

    def restore_waiters(self, states: Iterable[SagaSnapshot]) -> list[str]:
        """Queued again in arrival order; returns those holding their locks now, to be woken (they are
        admitted, or queued for a place, when the wake-up comes)."""
        waiting = [s for s in self._restorable(states) if s["phase"] == TwoPCPhase.LOCKING]
        for state in waiting:
            self.locks.request(state["intent"]["tx_id"], write_keys(state["intent"]), EXCLUSIVE)
        return [s["intent"]["tx_id"] for s in waiting if self.locks.holds_all(s["intent"]["tx_id"])]

    def restored(self, states: Iterable[SagaSnapshot]) -> list[str]:
        """`restore_locks` with this protocol alone on the table (the driver restores them all together)."""
        return restore_locks([self], states)

    def forgotten(self, tx_ids: Iterable[str]) -> list[str]:
        """Drop the locks of transactions this member no longer owns; returns waiters now granted."""
        woken: list[str] = []
        for tx_id in tx_ids:
            woken.extend(self._go_on(self.locks.release(tx_id), [tx_id]))
        return woken

    def is_terminal(self, phase: str) -> bool:
        return phase in m.TERMINAL

    def is_in_flight(self, phase: str) -> bool:
        return phase in m.IN_FLIGHT

    def is_stuck(self, phase: str) -> bool:
        return phase in m.HAZARD
