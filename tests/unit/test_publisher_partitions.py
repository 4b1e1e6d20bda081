"""Which partition a keyed record goes to: Kafka's murmur2 choice (as the Java client and aiokafka make it)
on a topic of several partitions, and no hashing at all on a topic of one."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from polycommit import partitioning
from polycommit.bus import Publisher
from polycommit.config import load_settings


async def publisher_knowing(partitions: dict[str, list[int]]) -> Publisher:
    publisher = Publisher(load_settings())  # never started: the partitions are known already
    publisher._partitions.update(partitions)
    return publisher


async def test_a_key_goes_where_the_default_partitioner_sends_it() -> None:
    publisher = await publisher_knowing({"t": [0, 1, 2, 3]})
    keys = [f"tx-{i}" for i in range(200)]
    chosen = [await publisher.partition_for("t", key) for key in keys]
    assert chosen == [DefaultPartitioner()(k.encode(), [0, 1, 2, 3], [0, 1, 2, 3]) for k in keys]
    assert len(set(chosen)) == 4


async def test_a_one_partition_topic_hashes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hash(key: str) -> int:
        raise AssertionError(f"hashed {key!r} for a topic of one partition")

    monkeypatch.setattr(partitioning, "key_hash", no_hash)
    publisher = await publisher_knowing({"one": [0]})
    assert await publisher.partition_for("one", "tx-1") == 0


@given(st.binary(max_size=80))
def test_the_word_at_a_time_murmur2_is_kafkas(data: bytes) -> None:
    assert partitioning.murmur2(data) == murmur2(data) & 0xFFFFFFFF


def test_murmur2_of_known_keys() -> None:
    # Values the Java client gives (org.apache.kafka.common.utils.UtilsTest): a wrong port fails even if
    # aiokafka's copy were wrong the same way.
    assert partitioning.murmur2(b"21") == -973932308 & 0xFFFFFFFF
    assert partitioning.murmur2(b"foobar") == -790332482 & 0xFFFFFFFF
    assert partitioning.murmur2(b"a-little-bit-long-string") == -985981536 & 0xFFFFFFFF
    assert partitioning.murmur2(b"") == 275646681
