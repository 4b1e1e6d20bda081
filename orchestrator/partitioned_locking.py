"""Sagas under the lock manager partitioned by resource key (step 3 of docs/lock-partitioning.md). Pure: no
I/O, `now` is passed in.

`PartitionedLocking(inner)` is `orchestrator.locking.Locking` with the member's lock table replaced by the
partitions of `orchestrator/lock_manager.py`: a saga holds EXCLUSIVE locks on every key its steps and
compensations write (`write_keys`) from before its first command until it ends, as before, but it asks
for them by messages (`Transition.partition_messages`) and learns of them by `PartitionGranted` events.

- **Ordered acquisition** (`Acquisition`): the saga asks the partitions its keys fall in one at a time,
  in partition order, the next once the last granted; keys known up front never deadlock, across
  partitions too (the argument is in orchestrator/lock_partitions.py). It waits in the phase `locking`,
  nothing sent to any store; the snapshot's `current` counts the partitions granted so far, so a restored
  coordinator knows where it stands and the partitions keep the rest. Once the last partition grants, the
  inner protocol starts with the intent as it arrived. Even a saga alone on its keys waits one round trip
  per partition before it starts: the price of a lock manager that is not in the coordinator's memory.
- **Release.** When the inner state ends (or the wait times out: `lock wait timed out`, a LockTimeoutError,
  nothing ran), a release goes to every partition asked, in the same Kafka transaction as the result.
- **Crashes.** The coordinator publishes its requests in its loop's Kafka transaction with the snapshot
  that counts them, and reads the grants as inputs whose positions commit with the snapshots they changed:
  it asks exactly once. The lock manager answers at least once (a repeat after its crash is the same
  answer): an answer from a partition the saga no longer waits in, or a WAITING, changes nothing here.
- **For the checker and the detector**, its GRANTED (when it starts) and RELEASED lock events go to `locks`
  as before; there are no WAITING events: sagas asking in partition order never wait in a cycle.

Only sagas ask this way today: interactive transactions and two-phase commits need the questions the
member's table answers at once (`holds_all`, `blockers_on`, `mutual_waits`, reads released early), so a
coordinator running the partitioned lock manager refuses them (`Refusing`, an UnsupportedError), rather
than run them beside sagas under locks the sagas cannot see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator import operator
from orchestrator.lock_partitions import Acquisition, PartitionRelease, grant_of
from orchestrator.locking import (
    DEFAULT_LOCK_WAIT_MS,
    LockingPhase,
    LockingPhases,
    lock_event,
    takes_locks,
    waiting_state,
    write_keys,
)
from orchestrator.locks import EXCLUSIVE
from orchestrator.protocol import (
    Event,
    IntentReceived,
    LocksGranted,
    OperatorReceived,
    OutcomeReceived,
    PartitionGranted,
    TimerDue,
    TransactionProtocol,
    Transition,
    TxState,
)
from orchestrator.saga_model import copy_state, result_of
from polycommit.errors import LockTimeoutError, ProtocolError, UnsupportedError
from polycommit.events import ErrorInfo, LockPartitionGrant, TransactionIntent, error_info
from polycommit.partitioning import partition_of


@dataclass
class PartitionedLocking(LockingPhases):
    """`inner`, run under exclusive locks on its write keys, asked of the lock manager's partitions."""

    inner: TransactionProtocol
    lock_wait_ms: int = DEFAULT_LOCK_WAIT_MS  # an intent's own `lock_wait_ms` wins when it gives one
    # The partitions of lock-requests (the driver sets them from the broker before the first fold; a count
    # changed under transactions in flight would send their releases where their keys no longer live).
    partitions: Sequence[int] = (0,)

    @property
    def name(self) -> str:
        return self.inner.name

    def acquisition(self, state: TxState) -> Acquisition:
        """The saga's side of ordered acquisition, as far as its snapshot says it got."""
        intent = state["intent"]
        wanted = dict.fromkeys(write_keys(intent), EXCLUSIVE)
        # Running (or ended): every partition granted; its keys count at least as many as its partitions.
        granted = state["current"] if state["phase"] == LockingPhase.LOCKING else len(wanted)
        deadline = state["due_at_ms"] if state["phase"] == LockingPhase.LOCKING else None
        return Acquisition(intent["tx_id"], wanted, lambda k: partition_of(k, self.partitions), deadline, granted)

    def start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        first = self.inner.start(intent, now, refusal)
        if refusal is not None or not takes_locks(intent) or self.inner.is_terminal(first.state["phase"]):
            return first  # refused or invalid (nothing will run), done already, or opted out
        if not write_keys(intent):
            return first
        deadline = now + (intent.get("lock_wait_ms") or self.lock_wait_ms)
        state = waiting_state(first.state, deadline, now)
        state["current"] = 0  # partitions granted so far
        request = self.acquisition(state).request()
        assert request is not None  # it has keys
        return Transition(state, partition_messages=[request])

    def decide(self, state: TxState, event: Event, now: int) -> Transition:
        tx_id = state["intent"]["tx_id"]
        if isinstance(event, OperatorReceived) and state["phase"] == LockingPhase.LOCKING:
            return operator.refused(state, event.command, "it is waiting for its locks: nothing ran yet", now)
        if state["phase"] == LockingPhase.TIMED_OUT or isinstance(event, LocksGranted):
            return Transition(state)  # ended; or a wake-up of the member's table, which it never uses
        if state["phase"] != LockingPhase.LOCKING:
            if isinstance(event, PartitionGranted):
                return Transition(state)  # a repeat of an answer it went on from
            t = self.inner.decide(state, event, now)
            if t.state is not state and self.inner.is_terminal(t.state["phase"]):
                self._release(t, self.acquisition(state), now)
            return t
        if isinstance(event, IntentReceived | OutcomeReceived):
            if (event.intent if isinstance(event, IntentReceived) else event.outcome)["tx_id"] != tx_id:
                raise ProtocolError(f"{tx_id}: received an event of another transaction while locking")
            return Transition(state)  # its intent again, or an outcome of an earlier run: nothing was sent
        if isinstance(event, PartitionGranted):
            return self._granted(state, event, now)
        if isinstance(event, TimerDue) and now >= state["due_at_ms"]:
            return self._timed_out(state, now)
        return Transition(state)  # a timer early

    def _granted(self, state: TxState, event: PartitionGranted, now: int) -> Transition:
        acquisition = self.acquisition(state)
        before = acquisition.granted()
        following = acquisition.on_grant(event.grant)
        if acquisition.granted() == before:
            return Transition(state)  # waiting there (its blockers hold the keys), or a repeat
        if following is not None:
            new = copy_state(state, now)
            new["current"] = len(acquisition.granted())
            return Transition(new, partition_messages=[following])
        t = self.inner.start(state["intent"], now)  # every partition granted: it runs now
        t.state["started_at_ms"] = state["started_at_ms"]  # arrival order, and a duration that counts the wait
        keys = write_keys(state["intent"])
        t.lock_requests.extend(lock_event(t.state, key, "GRANTED", [], now, EXCLUSIVE) for key in keys)
        if self.inner.is_terminal(t.state["phase"]):
            self._release(t, acquisition, now)
        return t

    def _timed_out(self, state: TxState, now: int) -> Transition:
        new = copy_state(state, now)
        message = f"locks not granted within {now - state['started_at_ms']} ms; nothing ran"
        new["phase"], new["waiting"], new["due_at_ms"] = LockingPhase.TIMED_OUT, False, 0
        new["error"] = error_info(LockTimeoutError.__name__, message, True)
        t = Transition(new, result=result_of(new, "FAILED", now))
        self._release(t, self.acquisition(state), now, held=False)
        return t

    def _release(self, t: Transition, acquisition: Acquisition, now: int, held: bool = True) -> None:
        """The transaction ended: a release to every partition it asked; RELEASED events if it ran."""
        tx_id = t.state["intent"]["tx_id"]
        t.partition_messages.extend(PartitionRelease(tx_id, p) for p in acquisition.asked())
        if held:
            keys = write_keys(t.state["intent"])
            t.lock_requests.extend(lock_event(t.state, key, "RELEASED", [], now, EXCLUSIVE) for key in keys)


