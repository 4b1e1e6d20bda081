"""The offsets a store consumer may commit while its participant holds commands back. Pure.

A phase-2 command of PostgreSQL's batched two-phase commit is held (no outcome yet) until the decisions
of its batch's other members arrive, maybe in a later batch. Committing the offset past it would lose it
with a crash of the consumer: the restarted one would never see it again, and the coordinator's resend
(seconds later) would be the only way on. So the committed offset of a partition never passes the first
command still held there; a restart gets it again (with the commands after it, which the markers make
no-ops) and settles the batch at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

StepKey = tuple[str, int, str]  # tx_id, step index, action: what a held command and its outcome share


class HeldOffsets:
    def __init__(self) -> None:
        self._held: dict[StepKey, tuple[Any, int]] = {}  # step -> (its topic partition, its offset)
        self._fetched: dict[Any, int] = {}  # topic partition -> the position after the last record handled

    def handled(self, partition: Any, next_offset: int) -> None:
        self._fetched[partition] = next_offset

    def hold(self, step: StepKey, partition: Any, offset: int) -> None:
        self._held.setdefault(step, (partition, offset))

    def release(self, steps: Iterable[StepKey]) -> None:
        for step in steps:
            self._held.pop(step, None)

    def offsets(self) -> dict[Any, int]:
        """What to commit: each partition's position, but never past a command still held there."""
        committed = dict(self._fetched)
        for partition, offset in self._held.values():
            committed[partition] = min(committed.get(partition, offset), offset)
        return committed

    def clear(self) -> None:
        """A new session: what it reads again is held again if it must be."""
        self._held.clear()
        self._fetched.clear()

    def __len__(self) -> int:
        return len(self._held)
