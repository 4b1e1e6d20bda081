"""The event log on Kafka: topic names, topic creation, and a batching publisher around the Avro codec.

Every record is keyed by transaction id, so one transaction's events stay in one partition and in order.
Producers are idempotent with acks=all. Publishing builds one record batch per partition
(`create_batch`/`send_batch`), several times faster than a `send` per record on this kind of machine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import TopicAlreadyExistsError

from polycommit import acls
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.events import STORES
from polycommit.kafka_client import client_security as client_security
from polycommit.kafka_client import make_admin as make_admin
from polycommit.log_reader import make_reader as make_reader
from polycommit.log_reader import read_assigned as read_assigned
from polycommit.log_reader import read_topic as read_topic
from polycommit.log_reader import topic_partitions as topic_partitions
from polycommit.partitioning import partition_of

MAX_RECORD_BYTES = 4 * 1024 * 1024  # the broker's message.max.bytes; bigger intents are refused at the producer


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (`polycommit.` by default)."""

    prefix: str = "polycommit"

    @property
    def intents(self) -> str:
        return f"{self.prefix}.intents"

    def commands(self, store: str) -> str:
        return f"{self.prefix}.commands.{store}"

    @property
    def outcomes(self) -> str:
        return f"{self.prefix}.outcomes"

    @property
    def results(self) -> str:
        return f"{self.prefix}.results"

    @property
    def replies(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def tx_state(self) -> str:
        return f"{self.prefix}.tx-state"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}.decisions"

    @property
    def locks(self) -> str:
        return f"{self.prefix}.locks"

    @property
    def lock_requests(self) -> str:
        """The lock manager's input, partitioned by resource key (orchestrator/lock_manager.py)."""
        return f"{self.prefix}.lock-requests"

    @property
    def lock_grants(self) -> str:
        """The lock manager's answers, keyed by tx id: they reach the transaction's coordinator member."""
        return f"{self.prefix}.lock-grants"

    @property
    def deadlocks(self) -> str:
        return f"{self.prefix}.deadlocks"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    def all(self) -> list[str]:
        return [
            self.intents,
            *(self.commands(s) for s in STORES),
            self.outcomes,
            self.results,
            self.replies,
            self.tx_state,
            self.decisions,
            self.locks,
            self.lock_requests,
            self.lock_grants,
            self.deadlocks,
            self.alerts,
            self.dead_letters,
        ]

    def coordinator_inputs(self) -> list[str]:
        """Topics the coordinator consumes; they share a partition count so one member owns a tx's events."""
        return [self.intents, self.outcomes]


def topics_for(settings: Settings) -> Topics:
    return Topics(settings.topic_prefix)


# Partitions a topic gets unless told otherwise (`polycommit topics create --partitions NAME=N`). Every
# Kafka transaction writes a commit marker to each partition it touched, and each partition is one more
# fetch for its readers, so partitions that buy no parallelism cost latency. One coordinator member is
# active (orchestrator/members.py) and a store has one consumer until an operator adds more, so the
# coordinator's inputs and the command topics start with one partition (measured: 3000 sagas at c=32,
# four runs each, alternated: 390 against 323 TPS, p99 142 against 203 ms, with four); so do the lock
# events, which only the active member's one lock table writes (keyed by resource, so a partitioned lock
# manager can be given more); the fan-out topics (replies routed to clients, results, alerts, ...) keep
# several. Scale a store's group by creating its command topic with as many partitions as consumers, before
# the first start: a count changed later moves transactions' keys to other partitions while their commands
# are in flight.
DEFAULT_PARTITIONS = 4
SINGLE_OWNER_PARTITIONS = 1


def partition_counts(topics: Topics, wanted: Mapping[str, int] | None = None) -> dict[str, int]:
    """Each topic's partition count: `wanted` (short or full names) first, else its default. The
    coordinator's inputs, its changelog and the verdicts it reads share the intents' count, so the member
    that owns a transaction's intent also owns its outcomes, its snapshot and its verdicts."""
    asked = dict(wanted or {})
    single_owner = {topics.intents, topics.locks, *(topics.commands(store) for store in STORES)}

    def count(name: str) -> int:
        default = SINGLE_OWNER_PARTITIONS if name in single_owner else DEFAULT_PARTITIONS
        return int(asked.get(name, asked.get(name.removeprefix(topics.prefix + "."), default)))

    coordinator = count(topics.intents)
    shared = (topics.outcomes, topics.tx_state, topics.deadlocks, topics.lock_grants)
    return {name: coordinator if name in shared else count(name) for name in topics.all()}


