"""Reading the log from the start to its current end, without a consumer group: moves nobody's offsets.

Every fold of the log (the coordinator's restore, `status`, `recover`, `tx show`, the checker) reads
through here, read_committed, so an aborted Kafka transaction is never seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from polycommit.config import Settings
from polycommit.kafka_client import client_security


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of `topic`, asking the broker when this consumer has no metadata for it yet."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        # A group-less consumer learns topics only once assigned; ask the cluster (what the public
        # `topics()` does, keeping the partitions it drops).
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(partitions)]


def make_reader(settings: Settings, client_id: str, fetch_max_wait_ms: int = 100) -> AIOKafkaConsumer:
    """A group-less read_committed consumer: the caller assigns partitions; it moves nobody's offsets."""
    return AIOKafkaConsumer(
        **client_security(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        client_id=client_id,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )


async def read_topic(
    settings: Settings, topic: str, handle: Callable[[Any], None], partitions: Iterable[int] | None = None
) -> int:
    """Call `handle` on every committed record of `topic` (or of some of its partitions), from the start
    to the end it has now, with a group-less consumer: reading moves nobody's offsets."""
    reader = make_reader(settings, "polycommit-inspect")
    await reader.start()
    try:
        tps = await topic_partitions(reader, topic)
        if partitions is not None:
            wanted = set(partitions)
            tps = [tp for tp in tps if tp.partition in wanted]
        return await read_assigned(reader, tps, handle)
    finally:
        await reader.stop()


async def read_assigned(
    reader: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    handle: Callable[[Any], None],
    until: Mapping[TopicPartition, int] | None = None,
) -> int:
    """Call `handle` on every committed record of the partitions `tps`, from the start to the end they
    have now (or, for a partition in `until`, to that offset, excluded), with a started group-less `reader`
    (`make_reader`); returns how many records it read."""
    if not tps:
        return 0
    reader.assign(list(tps))
    await reader.seek_to_beginning(*tps)
    end = await reader.end_offsets(list(tps))
    end = {tp: min(end[tp], (until or {}).get(tp, end[tp])) for tp in tps}
    remaining = {tp for tp in tps if end[tp] > 0}
    count = 0
    while remaining:
        batch = await reader.getmany(*remaining, timeout_ms=500, max_records=5000)
        for tp, records in batch.items():
            for record in records:
                if record.offset >= end[tp]:
                    break
                handle(record)
                count += 1
        for tp in list(remaining):
            if await reader.position(tp) >= end[tp]:
                remaining.discard(tp)
    return count
