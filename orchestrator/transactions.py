"""The transactions one coordinator member owns: their states, timers, and their restore from the changelog.

A member owns the transactions whose partition (of the intents, outcomes and tx-state topics, which share
one partition count) the group assigned it. Before it folds any event of a partition it restores that
partition's snapshots from `tx-state`, so no event is ever folded over state not yet loaded.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Iterator

from orchestrator.positions import InputPositions
from orchestrator.protocol import TxState
from orchestrator.registry import is_terminal
from polycommit.bus import Outgoing, read_topic
from polycommit.codec import EventCodec
from polycommit.config import Settings
from polycommit.partitioning import partition_of
from projections import tx_state

log = logging.getLogger(__name__)


class OwnedTransactions:
    """States by transaction id, each with its intent as published and a timer at its `due_at_ms`."""

    def __init__(self, settings: Settings, changelog: str, codec: EventCodec) -> None:
        self.settings = settings
        self.changelog = changelog
        self.codec = codec
        self.states: dict[str, TxState] = {}
        self.intent_bytes: dict[str, bytes] = {}  # each transaction's intent as published, for its snapshots
        self.timers: list[tuple[int, str]] = []
        # The due time each transaction's latest timer entry holds: a transition that keeps it (most do: a
        # saga's outcomes leave its earliest step timeout where it was) pushes no second entry.
        self.timer_of: dict[str, int] = {}
        self.partitions = 0  # of the coordinator's input topics, set when a session starts
        self.restored_partitions: set[int] = set()  # partitions whose changelog is folded into `states`
        self.positions = InputPositions()  # how far the inputs of those partitions are folded (positions.py)
        self.restored = 0
        self.corrupt_snapshots = 0
        self._restore_lock = asyncio.Lock()

    def __contains__(self, tx_id: str) -> bool:
        return tx_id in self.states

    def get(self, tx_id: str) -> TxState | None:
        return self.states.get(tx_id)

    def partition_of(self, tx_id: str) -> int:
        return partition_of(tx_id, range(max(1, self.partitions)))

    def admit(self, tx_id: str, intent_bytes: bytes) -> None:
        self.intent_bytes[tx_id] = intent_bytes

    def keep(self, state: TxState) -> None:
        """Record a transaction's new state: kept while it runs, dropped once its protocol ends it."""
        tx_id = state["intent"]["tx_id"]
        if is_terminal(state):
            self.states.pop(tx_id, None)
        else:
            self.states[tx_id] = state
            self.schedule(state)

    def changelog_records(self, touched: dict[str, TxState]) -> list[Outgoing]:
        """The changelog records of the states a loop touched: each one's snapshot, or its tombstone."""
        return [
            Outgoing(self.changelog, tx_id, "SagaSnapshot", self.record_of(state)) for tx_id, state in touched.items()
        ]

    def record_of(self, state: TxState) -> dict[str, object] | None:
        """The changelog record of a state: a snapshot while it runs, a tombstone (None) once it ended."""
        tx_id = state["intent"]["tx_id"]
        if is_terminal(state):
            self.intent_bytes.pop(tx_id, None)
            return None
        return tx_state.to_record(state, self.intent_bytes[tx_id])

    def schedule(self, state: TxState) -> None:
        due, tx_id = state["due_at_ms"], state["intent"]["tx_id"]
        if due and not is_terminal(state) and self.timer_of.get(tx_id) != due:
            self.timer_of[tx_id] = due
            heapq.heappush(self.timers, (due, tx_id))

    def next_due_ms(self) -> int | None:
        return self.timers[0][0] if self.timers else None

    def due(self, now: int) -> Iterator[TxState]:
        """States whose timer is due; a timer superseded by a later transition is dropped."""
        while self.timers and self.timers[0][0] <= now:
            due, tx_id = heapq.heappop(self.timers)
            if self.timer_of.get(tx_id) == due:
                del self.timer_of[tx_id]
            state = self.states.get(tx_id)
            if state is not None and state["due_at_ms"] == due:
                yield state

    def forget(self, partitions: set[int]) -> None:
        self.restored_partitions -= partitions
        self.positions.forget(partitions)
        for tx_id in [t for t in self.states if self.partition_of(t) in partitions]:
            del self.states[tx_id]
            self.intent_bytes.pop(tx_id, None)

    def forget_all(self) -> None:
        self.restored_partitions.clear()
        self.positions.forget_all()
        self.states.clear()
        self.intent_bytes.clear()
        self.timers.clear()
        self.timer_of.clear()

    async def restore(self, partitions: set[int]) -> list[TxState]:
        """Fold the changelog partitions this member now owns into its state, once each; returns what
        it restored.

        aiokafka may hand out records of a new partition before its rebalance callback has finished
        restoring it, so the loop also calls this for every partition in a batch: the lock and the
        restored set make the second caller wait for the first and then do nothing."""
        async with self._restore_lock:
            todo = set(partitions) - self.restored_partitions
            if not todo:
                return []
            restored = await self._restore(todo)
            self.restored_partitions |= todo
            return restored

    async def _restore(self, partitions: set[int]) -> list[TxState]:
        raw: list[tuple[str, bytes | None]] = []
        await read_topic(self.settings, self.changelog, lambda r: raw.append((r.key.decode(), r.value)), partitions)
        folded = tx_state.fold_changelog(self.codec, raw)
        restored, intents = folded.states, folded.intents
        self.positions.restored(folded.positions)
        corrupt = folded.corrupt_snapshots + folded.corrupt_positions
        if corrupt:
            # Not ours (someone wrote to the changelog): skipped, since refusing to start would stop
            # every transaction; counted and logged for the operator.
            self.corrupt_snapshots += corrupt
            log.error("skipped %d corrupt changelog records in partitions %s", corrupt, sorted(partitions))
        for tx_id, snapshot in restored.items():
            self.states[tx_id] = snapshot
            self.intent_bytes[tx_id] = intents[tx_id]
            self.schedule(snapshot)
        self.restored += len(restored)
        log.info(
            "restored %d transactions from partitions %s (%d records)", len(restored), sorted(partitions), len(raw)
        )
        return list(restored.values())
