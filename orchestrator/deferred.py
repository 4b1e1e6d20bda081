"""Loops whose only output is the changelog: their Kafka transaction is put off. Pure: no I/O.

A coordinator loop that folds inputs into state but publishes nothing else — an outcome of a step whose
saga still waits for others, a stale or duplicate input, a timer that only re-arms — need not commit at
once: its inputs' positions stay uncommitted (orchestrator/positions.py), so a crash re-reads and folds
them again, and nothing anyone saw was derived from that state. The next loop that publishes something (a
command, a result, a lock event...) commits the snapshots and positions put off together with its own, in
one Kafka transaction; so does the loop DEFER_MS after the first one put off, a member about to give
partitions up, and a member that stops. A saga whose three steps run in parallel then costs two
coordinator Kafka transactions (its start and its end) instead of four, and its last outcome no longer
waits for the commit of the one before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from orchestrator.protocol import TxState

DEFER_MS = 50  # how long a changelog-only loop may wait for a loop that publishes
# What a commit takes: the latest state of each transaction touched, the inputs' positions, the trace spans.
Taken = tuple[dict[str, TxState], dict[TopicPartition, int], list[Any]]


@dataclass
class Deferred:
    """What loops put off: the latest state of each transaction they touched, the positions of their inputs
    and their trace spans, since `since_ms`."""

    touched: dict[str, TxState] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    spans: list[Any] = field(default_factory=list)
    since_ms: int | None = None

    def __bool__(self) -> bool:
        return self.since_ms is not None

    def put_off(
        self, touched: dict[str, TxState], offsets: dict[TopicPartition, int], spans: list[Any], now: int
    ) -> None:
        """Add a loop's share; a loop that read and touched nothing starts no wait."""
        if not (touched or offsets or spans):
            return
        self.touched.update(touched)
        self.offsets.update(offsets)  # offsets only grow within a partition: the later loop's win
        self.spans.extend(spans)
        if self.since_ms is None:
            self.since_ms = now

    def due(self, now: int) -> bool:
        return self.since_ms is not None and now - self.since_ms >= DEFER_MS

    def wait_ms(self, now: int, wanted: int) -> int:
        """How long the next poll may wait: no longer than until what was put off is due."""
        if self.since_ms is None:
            return wanted
        return max(0, min(wanted, self.since_ms + DEFER_MS - now))

    def take(self) -> Taken:
        """Everything put off, for one commit; nothing is left put off."""
        taken = (self.touched, self.offsets, self.spans)
        self.clear()
        return taken

    def clear(self) -> None:
        self.touched, self.offsets, self.spans, self.since_ms = {}, {}, [], None
