"""Which partition a keyed record goes to: Kafka's default choice (murmur2 of the key's UTF-8 bytes, the
sign bit dropped, modulo the partition count), as the Java client and aiokafka make it, so records keyed
by polycommit and by any other client co-partition. Pure.

aiokafka's `murmur2` reads the key a byte at a time and masks after every operation; this one reads it
a 32-bit word at a time (`struct`) and masks once per product: the same hash (checked against
aiokafka's in tests/unit/test_publisher_partitions.py) in about half the time. The coordinator hashes
several new keys per transaction (lock resources, transaction ids), so that is a few percent of its CPU.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import TypeVar

P = TypeVar("P")  # a partition number, or a TopicPartition

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's MurmurHash2 (org.apache.kafka.common.utils.Utils.murmur2), as an unsigned 32-bit value."""
    length = len(data)
    h = _SEED ^ length
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        base = length - tail
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


@functools.lru_cache(maxsize=1 << 16)
def key_hash(key: str) -> int:
    """The non-negative hash Kafka's default partitioner takes for a key (cached: a transaction's id is
    hashed more than once)."""
    return murmur2(key.encode()) & 0x7FFFFFFF


def partition_of(key: str, partitions: Sequence[P]) -> P:
    """The partition of `partitions` (sorted) a record keyed `key` goes to; a topic of one needs no hash."""
    if len(partitions) == 1:
        return partitions[0]
    return partitions[key_hash(key) % len(partitions)]
