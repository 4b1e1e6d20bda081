"""How lock requests and deadlock verdicts reach the coordinator member that owns their transaction, and
which protocol transition each one is (the driver, orchestrator/service.py, publishes it).

Lock requests travel on the intents topic keyed by tx_id, like the intent that follows them, so the member
holding an interactive transaction's locks is the one that runs its intent. Verdicts are keyed by victim
(the detector's producer partitions keys as every polycommit producer does, murmur2); when
`<prefix>.deadlocks` has the intents topic's partition count, the consumer group's range assignor gives
each member the same partition numbers of both, so the member owning a transaction reads the verdicts
naming it, within its read-process-commit Kafka transaction: the abort and the verdict's offset commit
together. A deadlocks topic with another count would hand verdicts (and the restore of their partitions)
to members that do not own the victims: it is then not read at all, an error says why, and the lock-wait
timeout still ends every deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from orchestrator.admission import ReplyTargets, expiry_refusal, key_refusal
from orchestrator.interactive import Interactive
from orchestrator.interactive_model import LockRequested, VictimChosen, open_intent, verdict_on
from orchestrator.partitioned_locking import PartitionedLocking
from orchestrator.protocol import TransactionProtocol, Transition, TxState
from orchestrator.registry import protocol_of
from orchestrator.transactions import OwnedTransactions
from orchestrator.twopc import TwoPhaseCommit
from polycommit.bus import Publisher, Topics
from polycommit.codec import EventCodec
from polycommit.errors import ProtocolError, UnsupportedError
from polycommit.events import DeadlockVerdict, LockRequest, error_info

log = logging.getLogger("orchestrator.service")

INPUTS = frozenset({"LockRequest", "DeadlockVerdict"})
NO_INTERACTIVE = (
    "interactive transactions need the coordinator member's lock table, and this coordinator runs the lock "
    "manager partitioned by key (POLYCOMMIT_LOCK_MANAGER=partitioned), which serves sagas only"
)


async def input_topics(
    publisher: Publisher, topics: Topics, partitioned: PartitionedLocking | None = None
) -> list[str]:
    """The coordinator group's topics: its inputs, the verdicts when they are co-partitioned, and for
    `partitioned` sagas the lock manager's answers (ProtocolError unless co-partitioned: a grant must reach
    the member that owns its transaction, or that transaction waits for nothing until its lock wait ends);
    `partitioned` learns the partitions of lock-requests."""
    inputs = topics.coordinator_inputs()
    intents, verdicts = await publisher.partitions(topics.intents), await publisher.partitions(topics.deadlocks)
    if partitioned is not None:
        partitioned.partitions = await publisher.partitions(topics.lock_requests)
        grants = await publisher.partitions(topics.lock_grants)
        if len(grants) != len(intents):
            raise ProtocolError(
                f"{topics.lock_grants} has {len(grants)} partitions, {topics.intents} {len(intents)}: recreate "
                f"{topics.lock_grants} with {len(intents)} partitions to run the partitioned lock manager"
            )
        inputs = [*inputs, topics.lock_grants]
    if len(verdicts) == len(intents):
        return [*inputs, topics.deadlocks]
    log.error(
        "%s has %d partitions, %s %d: deadlock verdicts are not read (a verdict would reach a member that does "
        "not own its victim); deadlocks end by lock-wait timeout. Recreate %s with %d partitions.",
        topics.deadlocks,
        len(verdicts),
        topics.intents,
        len(intents),
        topics.deadlocks,
        len(intents),
    )
    return inputs


class InteractiveInputs:
    """Turns a LockRequest or a DeadlockVerdict into the transition of its transaction's protocol."""

    def __init__(
        self,
        transactions: OwnedTransactions,
        protocols: Mapping[str, TransactionProtocol],
        replies: ReplyTargets,
        codec: EventCodec,
        marker_retention_ms: int,
    ) -> None:
        self.transactions = transactions
        self.protocols = protocols
        self.replies = replies
        self.codec = codec
        self.marker_retention_ms = marker_retention_ms
        # Set when this coordinator cannot run interactive transactions (the partitioned lock manager):
        # it answers each one's first request with an UnsupportedError, so the client learns at once.
        self.refuser: Interactive | None = None

    def _interactive(self, state: TxState | None) -> Interactive | None:
        protocol = self.protocols.get("saga" if state is None else protocol_of(state))
        return protocol if isinstance(protocol, Interactive) else None

    async def transition(
        self, event_type: str, event: Any, record: Any, now: int
    ) -> tuple[TxState | None, Transition | None]:
        """(the state before, the transition); no transition when the record changes nothing here."""
        if event_type == "DeadlockVerdict":
            return self.verdict(event, now)
        return await self.lock_request(event, record, now)

    def verdict(self, verdict: DeadlockVerdict, now: int) -> tuple[TxState | None, Transition | None]:
        """A verdict names a saga or interactive transaction, or a two-phase commit waiting for its locks
        (all on the member's one lock table); about a transaction this member does not hold (ended,
        unknown) it changes nothing."""
        state = self.transactions.get(verdict["victim"])
        if state is None:
            return state, None
        protocol = self.protocols.get(protocol_of(state))
        if isinstance(protocol, Interactive | TwoPhaseCommit):
            return state, protocol.decide(state, VictimChosen(verdict), now)
        return state, None

    def closed_cycle(self, cycle: tuple[str, ...], now: int) -> tuple[TxState | None, Transition | None]:
        """A deadlock of two that a transition closed in this member's table: the verdict the detector
        would give, applied now (the detector's own, if it comes, finds the victim gone: stale)."""
        states = [self.transactions.get(tx_id) for tx_id in cycle]
        if any(s is None for s in states):
            return None, None
        return self.verdict(verdict_on(cycle, [s for s in states if s is not None], now), now)

    async def lock_request(
        self, request: LockRequest, record: Any, now: int
    ) -> tuple[TxState | None, Transition | None]:
        tx_id = request["tx_id"]
        state = self.transactions.get(tx_id)
        protocol = self._interactive(state)
        if protocol is None and state is None and self.refuser is not None:
            return None, self.refuser.open(request, now, error_info(UnsupportedError.__name__, NO_INTERACTIVE, False))
        if protocol is None:
            return state, None  # its transaction runs a protocol that takes no lock requests
        if state is not None:
            return state, protocol.decide(state, LockRequested(request), now)
        refusal = (
            key_refusal(record.key, tx_id)
            or expiry_refusal(open_intent(request), now, self.marker_retention_ms)
            or await self.replies.refusal(request["reply_to"])
        )
        t = protocol.open(request, now, refusal)
        if t.result is None:  # opened: its snapshots carry the intent it is known by until its own comes
            self.transactions.admit(tx_id, self.codec.encode("TransactionIntent", t.state["intent"]))
        return None, t

    def intent_arrived(self, tx_id: str, intent_bytes: bytes) -> None:
        """An open transaction's own intent came: its snapshots carry that one from now on."""
        state = self.transactions.get(tx_id)
        protocol = self._interactive(state)
        if state is not None and protocol is not None and protocol.is_open(state["phase"]):
            self.transactions.admit(tx_id, intent_bytes)