@dataclass
class Refusing:
    """A protocol a coordinator running the partitioned lock manager cannot run: every new transaction of
    it fails at once with an UnsupportedError saying why; nothing of it runs."""

    inner: TransactionProtocol
    why: str

    @property
    def name(self) -> str:
        return self.inner.name

    def start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        return self.inner.start(intent, now, refusal or error_info(UnsupportedError.__name__, self.why, False))

    def decide(self, state: TxState, event: Event, now: int) -> Transition:
        return self.inner.decide(state, event, now)

    def is_terminal(self, phase: str) -> bool:
        return self.inner.is_terminal(phase)

    def is_in_flight(self, phase: str) -> bool:
        return self.inner.is_in_flight(phase)

    def is_stuck(self, phase: str) -> bool:
        return self.inner.is_stuck(phase)


def partitioned_of(protocols: Mapping[str, TransactionProtocol]) -> PartitionedLocking | None:
    """The sagas' protocol when it asks the lock manager partitioned by key (registry.protocols)."""
    sagas = protocols.get("saga")
    return sagas if isinstance(sagas, PartitionedLocking) else None


def granted(partitioned: PartitionedLocking | None, grant: LockPartitionGrant) -> PartitionGranted:
    """A grant read by the coordinator, as its transaction's event; ProtocolError (a dead letter) when this
    coordinator asks no partition. (A transaction of another protocol refuses the event itself: two-phase
    commit has a row saying so.)"""
    if partitioned is None:
        raise ProtocolError(f"{grant['tx_id']}: a lock grant, but this coordinator keeps its own lock table")
    return PartitionGranted(grant_of(grant))
