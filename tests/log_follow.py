"""Waiting for a record of the log, as the integration tests do instead of sleeping: the first record of a
topic (read from its start) that a predicate accepts, with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from polycommit.bus import make_reader, topic_partitions
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError

WAIT_S = 60.0


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
