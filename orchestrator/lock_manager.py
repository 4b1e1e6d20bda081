"""The lock manager process, partitioned by resource key: `lock-requests` in, `lock-grants` out. I/O only;
the protocol (what a partition answers, how a transaction asks) is orchestrator/lock_partitions.py. Step 2
of docs/lock-partitioning.md; coordinators ask it for sagas when POLYCOMMIT_LOCK_MANAGER=partitioned
(orchestrator/partitioned_locking.py).

- **Partitions.** The members of the group `<prefix>-lock-manager` share the partitions of `lock-requests`;
  a key's locks live in the partition its key hashes to, and each owned partition has one `LockPartition`
  (its keys' `LockTable`). A transaction's requests and releases of one partition travel on that
  partition, so the partition reads them in the order they were sent.
- **A partition's table is a deterministic fold of its log**, and its answers are a function of the log up
  to the record answered: whoever folds the partition gives the same answers at the same offsets. So the
  answers need not be exactly once: each loop publishes its answers (acknowledged by the broker, acks=all)
  and only then may commit the consumed offsets (at most every COMMIT_EVERY_S under load; at once when
  idle). A crash between the two answers some records again after the restart, with the same answers,
  and every reader of `lock-grants` ignores a repeat (`Acquisition.on_grant`, `PartitionedLocking`). A
  zombie member still answering a partition the group moved away can only repeat answers its successor
  gives too, maybe earlier: any GRANTED it sends is justified by releases already in the log. No Kafka
  transaction per loop then: measured with transactions (one per partition and loop, the offsets in them),
  back-to-back commits met CONCURRENT_TRANSACTIONS retries and the broker spent 60 % of a core on them;
  sagas at c=32 ran at 133/s.
- **Restore.** On assignment, the partition is read from its start up to the group's committed offset and
  folded without answering (those answers were acknowledged before that offset was committed); the loop
  answers from there on. Records before that offset delivered again are skipped.
- **Bad records** (undecodable, a request read from a partition it does not name, one naming no key) are
  dead letters; the partition goes on.

Left for the next steps: a snapshot of each table every N records (the restore reads the partition from its
start today, so it grows with the retained log), and lock events of waits for the deadlock detector (sagas
asking in partition order never wait in a cycle; interactive transactions would).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from orchestrator.lock_partitions import LockPartition, PartitionGrant, PartitionRelease, grant_record, message_of
from polycommit import tracing
from polycommit.bus import Outgoing, Publisher, make_consumer, make_reader, read_assigned, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.deadletters import dead_letter
from polycommit.errors import CodecError
from polycommit.events import LockPartitionRequest, now_ms
from polycommit.failpoints import failpoint
from polycommit.group_watch import REJOIN_DEADLINE_S, GroupWatch, quietly, stop_consumer

log = logging.getLogger(__name__)

NAME = "lock-manager"
COMMIT_EVERY_S = 0.1  # under load, offsets at most this often (a crash answers at most this much again)


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
    batches: int = 0  # loops that answered something
    offset_commits: int = 0


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
    """One owned partition: its table and the next offset to answer."""

    table: LockPartition
    next_offset: int
    committed: int  # the group's offset as this member last committed (or restored) it
    # Each waiter's trace context (its request's headers), for the grant a release answers it with later.
    traced: dict[str, tuple[Any, int]] = field(default_factory=dict)  # tx -> (headers, request time ns)


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
        """Run until `stop`; a Kafka failure starts a new session, which restores every partition it is
        given from the committed offsets."""
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
        publisher = Publisher(self.settings, codec=self.codec, client_id=NAME)
        await publisher.start()
        try:
            await consumer.start()
        except BaseException:
            await quietly(NAME, "Kafka producer", publisher.stop())
            raise
        self.owned.clear()
        watch = GroupWatch(consumer, NAME, self.rejoin_deadline_s)
        try:
            if ready is not None:
                ready.set()
            async with watch:
                await self._loop(consumer, publisher, revocations, stop)
        finally:
            self.owned.clear()
            await stop_consumer(consumer, NAME, stuck=watch.fired)
            await quietly(NAME, "Kafka producer", publisher.stop())

    async def _loop(
        self, consumer: AIOKafkaConsumer, publisher: Publisher, revocations: _Revocations, stop: asyncio.Event
    ) -> None:
        committed_at = 0.0
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=self.max_records)
            await self._follow_assignment(consumer, revocations)
            out: list[Outgoing] = []
            for tp, records in batch.items():
                if records and tp in self.owned:
                    out.extend(self._answer(tp, records))
            if out:
                self.stats.batches += 1
                await asyncio.gather(*await publisher.publish(out))  # acknowledged before any offset commit
                failpoint("lock_manager.before_offsets")
            now = time.monotonic()
            if not batch or now - committed_at >= COMMIT_EVERY_S:
                await self._commit_offsets(consumer)
                committed_at = now

    async def _commit_offsets(self, consumer: AIOKafkaConsumer) -> None:
        """Commit how far each owned partition was answered (answers acknowledged already)."""
        offsets = {tp: owned.next_offset for tp, owned in self.owned.items() if owned.next_offset > owned.committed}
        if offsets:
            await consumer.commit(offsets)
            self.stats.offset_commits += 1
            for tp, offset in offsets.items():
                self.owned[tp].committed = offset

    async def _follow_assignment(self, consumer: AIOKafkaConsumer, revocations: _Revocations) -> None:
        assigned = set(consumer.assignment())
        gone = (set(self.owned) - assigned) | (revocations.revoked & set(self.owned))
        revocations.revoked.clear()
        for tp in gone:
            del self.owned[tp]
        for tp in sorted(assigned - set(self.owned)):
            self.owned[tp] = await self._restore(consumer, tp)

    async def _restore(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> _Owned:
        committed = await consumer.committed(tp) or 0
        table = LockPartition(tp.partition)
        folded = await self._fold(tp, committed, table)
        consumer.seek(tp, committed)
        self.stats.restores += 1
        self.stats.restored_records += folded
        log.info("%s: partition %d restored from %d records (%d open)", NAME, tp.partition, folded, len(table.table))
        return _Owned(table, committed, committed)

    async def _fold(self, tp: TopicPartition, end: int, table: LockPartition) -> int:
        """Fold the committed records of `tp` before offset `end` into `table`, answering nothing."""

        def fold(record: Any) -> None:
            with contextlib.suppress(CodecError):  # a dead letter already, committed with its offset
                table.on_message(message_of(self._decode(record), tp.partition))

        if end <= 0:
            return 0
        reader = make_reader(self.settings, f"{NAME}-restore")
        await reader.start()
        try:
            return await read_assigned(reader, [tp], fold, until={tp: end})
        finally:
            await reader.stop()

    def _decode(self, record: Any) -> LockPartitionRequest:
        return cast(LockPartitionRequest, self.codec.decode_as(record.value, "LockPartitionRequest"))

    def _answer(self, tp: TopicPartition, records: Sequence[Any]) -> list[Outgoing]:
        """The answers (and dead letters) to a partition's records, in order."""
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
                message = message_of(self._decode(record), tp.partition)
            except CodecError as exc:
                self.stats.dead_letters += 1
                letter = dead_letter(record, exc, NAME)
                out.append(Outgoing(self.topics.dead_letters, letter["tx_id"] or "", "DeadLetter", letter))
                continue
            if record.headers and not isinstance(message, PartitionRelease):
                owned.traced[message.tx_id] = (record.headers, tracing.record_time_ns(record))
            grants = owned.table.on_message(message)
            out.extend(self._grant_records(owned, grants, at))
            if isinstance(message, PartitionRelease):
                owned.traced.pop(message.tx_id, None)
        return out

    def _grant_records(self, owned: _Owned, grants: Sequence[PartitionGrant], at: int) -> list[Outgoing]:
        out = []
        for grant in grants:
            if grant.granted:
                self.stats.grants += 1
            else:
                self.stats.waits += 1
            # Traced: the answer carries its transaction's context, and a span from its request to this answer.
            headers = None
            if grant.tx_id in owned.traced:
                context, requested_ns = owned.traced[grant.tx_id]
                answered = tracing.span(tracing.LOCK_ANSWER, tracing.parent_of(context), requested_ns, tracing.now_ns())
                headers = tracing.headers_of(answered)
            if grant.granted:
                owned.traced.pop(grant.tx_id, None)
            record = grant_record(grant, at)
            out.append(Outgoing(self.topics.lock_grants, grant.tx_id, "LockPartitionGrant", record, headers=headers))
        return out
