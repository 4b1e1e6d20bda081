"""The coordinators' side of the partitioned lock manager, played over the real broker for its tests: each
transaction asks its partitions in order (`Acquisition`), holds its keys, and releases them. The driver
reads every answer on `lock-grants` (read_committed: an aborted Kafka transaction's answers are never
seen) and keeps who holds what, refusing two transactions holding conflicting locks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.lock_partitions import (
    Acquisition,
    PartitionGrant,
    PartitionRelease,
    PartitionRequest,
    grant_of,
    partition_record,
)
from orchestrator.locks import EXCLUSIVE, SHARED, LockMode
from polycommit.bus import Outgoing, Publisher, make_reader, topic_partitions, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.events import now_ms
from polycommit.partitioning import partition_of

ANSWER_BOUND_S = 60.0  # an acquisition not granted by then is a failure, not a hang


@dataclass
class LockDriver:
    settings: Settings
    publisher: Publisher | None = None
    partitions: list[int] = field(default_factory=list)
    answers: list[PartitionGrant] = field(default_factory=list)  # every answer read, in order
    answered_at: list[int] = field(default_factory=list)  # each answer's at_ms (when the manager gave it)
    holding: dict[str, Mapping[str, LockMode]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    _inbox: dict[str, asyncio.Queue[PartitionGrant]] = field(default_factory=dict)
    _reader_task: asyncio.Task[None] | None = None

    async def start(self) -> LockDriver:
        topics = topics_for(self.settings)
        self.publisher = Publisher(self.settings, client_id="lock-driver")
        await self.publisher.start()
        self.partitions = await self.publisher.partitions(topics.lock_requests)
        reader = make_reader(self.settings, "lock-driver", fetch_max_wait_ms=20)
        await reader.start()
        tps = await topic_partitions(reader, topics.lock_grants)
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def stop(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self.publisher is not None:
            await self.publisher.stop()

    async def _read(self, reader: Any) -> None:
        codec = default_codec()
        try:
            while True:
                batch = await reader.getmany(timeout_ms=100)
                for records in batch.values():
                    for record in records:
                        answer: Any = codec.decode_as(record.value, "LockPartitionGrant")
                        grant = grant_of(answer)
                        self.answers.append(grant)
                        self.answered_at.append(answer["at_ms"])
                        self.inbox(grant.tx_id).put_nowait(grant)
        finally:
            await reader.stop()

    def inbox(self, tx_id: str) -> asyncio.Queue[PartitionGrant]:
        return self._inbox.setdefault(tx_id, asyncio.Queue())

    def partition_of(self, key: str) -> int:
        return partition_of(key, self.partitions)

    async def send(self, message: PartitionRequest | PartitionRelease) -> None:
        assert self.publisher is not None
        record = partition_record(message, now_ms())
        topic = topics_for(self.settings).lock_requests
        item = Outgoing(topic, message.tx_id, "LockPartitionRequest", record, message.partition)
        await self.publisher.send(item)

    async def acquire(self, tx_id: str, wanted: Mapping[str, LockMode]) -> Acquisition:
        """Ask partition after partition until every one granted; then `tx_id` holds `wanted`."""
        acquisition = Acquisition(tx_id, wanted, self.partition_of)
        request = acquisition.first()
        if request is not None:
            await self.send(request)
        while not acquisition.done:
            grant = await asyncio.wait_for(self.inbox(tx_id).get(), ANSWER_BOUND_S)
            following = acquisition.on_grant(grant)
            if following is not None:
                await self.send(following)
        for other, keys in self.holding.items():
            clash = [k for k in wanted if k in keys and EXCLUSIVE in (wanted[k], keys[k])]
            if clash:
                self.conflicts.append(f"{tx_id} and {other} both hold {clash}")
        self.holding[tx_id] = dict(wanted)
        return acquisition

    async def release(self, acquisition: Acquisition) -> None:
        """Stop holding (before the releases go: a grant they let through cannot arrive earlier), then
        release every partition asked."""
        self.holding.pop(acquisition.tx_id, None)
        for partition in acquisition.asked():
            await self.send(PartitionRelease(acquisition.tx_id, partition))

    def granted_counts(self) -> Counter[tuple[str, int]]:
        """GRANTED answers per (transaction, partition): exactly one each when every answer lands once."""
        return Counter((a.tx_id, a.partition) for a in self.answers if a.granted)


@contextlib.asynccontextmanager
async def lock_driver(settings: Settings) -> AsyncIterator[LockDriver]:
    driver = await LockDriver(settings).start()
    try:
        yield driver
    finally:
        await driver.stop()


def random_transactions(seed: int, count: int, keys: list[str]) -> dict[str, dict[str, LockMode]]:
    """`count` transactions of 1 to 4 of `keys`, each SHARED or EXCLUSIVE (mostly EXCLUSIVE)."""
    rng = random.Random(seed)
    plans = {}
    for n in range(count):
        chosen = rng.sample(keys, rng.randint(1, min(4, len(keys))))
        plans[f"tx-{seed}-{n}"] = {k: SHARED if rng.random() < 0.3 else EXCLUSIVE for k in chosen}
    return plans


async def run_transactions(driver: LockDriver, plans: Mapping[str, Mapping[str, LockMode]]) -> None:
    """Every transaction at once: acquire, then release. Each holds its keys until its release has gone
    through the broker to the partitions, so those who asked meanwhile wait for it."""

    async def one(tx_id: str, wanted: Mapping[str, LockMode]) -> None:
        await driver.release(await driver.acquire(tx_id, wanted))

    await asyncio.gather(*(one(tx, wanted) for tx, wanted in plans.items()))
