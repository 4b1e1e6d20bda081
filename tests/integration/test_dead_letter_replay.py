"""`polycommit dead-letters replay` on the real servers: a fixed cause completes, a broken record comes back once.

The fixed case: an intent whose reply topic did not exist is a dead letter; once the topic exists, its
replay completes. The broken case: garbage bytes replayed make exactly one new dead letter, which names
the letter it replayed. A second replay of a letter is refused unless --force.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka.admin import NewTopic
from test_intent_admission import POLICY, records_for, send_raw_intent
from test_operator_commands import cli

from polycommit.bus import Publisher, topics_for
from polycommit.config import Settings
from polycommit.kafka_client import make_admin
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers
DEADLINE = 30.0


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(topics, stores=("postgres",), policy=POLICY)
    await rt.start()
    yield rt
    await rt.stop()


async def letter_of(settings: Settings, tx_id: str) -> dict[str, Any]:
    """The dead letter of `tx_id` as `polycommit dead-letters --json` lists it (with its id)."""

    async def poll() -> dict[str, Any]:
        while True:
            code, letters = await cli(settings, "dead-letters", "--limit", "0", "--json")
            assert code == 0
            found = [letter for letter in letters if letter["tx_id"] == tx_id]
            if found:
                return dict(found[0])

    return await asyncio.wait_for(poll(), DEADLINE)


async def test_a_fixed_dead_letter_replays_to_completion_once(runtime: Runtime) -> None:
    settings = runtime.settings
    reply_topic = f"{settings.topic_prefix}.later-{uuid.uuid4().hex[:6]}"
    tx_id = await send_raw_intent(settings, reply_topic)
    letter = await letter_of(settings, tx_id)
    assert letter["error_class"] == "InvalidReplyToError" and letter["id"].startswith("dead-letters/")
    admin = make_admin(settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(reply_topic, num_partitions=1, replication_factor=1)])
        code, rows = await cli(settings, "dead-letters", "replay", "--id", letter["id"], "--json")
        assert code == 0 and [r["status"] for r in rows] == ["replayed"], rows

        async def completed() -> list[dict[str, Any]]:
            while True:
                found = await records_for(settings, topics_for(settings).results, lambda r: r["tx_id"] == tx_id)
                if any(r["status"] == "COMPLETED" for r in found):
                    return found

        results = await asyncio.wait_for(completed(), DEADLINE)
        assert [r["status"] for r in results] == ["FAILED", "COMPLETED"]
        code, rows = await cli(settings, "dead-letters", "replay", "--id", letter["id"], "--json")
        assert code == 1 and rows[0]["status"] == "refused" and "replayed before" in rows[0]["reason"]
    finally:
        await admin.delete_topics([reply_topic])
        await admin.close()


async def test_a_still_broken_record_replayed_is_dead_lettered_exactly_once_more(runtime: Runtime) -> None:
    settings = runtime.settings
    key = f"garbage-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(settings)
    await publisher.start()
    try:
        await publisher.producer.send_and_wait(topics_for(settings).intents, uuid.uuid4().bytes * 3, key=key.encode())
    finally:
        await publisher.stop()
    letter = await letter_of(settings, key)
    assert letter["error_class"] == "CorruptEventError" and letter["replay_of"] == ""
    code, rows = await cli(settings, "dead-letters", "replay", "--id", letter["id"], "--json")
    assert code == 0 and rows[0]["status"] == "replayed"

    async def replayed_letters() -> list[dict[str, Any]]:
        while True:
            found = await records_for(
                settings, topics_for(settings).dead_letters, lambda d: d["replay_of"] == letter["id"]
            )
            if found:
                return found

    again = await asyncio.wait_for(replayed_letters(), DEADLINE)
    assert len(again) == 1
    assert (again[0]["tx_id"], again[0]["error_class"]) == (key, "CorruptEventError")
    # Nothing replays by itself: only the first letter's replay happened, and the new letter is new work.
    code, rows = await cli(settings, "dead-letters", "replay", "--id", letter["id"], "--json")
    assert code == 1 and "replayed before" in rows[0]["reason"]
