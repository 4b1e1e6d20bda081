"""The lock manager process, partitioned by resource key: `lock-requests` in, `lock-grants` out, each answer
exactly once. I/O only; the protocol (what a partition answers, how a transaction asks) is
orchestrator/lock_partitions.py. Step 2 of docs/lock-partitioning.md; coordinators ask it for sagas when
POLYCOMMIT_LOCK_MANAGER=partitioned (orchestrator/partitioned_locking.py).

- **Partitions.** The members of the group `<prefix>-lock-manager` share the partitions of `lock-requests`;
  a key's locks live in the partition its key hashes to, and each owned partition has one `LockPartition`
  (its keys' `LockTable`). A transaction's requests and releases of one partition travel on that
  partition, so the partition reads them in the order they were sent.
- **Exactly once, per partition.** Each owned partition has a transactional producer under the partition's
  own id, `<prefix>-lock-manager-p<N>`. A loop answers each partition's records in one Kafka transaction
  of that producer: the answers, any dead letters, and the consumed offset
  (`send_offsets_to_transaction`). Opening a partition's producer fences whoever owned the partition
  before and aborts its open transaction, so a zombie's late answers never land. (Kafka's per-group
  fencing of KIP-447 would need the group generation in the offset commit, which aiokafka does not send;
  one id per input partition is the fencing that works without it.)
- **Restore.** A partition's table is a fold of its records, and the answers to every record before the
  group's committed offset were committed with that offset. On assignment, after its producer is open
  (the fence first: a predecessor's transaction in flight is aborted, not committed after the offset is
  read), the partition is read from its start up to the committed offset and folded without answering;
  the loop answers from there on. Records before that offset delivered again are skipped.
- **Bad records** (undecodable, a request read from a partition it does not name, one naming no key) are
  dead letters, committed with the offsets; the partition goes on.

Left for the next steps: a snapshot of each table every N records (the restore reads the partition from its
start today, so it grows with the retained log), lock events for the deadlock detector, and the coordinator
asking it (its `locking` phases fed by grants).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from orchestrator.lock_partitions import LockPartition, PartitionGrant, grant_record, message_of
from polycommit.bus import Outgoing, Publisher, make_consumer, make_reader, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.deadletters import dead_letter
from polycommit.errors import CodecError
from polycommit.events import LockPartitionRequest, now_ms
from polycommit.failpoints import failpoint
from polycommit.group_watch import REJOIN_DEADLINE_S, GroupWatch, quietly, stop_consumer

log = logging.getLogger(__name__)

NAME = "lock-manager"


def partition_transactional_id(topic_prefix: str, partition: int) -> str:
    return f"{topic_prefix}-{NAME}-p{partition}"


@dataclass
class LockManagerStats:
    records: int = 0
    grants: int = 0  # answers GRANTED
    waits: int = 0  # answers WAITING
    dead_letters: int = 0
    restores: int = 0  # partitions restored (assignments)
    restored_records: int = 0
    skipped: int = 0  # records before a restored partition's offset, delivered again
    restarts: int = 0


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    """Notes the partitions a rebalance takes away. The loop drops their tables before its next batch, so
    a partition given back by the same rebalance is restored from its committed offset, never trusted
    from memory (another member may have answered for it in between)."""

    def __init__(self) -> None:
        self.revoked: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.revoked.update(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        return None


@dataclass
class _Owned:
    """One owned partition: its table, its producer, the next offset to answer."""

    table: LockPartition
    publisher: Publisher
    next_offset: int


class LockManagerService:
    def __init__(self, settings: Settings, *, codec: EventCodec | None = None, max_records: int = 2000) -> None:
        self.settings = settings
        self.codec = codec or default_codec()
        self.topics = topics_for(settings)
        self.group_id = f"{settings.topic_prefix}-{NAME}"
        self.max_records = max_records
        self.stats = LockManagerStats()
        self.owned: dict[TopicPartition, _Owned] = {}
        self.rejoin_deadline_s = REJOIN_DEADLINE_S
        # Named (POLYCOMMIT_CONSUMER_INSTANCE, as the store consumers are), a static group member: restarted
        # after a kill -9 it gets its partitions back at once, not after the session timeout (6 s), while
        # every saga waiting for a lock of those partitions waits with it. Two live processes need two names.
        instance = settings.consumer_instance
        self.instance_id = f"{NAME}-{instance}" if instance else None

    def partition(self, number: int) -> LockPartition | None:
        """The table of an owned partition (for inspection and tests)."""
        owned = self.owned.get(TopicPartition(self.topics.lock_requests, number))
        return None if owned is None else owned.table

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until `stop`; a Kafka failure (a fenced producer among them) starts a new session, which
        restores every partition it is given from the committed offsets."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._session(stop, ready)
            except (KafkaError, OSError) as exc:
                self.stats.restarts += 1
                log.warning("%s session failed (%s: %s); restarting in %.1fs", NAME, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)  # backoff while the broker comes back
                delay = min(delay * 2, 10.0)
            else:
                return

    async def _session(self, stop: asyncio.Event, ready: asyncio.Event | None) -> None:
        consumer = make_consumer(self.settings, group_id=self.group_id, client_id=NAME, instance_id=self.instance_id)
        revocations = _Revocations()
        consumer.subscribe([self.topics.lock_requests], listener=revocations)
        await consumer.start()
        watch = GroupWatch(consumer, NAME, self.rejoin_deadline_s)
        try:
            if ready is not None:
                ready.set()
            async with watch:
                while not stop.is_set():
                    batch = await consumer.getmany(timeout_ms=100, max_records=self.max_records)
                    await self._follow_assignment(consumer, revocations)
                    answering = {tp: records for tp, records in batch.items() if records and tp in self.owned}
                    if answering:
                        await asyncio.gather(*(self._answer(tp, records) for tp, records in answering.items()))
        finally:
            await self._drop(set(self.owned))
            await stop_consumer(consumer, NAME, stuck=watch.fired)

    async def _follow_assignment(self, consumer: AIOKafkaConsumer, revocations: _Revocations) -> None:
        assigned = set(consumer.assignment())
        gone = (set(self.owned) - assigned) | (revocations.revoked & set(self.owned))
        revocations.revoked.clear()
        await self._drop(gone)
        for tp in sorted(assigned - set(self.owned)):
            self.owned[tp] = await self._restore(consumer, tp)

    async def _drop(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            owned = self.owned.pop(tp)
            await quietly(NAME, f"producer of partition {tp.partition}", owned.publisher.stop())

    async def _restore(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> _Owned:
        transactional_id = partition_transactional_id(self.settings.topic_prefix, tp.partition)
        publisher = Publisher(self.settings, transactional_id=transactional_id, codec=self.codec, client_id=NAME)
        await publisher.start()  # InitProducerId: fences the partition's previous owner, aborts its transaction
        try:
            committed = await consumer.committed(tp) or 0
            table = LockPartition(tp.partition)
            folded = await self._fold(tp, committed, table)
        except BaseException:
            await quietly(NAME, f"producer of partition {tp.partition}", publisher.stop())
            raise
        consumer.seek(tp, committed)
        self.stats.restores += 1
        self.stats.restored_records += folded
        log.info("%s: partition %d restored from %d records (%d open)", NAME, tp.partition, folded, len(table.table))
        return _Owned(table, publisher, committed)

    async def _fold(self, tp: TopicPartition, end: int, table: LockPartition) -> int:
        """Fold the committed records of `tp` before offset `end` into `table`, answering nothing."""
        if end <= 0:
            return 0
        reader = make_reader(self.settings, f"{NAME}-restore")
        await reader.start()
        try:
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            count = 0
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=500, max_records=5000)
                for record in batch.get(tp, []):
                    if record.offset >= end:
                        break
                    count += 1
                    with contextlib.suppress(CodecError):  # a dead letter already, committed with its offset
                        table.on_message(message_of(self._decode(record), tp.partition))
            return count
        finally:
            await reader.stop()

    def _decode(self, record: Any) -> LockPartitionRequest:
        return cast(LockPartitionRequest, self.codec.decode_as(record.value, "LockPartitionRequest"))

    async def _answer(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        owned = self.owned[tp]
        out: list[Outgoing] = []
        at = now_ms()
        for record in records:
            if record.offset < owned.next_offset:
                self.stats.skipped += 1
                continue
            self.stats.records += 1
            owned.next_offset = record.offset + 1
            try:
                grants = owned.table.on_message(message_of(self._decode(record), tp.partition))
            except CodecError as exc:
                self.stats.dead_letters += 1
                letter = dead_letter(record, exc, NAME)
                out.append(Outgoing(self.topics.dead_letters, letter["tx_id"] or "", "DeadLetter", letter))
                continue
            out.extend(self._grant_records(grants, at))
        await self._commit(owned, out, {tp: owned.next_offset})

    def _grant_records(self, grants: Sequence[PartitionGrant], at: int) -> list[Outgoing]:
        out = []
        for grant in grants:
            if grant.granted:
                self.stats.grants += 1
            else:
                self.stats.waits += 1
            out.append(Outgoing(self.topics.lock_grants, grant.tx_id, "LockPartitionGrant", grant_record(grant, at)))
        return out

    async def _commit(self, owned: _Owned, out: list[Outgoing], offsets: Mapping[TopicPartition, int]) -> None:
        """One Kafka transaction of the partition's producer: the answers, then the consumed offset."""
        producer = owned.publisher.producer
        await producer.begin_transaction()
        try:
            await owned.publisher.publish(out)
            await producer.send_offsets_to_transaction(dict(offsets), self.group_id)
            failpoint("lock_manager.before_commit")
            await producer.commit_transaction()
        except BaseException:
            # The session ends (the caller's restart): a new one fences this producer and restores the
            # partition from the last committed offset, so nothing of this transaction counts.
            await quietly(NAME, "abort", producer.abort_transaction())
            raise
