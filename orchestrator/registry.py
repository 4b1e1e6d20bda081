"""Which protocol drives a transaction: the registry of protocols, and the questions asked of a state.

Adding a protocol (two-phase commit, ...) is a pure module with a `TransactionProtocol` class and one row
in `PROTOCOLS` (a protocol that takes no locks of its own may be wrapped in `orchestrator.locking.Locking`,
as sagas are); an intent chooses it through `PROTOCOL_FOR_CONSISTENCY`. A snapshot names its protocol,
so the driver and the changelog fold ask that protocol whether a state is terminal, never a phase name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from orchestrator.interactive import Interactive
from orchestrator.lock_waits import AnnouncedWaits
from orchestrator.partitioned_locking import PartitionedLocking, Refusing
from orchestrator.protocol import TransactionProtocol, TxState
from orchestrator.saga import SagaPolicy, SagaProtocol
from orchestrator.twopc import TwoPhaseCommit
from polycommit.errors import ProtocolError
from polycommit.events import TransactionIntent


def interactive_saga(policy: SagaPolicy, waits: AnnouncedWaits | None = None) -> Interactive:
    """Sagas holding exclusive locks on their write keys until they end (unless an intent opts out),
    waiting for them as long as a step may take by default; and interactive transactions that take their
    locks on demand before their intent (orchestrator/interactive.py)."""
    return Interactive(SagaProtocol(policy), lock_wait_ms=policy.default_timeout_ms, waits=waits or AnnouncedWaits())


def two_phase_commit(policy: SagaPolicy, waits: AnnouncedWaits) -> TwoPhaseCommit:
    return TwoPhaseCommit(policy, waits=waits)


# name -> factory, given the coordinator's policy (timeouts, backoff, payload limit) and the member's one
# lock table (with the waits announced on it): every protocol that locks shares it, so a saga, an
# interactive transaction and a two-phase commit on the same key exclude one another.
PROTOCOLS: Mapping[str, Callable[[SagaPolicy, AnnouncedWaits], TransactionProtocol]] = {
    "saga": interactive_saga,
    "twopc": two_phase_commit,
}

# An intent's consistency chooses its protocol.
PROTOCOL_FOR_CONSISTENCY: Mapping[str, str] = {
    "EVENTUAL": "saga",
    "STRONG": "twopc",
}
DEFAULT_PROTOCOL = "saga"  # also the protocol of snapshots written before they named one


PARTITIONED_REFUSES = (
    "two-phase commit needs the coordinator member's lock table, and this coordinator runs the lock manager "
    "partitioned by key (POLYCOMMIT_LOCK_MANAGER=partitioned), which serves sagas only"
)


def protocols(policy: SagaPolicy, lock_manager: str = "member") -> dict[str, TransactionProtocol]:
    """Every protocol, by name. `lock_manager="partitioned"`: sagas ask the lock manager partitioned by
    key, and two-phase commits are refused (orchestrator/partitioned_locking.py)."""
    if lock_manager == "partitioned":
        return {
            "saga": PartitionedLocking(SagaProtocol(policy), lock_wait_ms=policy.default_timeout_ms),
            "twopc": Refusing(TwoPhaseCommit(policy), PARTITIONED_REFUSES),
        }
    waits = AnnouncedWaits()
    built = {name: factory(policy, waits) for name, factory in PROTOCOLS.items()}
    sagas, strong = built.get("saga"), built.get("twopc")
    if isinstance(sagas, Interactive) and isinstance(strong, TwoPhaseCommit):
        sagas.strong = strong  # an interactive transaction's STRONG intent is run by two-phase commit
    return built


def protocol_name(intent: TransactionIntent) -> str:
    return PROTOCOL_FOR_CONSISTENCY.get(intent["consistency"], DEFAULT_PROTOCOL)


def protocol_of(state: TxState) -> str:
    return state.get("protocol") or DEFAULT_PROTOCOL


_DEFAULTS = protocols(SagaPolicy())  # phase questions need no policy


def protocol_for(state: TxState) -> TransactionProtocol:
    try:
        return _DEFAULTS[protocol_of(state)]
    except KeyError:
        raise ProtocolError(f"{state['intent']['tx_id']}: unknown protocol {protocol_of(state)!r}") from None


def is_terminal(state: TxState) -> bool:
    return protocol_for(state).is_terminal(state["phase"])


def is_in_flight(state: TxState) -> bool:
    return protocol_for(state).is_in_flight(state["phase"])


def is_stuck(state: TxState) -> bool:
    return protocol_for(state).is_stuck(state["phase"])
