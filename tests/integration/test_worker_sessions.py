"""Faults around a store consumer's sessions do not end the consumer (both found by chaos runs, where the
PostgreSQL consumer exited 1):

- a store that fails while a session starts (the server killed and restarting): the participant's start
  turns an outage at any point into StoreUnavailableError, leaving no pool open, and the worker waits and
  starts again, then applies what comes;
- a close that fails in the `finally` of a session that ended (uvloop's RuntimeError for a transport
  already closed, after the group watch ended a session stuck since a broker restart): logged, and the
  next session starts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError
from workers import ConsumersMade, OutcomesSeen, leave_stuck, publishing, running, send_commands

from consumers import worker as worker_module
from consumers.postgres import PostgresParticipant, settlement
from consumers.worker import StoreWorker
from polycommit import operations as ops
from polycommit.bus import make_consumer
from polycommit.config import Settings
from polycommit.errors import StoreUnavailableError
from polycommit.events import store_command

TABLE = "outage_at_start_rows"
pytestmark = pytest.mark.servers


def failing_settlement(error: BaseException) -> Any:
    async def settle(*args: Any, **kwargs: Any) -> Any:
        raise error

    return settle


async def test_the_server_dying_during_the_start_is_an_outage_and_leaves_no_pool(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    participant = PostgresParticipant(topics)
    died = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    monkeypatch.setattr(settlement, "settle_at_start", failing_settlement(died))
    with pytest.raises(StoreUnavailableError, match="closed in the middle"):
        await participant.start()
    assert participant._pool is None
    starting = asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
    monkeypatch.setattr(settlement, "settle_at_start", failing_settlement(starting))
    with pytest.raises(StoreUnavailableError, match="starting up"):
        await participant.start()
    # Not an outage: kept as it is, so the consumer ends with it instead of waiting for ever.
    refused = asyncpg.exceptions.InsufficientPrivilegeError("permission denied for schema public")
    monkeypatch.setattr(settlement, "settle_at_start", failing_settlement(refused))
    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        await participant.start()
    assert participant._pool is None


class FlakyStart(PostgresParticipant):
    """The store is unreachable for this participant's first `outages` starts."""

    def __init__(self, settings: Settings, outages: int) -> None:
        super().__init__(settings)
        self.outages = outages

    async def start(self) -> None:
        if self.outages > 0:
            self.outages -= 1
            raise StoreUnavailableError("PostgreSQL at 127.0.0.1: the database system is starting up")
        await super().start()


async def test_a_consumer_whose_store_is_down_at_its_start_waits_and_then_applies(topics: Settings) -> None:
    participant = FlakyStart(topics, outages=2)
    outcomes = OutcomesSeen()
    worker = StoreWorker(topics, participant, on_batch=outcomes)
    try:
        async with running(worker) as task, publishing(topics) as publisher:  # ready after two failed starts
            assert worker.stats.restarts == 2 and not task.done()
            async with participant.pool.acquire() as conn:
                await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer)")
            tx_id = f"outage-{uuid.uuid4().hex[:8]}"
            command = store_command(tx_id, 0, "EXECUTE", ops.upsert_row(TABLE, {"id": tx_id}, {"v": 1}))
            await send_commands(publisher, topics, "postgres", [command])
            assert (await outcomes.of(tx_id))["status"] == "APPLIED"
    finally:
        await participant.close()


class FailingClose(PostgresParticipant):
    """Its first close fails as a close on a dead transport does under uvloop."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.failed_closes = 0

    async def close(self) -> None:
        await super().close()
        if self.failed_closes == 0:
            self.failed_closes += 1
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")


async def test_a_close_failing_after_a_stuck_session_does_not_end_the_consumer(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumers = ConsumersMade(make_consumer)
    monkeypatch.setattr(worker_module, "make_consumer", consumers)
    participant = FailingClose(topics)
    worker = StoreWorker(topics, participant)
    worker.rejoin_deadline_s = 2.0
    try:
        async with running(worker) as task:  # which ends cleanly after the block, or raises here
            leave_stuck(consumers.made[0], monkeypatch)
            await asyncio.wait_for(consumers.second_session.wait(), 60)  # the watch ended the session; its close failed
            assert participant.failed_closes == 1
            assert not task.done()  # the failure was logged, not raised out of the worker
            assert worker.stats.restarts == 1
    finally:
        await participant.close()


async def test_a_close_failing_after_a_failed_start_leaves_the_start_error_to_answer(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Kafka consumer fails to start (the broker restarting) and the store's close then fails too: the
    worker answers the Kafka error with a new session; the close's error, logged, does not end it."""
    made: list[Any] = []

    def first_start_fails(*args: Any, **kwargs: Any) -> Any:
        consumer = make_consumer(*args, **kwargs)
        if not made:
            monkeypatch.setattr(consumer, "start", failing_settlement(KafkaConnectionError("broker restarting")))
        made.append(consumer)
        return consumer

    monkeypatch.setattr(worker_module, "make_consumer", first_start_fails)
    participant = FailingClose(topics)
    worker = StoreWorker(topics, participant)
    try:
        async with running(worker) as task:  # ready: the second session started
            assert len(made) == 2 and participant.failed_closes == 1
            assert worker.stats.restarts == 1 and not task.done()
    finally:
        await participant.close()
