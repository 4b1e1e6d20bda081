"""Where a coordinator member has folded its inputs to, kept in its changelog. Pure: no I/O.

Each coordinator loop commits its output, the snapshots of the transactions it touched and how far it
read its input partitions in one Kafka transaction. The positions used to be the consumer group's offsets
(AddOffsetsToTxn + TxnOffsetCommit: two of the four round trips of every loop's Kafka transaction, and a
quarter of the broker's CPU per saga). They are now records of the changelog (`tx-state`), one key per
input partition, in the partition of that input partition's transactions: the same Kafka transaction
carries them without a request of its own, and compaction keeps the latest of each.

- **Restore.** The member reads a partition's positions with its snapshots and seeks each input there,
  unconditionally: the group's offsets may lag behind, and a fenced zombie may have moved them ahead.
- **Records already folded are skipped.** A batch fetched before the restore (from the group's offset)
  may begin below the position: `fresh` says which of its records to fold.
- **The group's offsets are a copy**, made off the loop every GROUP_COPY_MS, for the tools that show
  consumer lag. Only positions a committed Kafka transaction holds are copied, so the copy may lag behind
  the changelog, never lead it. A partition without a position record (a changelog written before
  positions were) starts from the group's offset, which is then exact: it was committed with the output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from polycommit.events import InputPosition

RESERVED_PREFIX = "polycommit:"  # changelog keys that are not transactions: admission refuses such tx ids
POSITION_PREFIX = f"{RESERVED_PREFIX}position:"
GROUP_COPY_MS = 1000  # how often the group's offsets are brought up to the changelog's positions

Offsets = dict[TopicPartition, int]


def position_key(tp: TopicPartition) -> str:
    return f"{POSITION_PREFIX}{tp.topic}:{tp.partition}"


def is_reserved(key: str) -> bool:
    """A changelog key of polycommit's own, not a transaction's."""
    return key.startswith(RESERVED_PREFIX)


def position_record(tp: TopicPartition, next_offset: int) -> InputPosition:
    return {"topic": tp.topic, "partition": tp.partition, "next_offset": next_offset}


@dataclass
class InputPositions:
    """Per owned input partition: the next offset to fold, the latest position a committed Kafka
    transaction holds, the latest copied to the group, and restored positions not yet sought."""

    next: Offsets = field(default_factory=dict)
    committed: Offsets = field(default_factory=dict)
    copied: Offsets = field(default_factory=dict)
    seeks: Offsets = field(default_factory=dict)
    copy_at_ms: int = 0

    def restored(self, positions: Iterable[InputPosition]) -> None:
        """Positions read from the changelog: folding resumes there, and the consumer is moved there."""
        for p in positions:
            tp = TopicPartition(p["topic"], p["partition"])
            self.next[tp] = self.committed[tp] = self.seeks[tp] = p["next_offset"]

    def take_seeks(self) -> Offsets:
        seeks, self.seeks = self.seeks, {}
        return seeks

    def fresh(self, tp: TopicPartition, offset: int) -> bool:
        """Whether the record at `offset` is still to be folded (below the position: folded already)."""
        return offset >= self.next.get(tp, 0)

    def folded(self, read: Mapping[TopicPartition, int]) -> Offsets:
        """A loop read up to `read` (next offsets) and folded what was fresh: the positions to commit."""
        moved: Offsets = {}
        for tp, offset in read.items():
            if offset > self.next.get(tp, -1):
                self.next[tp] = moved[tp] = offset
        return moved

    def committed_now(self, offsets: Mapping[TopicPartition, int]) -> None:
        """A Kafka transaction carrying these positions committed. Only owned partitions are kept: one
        given up meanwhile was forgotten, and its new owner restores its position from the changelog."""
        for tp, offset in offsets.items():
            if tp in self.next and offset > self.committed.get(tp, -1):
                self.committed[tp] = offset

    def copy_due(self, now_ms: int) -> Offsets:
        """The committed positions the group has not been told yet, once every GROUP_COPY_MS."""
        if now_ms < self.copy_at_ms:
            return {}
        self.copy_at_ms = now_ms + GROUP_COPY_MS
        return self.uncopied()

    def uncopied(self) -> Offsets:
        return {tp: offset for tp, offset in self.committed.items() if self.copied.get(tp) != offset}

    def copied_now(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.copied.update(offsets)

    def forget(self, partitions: set[int]) -> None:
        """Given up (or to be restored afresh): a new owner, or the restore, reads them from the changelog."""
        for offsets in (self.next, self.committed, self.copied, self.seeks):
            for tp in [tp for tp in offsets if tp.partition in partitions]:
                del offsets[tp]

    def forget_all(self) -> None:
        self.next, self.committed, self.copied, self.seeks = {}, {}, {}, {}
