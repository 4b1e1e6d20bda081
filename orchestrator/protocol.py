"""The seam between the coordinator's driver and its protocols: one event vocabulary, one transition type.

Every protocol (sagas today; two-phase commit and the lock manager next) is a pure module exposing
`start(intent, now, refusal)` and `decide(state, event, now)`; each returns a `Transition` that says what
to publish. The driver does the I/O and never looks inside a protocol's phases: it asks the protocol
whether a state is terminal. Inside a protocol, `decide` is an explicit table of (phase, event kind) ->
handler (see `dispatch`): an event with no row is impossible and raises `ProtocolError`, while late and
duplicate events are rows of their own that change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from orchestrator.lock_partitions import PartitionGrant, PartitionRelease, PartitionRequest
from polycommit.errors import ProtocolError
from polycommit.events import (
    Alert,
    Decision,
    ErrorInfo,
    LockEvent,
    LockReply,
    OperatorCommand,
    SagaSnapshot,
    StepOutcome,
    StoreCommand,
    TransactionIntent,
    TransactionResult,
)

# The state every protocol keeps per transaction; the changelog's record type (its `protocol` field
# names the protocol). A protocol that needs more fields adds them to the schema with defaults.
TxState = SagaSnapshot


# -- events: what can happen to a transaction that already has a state -----------------------------


@dataclass(frozen=True)
class IntentReceived:
    """The transaction's intent arrived again (a client retry, a replay of the intents topic)."""

    intent: TransactionIntent


@dataclass(frozen=True)
class OutcomeReceived:
    """A store reported on a command."""

    outcome: StepOutcome


@dataclass(frozen=True)
class TimerDue:
    """The driver's timer for `state["due_at_ms"]` fired (a timeout, or a scheduled retry)."""


@dataclass(frozen=True)
class OperatorReceived:
    """An operator's command (`polycommit tx retry|resolve`) about this transaction. A protocol answers
    every one it cannot carry out with an explicit refusal (an `operator_refused` alert), never a crash."""

    command: OperatorCommand


@dataclass(frozen=True)
class LocksGranted:
    """The locks a transaction was waiting for are now all its own (another transaction released them)."""


@dataclass(frozen=True)
class PartitionGranted:
    """A partition of the lock manager partitioned by key answered (orchestrator/partitioned_locking.py):
    the transaction holds its keys there, or waits for `grant.blockers`."""

    grant: PartitionGrant


Event = IntentReceived | OutcomeReceived | TimerDue | OperatorReceived | LocksGranted | PartitionGranted


# -- what one event did ----------------------------------------------------------------------------


@dataclass
class Transition:
    """What one event did: the new state and everything the driver must now publish.

    `rejections` are typed errors about the input record itself: the driver turns each into a dead
    letter of that record. `decisions` and `lock_requests` are empty until two-phase commit and the lock
    manager use them; the driver already publishes them (decisions keyed by transaction, lock events by
    resource).
    """

    state: TxState
    commands: list[StoreCommand] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    lock_requests: list[LockEvent] = field(default_factory=list)
    result: TransactionResult | None = None
    alerts: list[Alert] = field(default_factory=list)
    rejections: list[ErrorInfo] = field(default_factory=list)
    # Other transactions this one's end let go on (their locks are granted): the driver folds a
    # `LocksGranted` into each, in this order, within the same Kafka transaction.
    wake: list[str] = field(default_factory=list)
    # Answers to an interactive transaction's lock requests, sent to its reply address.
    lock_replies: list[LockReply] = field(default_factory=list)
    # Deadlocks of two this transition closed in the member's lock table (it queued behind a transaction
    # that waits for it): the driver judges each at once, by the detector's rule, instead of waiting for
    # the detector's verdict (`orchestrator.interactive_model.verdict_on`).
    cycles: list[tuple[str, ...]] = field(default_factory=list)
    # Requests and releases for the lock manager partitioned by key, each to its partition of lock-requests.
    partition_messages: list[PartitionRequest | PartitionRelease] = field(default_factory=list)

    def publishes(self) -> bool:
        """Anything to publish (a transition that keeps its state object and publishes nothing changed nothing)."""
        return bool(
            self.commands
            or self.decisions
            or self.lock_requests
            or self.alerts
            or self.rejections
            or self.result is not None
            or self.lock_replies
            or self.partition_messages
        )


class TransactionProtocol(Protocol):
    """What the driver needs of a protocol; one instance serves every transaction of that protocol."""

    @property
    def name(self) -> str: ...

    def start(self, intent: TransactionIntent, now: int, refusal: ErrorInfo | None = None) -> Transition:
        """A new transaction. `refusal` is the driver's verdict on what only it can check (the record's
        key, the reply address): when given, the transaction fails at once with that error."""
        ...

    def decide(self, state: TxState, event: Event, now: int) -> Transition:
        """The next transition; raises ProtocolError for an event the protocol can never receive."""
        ...

    def is_terminal(self, phase: str) -> bool: ...

    def is_in_flight(self, phase: str) -> bool: ...

    def is_stuck(self, phase: str) -> bool: ...


@runtime_checkable
class HoldsLocks(Protocol):
    """A protocol keeping state across transactions (its member's lock table, shared by every protocol that
    locks): the driver tells it which states it now owns and which it gave up; the calls that return
    transaction ids name the ones to wake with `LocksGranted`. A restore is two passes over every
    lock-taking protocol (`restore_locks`): what the running transactions held, then the waits."""

    def restore_holders(self, states: Iterable[TxState]) -> None: ...

    def restore_waiters(self, states: Iterable[TxState]) -> list[str]: ...

    def forgotten(self, tx_ids: Iterable[str]) -> list[str]: ...


def restore_locks(owners: Iterable[HoldsLocks], states: Iterable[TxState]) -> list[str]:
    """Rebuild the shared lock table from restored states: every protocol's holders first, so that no
    restored waiter (of any protocol) queues ahead of, or is granted over, a key another protocol's
    running transaction held before the crash; then every protocol's waiters. Returns the waiters that
    hold all their locks now."""
    owners, states = list(owners), list(states)
    for owner in owners:
        owner.restore_holders(states)
    return [tx for owner in owners for tx in owner.restore_waiters(states)]


# -- the table -------------------------------------------------------------------------------------

# A row's handler: (state, event, now, the protocol's policy) -> transition.
Handler = Callable[[TxState, Any, int, Any], Transition]


def dispatch(
    table: Mapping[tuple[StrEnum, StrEnum], Handler],
    row: tuple[StrEnum, StrEnum],
    state: TxState,
    event: Any,
    now: int,
    policy: Any,
) -> Transition:
    """Run the row (phase, event kind) of a protocol's table; a missing row is an impossible event."""
    handler = table.get(row)
    if handler is None:
        phase, kind = row
        raise ProtocolError(f"{state['intent']['tx_id']}: no transition for {kind.value} in phase {phase.value}")
    return handler(state, event, now, policy)


def unchanged(state: TxState, event: Any, now: int, policy: Any) -> Transition:
    """The row of every late, duplicate or early event: same state object, nothing to publish."""
    return Transition(state)
