"""Intents whose transport fields are wrong, sent by any producer straight to the intents topic, on the real
servers: a `reply_to` that does not exist or is one of polycommit's own (or Kafka's) topics, a Kafka key
that is not the transaction id. Each ends `failed` with its typed error (result on `results`) and a dead
letter, and the coordinator goes on: a valid intent sent after it still completes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import Publisher, Topics, read_topic, topics_for
from polycommit.client import Coordinator, Saga
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers
POLICY = SagaPolicy(default_timeout_ms=5000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
DEADLINE = 30.0


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(topics, stores=("postgres",), policy=POLICY)
    await rt.start()
    yield rt
    await rt.stop()


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with Coordinator(runtime.settings, timeout=DEADLINE) as coordinator:
        yield coordinator


async def records_for(settings: Settings, topic: str, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Decoded records of `topic` (read to its current end) that `keep` selects."""
    codec = default_codec()
    found: list[dict[str, Any]] = []

    def handle(record: Any) -> None:
        try:
            value = codec.decode(record.value).record
        except CodecError:
            return
        if keep(value):
            found.append(value)

    await read_topic(settings, topic, handle)
    return found


async def first_record(settings: Settings, topic: str, tx_id: str, what: str) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            found = await records_for(settings, topic, lambda r: r.get("tx_id") == tx_id)
            if found:
                return found[0]

    try:
        return await asyncio.wait_for(poll(), DEADLINE)
    except TimeoutError:
        raise AssertionError(f"no {what} for {tx_id} on {topic} within {DEADLINE}s") from None


async def send_raw_intent(settings: Settings, reply_to: str, key: bytes | str | None = "tx id") -> str:
    """Publish a one-step intent as a foreign producer would; `key` "tx id" keys it correctly."""
    saga = Saga("admission").step(ops.sql("SELECT 1"))
    value = default_codec().encode("TransactionIntent", saga.intent(reply_to, "foreign producer"))
    record_key = saga.tx_id.encode() if key == "tx id" else key
    publisher = Publisher(settings)
    await publisher.start()
    try:
        await publisher.producer.send_and_wait(topics_for(settings).intents, value, key=record_key)
    finally:
        await publisher.stop()
    return saga.tx_id


async def assert_refused(settings: Settings, tx_id: str, error_class: str, client: Coordinator) -> None:
    names = topics_for(settings)
    result = await first_record(settings, names.results, tx_id, "result")
    assert result["status"] == "FAILED", result
    assert result["error"] is not None and result["error"]["error_class"] == error_class, result
    letter = await first_record(settings, names.dead_letters, tx_id, "dead letter")
    assert letter["error_class"] == error_class and letter["original_topic"] == names.intents
    after = await client.execute(Saga("after a refused intent").step(ops.sql("SELECT 1")))
    assert after.status == "completed", after


REPLY_TOS: dict[str, Callable[[Topics], str]] = {
    "a topic that does not exist": lambda t: f"{t.prefix}.no-such-topic-{uuid.uuid4().hex[:6]}",
    "a partition that does not exist": lambda t: f"{t.replies}:99",
    "the coordinator's changelog": lambda t: t.tx_state,
    "a store's command topic": lambda t: f"{t.commands('postgres')}:0",
    "the intents topic": lambda t: t.intents,
    "Kafka's own offsets topic": lambda t: "__consumer_offsets",
}


@pytest.mark.parametrize("case", list(REPLY_TOS))
async def test_a_bad_reply_to_fails_the_transaction_and_the_coordinator_goes_on(
    runtime: Runtime, client: Coordinator, case: str
) -> None:
    reply_to = REPLY_TOS[case](topics_for(runtime.settings))
    tx_id = await send_raw_intent(runtime.settings, reply_to)
    await assert_refused(runtime.settings, tx_id, "InvalidReplyToError", client)


async def test_an_intent_keyed_by_something_else_than_its_tx_id_is_refused(
    runtime: Runtime, client: Coordinator
) -> None:
    tx_id = await send_raw_intent(runtime.settings, "", key=b"customer-42")
    await assert_refused(runtime.settings, tx_id, "InvalidIntentKeyError", client)


async def test_an_intent_without_a_key_is_refused(runtime: Runtime, client: Coordinator) -> None:
    tx_id = await send_raw_intent(runtime.settings, "", key=None)
    await assert_refused(runtime.settings, tx_id, "InvalidIntentKeyError", client)
