"""The coordinator's consumer, kept at the changelog's input positions; the group's offsets, a copy. I/O only.

The positions that decide where a member resumes are in the changelog (orchestrator/positions.py):
- after a restore, the consumer is moved to the restored positions (`seek_restored`);
- the group's committed offsets, which `kafka-consumer-groups` and other lag tools read, are brought up to
  the positions committed so far, every GROUP_COPY_MS, by a task beside the loop (`maybe_copy`): the loop
  never waits for the group coordinator, and a copy that fails (a rebalance, a broker restarting) is
  only late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from orchestrator.positions import InputPositions, Offsets

log = logging.getLogger(__name__)

FINAL_COPY_S = 5.0  # a clean stop's last copy: the group coordinator answers in milliseconds when it is there


class ConsumerPositions:
    def __init__(self, positions: InputPositions) -> None:
        self.positions = positions
        self.consumer: AIOKafkaConsumer | None = None  # the session's
        self._copying: asyncio.Task[None] | None = None

    def seek_restored(self) -> None:
        """Move the consumer to the positions just restored: the changelog's, never the group's, which
        may lag behind or, written by a fenced zombie, lead. A partition given up meanwhile is left."""
        seeks = self.positions.take_seeks()
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        for tp, offset in seeks.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)  # type: ignore[union-attr]

    def maybe_copy(self, now_ms: int) -> None:
        """Start a copy to the group when one is due and none is running."""
        if self._copying is not None and not self._copying.done():
            return
        offsets = self.positions.copy_due(now_ms)
        if offsets:
            self._copying = asyncio.create_task(self._copy(offsets))

    async def close(self, *, final: bool) -> None:
        """End the session's copying. `final` (a member stopping cleanly): finish the copy running and copy
        what is left, each for at most FINAL_COPY_S. Otherwise (the session failed) the copy running is
        cancelled, not awaited: aiokafka retries a commit for as long as the group coordinator is away, which
        would keep the session from ending and a new one from starting."""
        copying, self._copying = self._copying, None
        if copying is not None:
            if not final:
                copying.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(copying, FINAL_COPY_S)  # cancelled if it takes longer
        if final and self.positions.uncopied():
            try:
                await asyncio.wait_for(self._copy(self.positions.uncopied()), FINAL_COPY_S)
            except TimeoutError:
                log.info("the group's offsets were not brought up to the changelog at the stop (late, not lost)")

    async def _copy(self, offsets: Offsets) -> None:
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        owned = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not owned or self.consumer is None:
            return
        try:
            await self.consumer.commit(owned)
        except KafkaError as exc:  # late, not lost: the next copy carries it, and the changelog decides
            log.info("the group's offsets are not brought up to the changelog now (%s: %s)", type(exc).__name__, exc)
            return
        self.positions.copied_now(owned)
