"""Waiting for a record of the log, as the integration tests do instead of sleeping: the first record of a
topic (read from its start) that a predicate accepts, with a deadline. Also planting one (`publish`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer

from polycommit.bus import make_reader, topic_partitions
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.kafka_client import client_security

WAIT_S = 60.0


async def publish(settings: Settings, topic: str, tx_id: str, event_type: str, record: Mapping[str, Any]) -> None:
    """Plant one event on `topic`, keyed by `tx_id`, acked by the broker: what a part of polycommit (or a
    producer of another language) would have written."""
    producer = AIOKafkaProducer(**client_security(settings), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, default_codec().encode(event_type, record), key=tx_id.encode())
    finally:
        await producer.stop()


async def follow(settings: Settings, topic: str, event_type: str, wanted: Callable[[dict[str, Any]], bool]) -> Any:
    """The first record of `topic` (from its start) that `wanted` accepts, waiting for it as it arrives."""
    codec = default_codec()
    reader = make_reader(settings, "follow-test")
    await reader.start()
    try:
        tps = await topic_partitions(reader, topic)
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        async with asyncio.timeout(WAIT_S):
            while True:
                for records in (await reader.getmany(timeout_ms=200)).values():
                    for record in records:
                        try:
                            event = codec.decode_as(record.value, event_type)
                        except CodecError:
                            continue  # another test's poison record on the session's topics
                        if wanted(event):
                            return event
    except TimeoutError:
        raise AssertionError(f"no {event_type} on {topic} as wanted within {WAIT_S}s") from None
    finally:
        await reader.stop()