def topic_configs(topics: Topics, name: str) -> dict[str, str]:
    configs = {"max.message.bytes": str(MAX_RECORD_BYTES)}
    if name == topics.tx_state:
        # The coordinator's changelog: only the latest snapshot of each transaction matters.
        # Tombstones (finished transactions) need not outlive a minute: a restore reads what is left, so
        # the changelog is kept near "what is in flight", and recovery time follows that, not history.
        configs |= {
            "cleanup.policy": "compact",
            "min.cleanable.dirty.ratio": "0.1",
            "segment.ms": "60000",
            "max.compaction.lag.ms": "60000",
            "delete.retention.ms": "60000",
        }
    return configs


def prefix_grants(settings: Settings) -> list[acls.Grant]:
    """The ACLs of the topic prefix in use, for the role principals of `settings` (polycommit/acls.py)."""
    users = {role: credentials.username for role, credentials in settings.kafka.roles.items()}
    return acls.role_grants(topics_for(settings), users, STORES)


async def create_topics(settings: Settings, partitions: dict[str, int] | None = None) -> dict[str, str]:
    """Create every polycommit topic that is missing. `partitions` maps a topic's short or full name to
    its partition count; the coordinator's input topics and its changelog always get the same count."""
    topics = topics_for(settings)
    counts = partition_counts(topics, partitions)
    admin = make_admin(settings, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # Three copies where the cluster has three brokers (min.insync.replicas 2 comes from the broker).
        factor = min(3, len((await admin.describe_cluster()).get("brokers", [])) or 1)
        report: dict[str, str] = {}
        new = []
        for name, n in counts.items():
            if name in existing:
                report[name] = "exists"
                continue
            configs = topic_configs(topics, name)
            new.append(NewTopic(name, num_partitions=n, replication_factor=factor, topic_configs=configs))
            report[name] = f"created ({n} partitions, {factor} replicas)"
        if new:
            # A concurrent creator may win: the topic is there, which is all we need.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
        if settings.kafka.sasl:
            await acls.grant(admin, prefix_grants(settings))
        return report
    finally:
        await admin.close()


async def delete_topics(settings: Settings) -> None:
    topics = topics_for(settings)
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [t for t in topics.all() if t in existing]
        if names:
            await admin.delete_topics(names)
        if settings.kafka.sasl:  # the prefix's ACLs go with its topics (create_topics made them)
            await acls.revoke(admin, prefix_grants(settings))
    finally:
        await admin.close()


_Record = tuple[bytes, bytes | None, Sequence[tuple[str, bytes]] | None]  # key, value, headers


_NO_HEADERS: list[tuple[str, bytes]] = []  # shared, never mutated: an untraced record allocates nothing


def _listed(headers: Sequence[tuple[str, bytes]] | None) -> list[tuple[str, bytes]]:
    """aiokafka's compiled batch builder takes a list only."""
    return _NO_HEADERS if not headers else list(headers)


@dataclass(frozen=True)
class Outgoing:
    """One record to publish: an event (or a tombstone when `record` is None) keyed by transaction id."""

    topic: str
    key: str
    event_type: str
    record: Any
    partition: int | None = None
    encoded: bytes | None = None  # the record already encoded (one event published to several topics)
    headers: Sequence[tuple[str, bytes]] | None = None  # the W3C trace context, when traced (polycommit.tracing)


def encoded(codec: EventCodec, item: Outgoing) -> bytes | None:
    """The bytes a record is published as: encoded already (one event for several topics), a tombstone's
    None, or its event encoded now."""
    if item.encoded is not None:
        return item.encoded
    return None if item.record is None else codec.encode(item.event_type, item.record)


class Publisher:
    """An idempotent (optionally transactional) producer that encodes events and sends them in batches."""

    def __init__(
        self,
        settings: Settings,
        *,
        transactional_id: str | None = None,
        codec: EventCodec | None = None,
        client_id: str = "polycommit",
        # No fixed wait: a batch forms from what is ready. Batches built here are closed (sent at once);
        # records sent one by one (`send`) still share a request while the previous one is in flight.
        # Measured for intents (one `send` each, ack awaited): linger 1 ms gave p50 2.1 ms at concurrency 1
        # and 4.3 ms at 32; linger 0, 0.6 ms and 1.4 ms, with no loss of throughput at 256.
        linger_ms: int = 0,
    ) -> None:
        self.codec = codec or default_codec()
        self.producer = AIOKafkaProducer(
            **client_security(settings),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            transactional_id=transactional_id,
            linger_ms=linger_ms,
            max_request_size=MAX_RECORD_BYTES,
            max_batch_size=1024 * 1024,
            request_timeout_ms=30000,
        )
        self._partitions: dict[str, list[int]] = {}

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def partitions(self, topic: str) -> list[int]:
        known = self._partitions.get(topic)
        if known is None:
            found = await self.producer.partitions_for(topic)
            known = self._partitions[topic] = sorted(found)
        return known

    async def partition_for(self, topic: str, key: str) -> int:
        # The same murmur2 choice the Java client and aiokafka make, so keyed records co-partition
        # (polycommit/partitioning.py). A topic of one partition (the default for every topic on the path)
        # needs no hash.
        return partition_of(key, await self.partitions(topic))

    def encode(self, item: Outgoing) -> bytes | None:
        return encoded(self.codec, item)

    async def publish(self, items: Sequence[Outgoing]) -> list[asyncio.Future[Any]]:
        """Queue records in per-partition batches; await the returned futures for the broker's ack."""
        grouped: dict[tuple[str, int], list[_Record]] = {}
        for item in items:
            partition = item.partition
            if partition is None:
                partition = await self.partition_for(item.topic, item.key)
            grouped.setdefault((item.topic, partition), []).append((item.key.encode(), self.encode(item), item.headers))
        futures: list[asyncio.Future[Any]] = []
        for (topic, partition), records in grouped.items():
            futures.extend(await self._send_records(topic, partition, records))
        return futures

    async def _send_records(self, topic: str, partition: int, records: Iterable[_Record]) -> list[asyncio.Future[Any]]:
        futures = []
        batch = self.producer.create_batch()
        for key, value, headers in records:
            if batch.append(timestamp=None, key=key, value=value, headers=_listed(headers)) is None:
                futures.append(await self._send_closed(batch, topic, partition))
                batch = self.producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value, headers=_listed(headers)) is None:
                    raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch")
        if batch.record_count():
            futures.append(await self._send_closed(batch, topic, partition))
        return futures

    async def _send_closed(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        # A batch built here is complete: closed, it goes out at once. Left open, aiokafka's sender lets
        # it linger `linger_ms` for records that will never come (a fixed wait on every publish).
        batch.close()
        future: asyncio.Future[Any] = await self.producer.send_batch(batch, topic, partition=partition)
        return future

    async def send(self, item: Outgoing) -> None:
        """Send one record through the producer's accumulator (which batches concurrent senders) and
        wait for the broker's ack: the path for intents, published one by one by many callers."""
        partition = item.partition
        if partition is None:  # chosen here, where a one-partition topic skips aiokafka's murmur2
            partition = await self.partition_for(item.topic, item.key)
        future = await self.producer.send(
            item.topic, self.encode(item), key=item.key.encode(), partition=partition, headers=_listed(item.headers)
        )
        await future

    async def publish_and_wait(self, items: Sequence[Outgoing]) -> None:
        futures = await self.publish(items)
        if futures:
            await asyncio.gather(*futures)


FETCH_MAX_WAIT_MS = 500  # see make_consumer


def make_consumer(
    settings: Settings,
    *topics: str,
    group_id: str | None,
    client_id: str = "polycommit",
    auto_offset_reset: str = "earliest",
    max_poll_records: int | None = None,
    instance_id: str | None = None,
    assignors: Sequence[Any] = (RangePartitionAssignor,),
) -> AIOKafkaConsumer:
    """A read_committed consumer with manual offset commits (the caller commits after acting).

    With `instance_id` it is a *static* member (KIP-345): a process restarted under the same name gets
    its partitions back at once instead of after the session timeout, which is most of the recovery time
    after a kill -9. Two live processes must never share one."""
    return AIOKafkaConsumer(
        *topics,
        **client_security(settings),
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset=auto_offset_reset,
        # Range assignment gives one member the same partition number of every input topic, so the
        # coordinator that owns a transaction's intent also owns its outcomes (see also members.py).
        partition_assignment_strategy=tuple(assignors),
        max_poll_records=max_poll_records,
        # How long the broker holds a fetch that finds nothing new; a record (or the marker of a committed
        # transaction) ends the wait at once, so this is never latency, only how often an idle consumer
        # asks again. At 20 ms each idle consumer cost the broker and itself 50 fetches a second, CPU taken
        # from the transactions on a small machine: 500 (Kafka's default) measured c=1 p50 24-26 vs 28-31 ms
        # (3 of 3 rounds), c=32 401 vs 383 TPS (median of 5), the broker's CPU 15-35 % lower.
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        group_instance_id=instance_id,
        # The broker's minimum (group.min.session.timeout.ms): a dead member's partitions move on soonest.
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_partition_fetch_bytes=MAX_RECORD_BYTES,
    )
