"""A heuristic hazard on the real servers: a phase 2 that cannot succeed is retried, reported as a hazard
(alert, `polycommit status`), and resolved once its cause is fixed, without an operator command.

Neo4j votes by validation under the coordinator's locks and applies the write-set at COMMIT (DESIGN.md's
shape (b)); a uniqueness constraint on a property the MERGE sets, violated by a node that no polycommit
transaction wrote, passes the vote and fails the COMMIT. The decision is COMMIT (durable): the step is
retried with backoff, the hazard is reported after `compensation_retries` failures, and when the
conflicting node is removed the next retry applies it, an alert "resolved" follows and the client is
told committed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from neo4j import AsyncGraphDatabase

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import read_topic, topics_for
from polycommit.client import Coordinator, Transaction
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.kafka_client import client_security
from polycommit.tooling import workload
from polycommit.tooling.inspect import transactions_in_flight
from polycommit.tooling.runtime import Runtime
from projections import status

pytestmark = pytest.mark.servers
POLICY = SagaPolicy(default_timeout_ms=5000, backoff_base_ms=100, backoff_max_ms=400, compensation_retries=3)
DEADLINE_S = 60.0


@pytest.fixture
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    await workload.prepare_postgres(topics)
    rt = Runtime(topics, policy=POLICY, batch_size=200)
    await rt.start()
    yield rt
    await rt.stop()


async def cypher(settings: Settings, statement: str, **params: Any) -> None:
    driver = AsyncGraphDatabase.driver(settings.neo4j.uri, auth=(settings.neo4j.user, settings.neo4j.password))
    try:
        async with driver.session() as session:
            await (await session.run(statement, **params)).consume()
    finally:
        await driver.close()


async def alerts_of(settings: Settings, tx_id: str) -> list[str]:
    codec, kinds = default_codec(), []

    def take(record: Any) -> None:
        try:
            alert = codec.decode_as(record.value, "Alert")
        except CodecError:
            return
        if alert["tx_id"] == tx_id:
            kinds.append(alert["kind"])

    await read_topic(settings, topics_for(settings).alerts, take)
    return kinds


async def first_alert(settings: Settings, tx_id: str, kind: str) -> None:
    """Wait on the alerts topic (read_committed, from its start) for `tx_id`'s first alert of `kind`."""
    codec = default_codec()
    consumer = AIOKafkaConsumer(
        topics_for(settings).alerts,
        **client_security(settings),
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        async for record in consumer:
            try:
                alert = codec.decode_as(record.value, "Alert")
            except CodecError:
                continue
            if alert["tx_id"] == tx_id and alert["kind"] == kind:
                return
    finally:
        await consumer.stop()


async def test_a_phase_two_that_cannot_succeed_is_a_hazard_until_its_cause_is_fixed(runtime: Runtime) -> None:
    settings = runtime.settings
    label, doc, email = f"Hz{uuid.uuid4().hex[:8]}", f"hz-{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex[:8]}@x"
    await cypher(settings, f"CREATE CONSTRAINT IF NOT EXISTS FOR (n:{label}) REQUIRE n.email IS UNIQUE")
    await cypher(settings, f"CREATE (:{label} {{id: 'someone-else', email: $email}})", email=email)
    tx = Transaction(name="hazard", consistency="STRONG")
    tx.add(ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": "hazard"}))
    tx.add(ops.merge_node(label, {"id": doc}, {"email": email}))
    async with Coordinator(settings, timeout=120) as client:
        result = asyncio.ensure_future(client.execute(tx))

        await asyncio.wait_for(first_alert(settings, tx.tx_id, "hazard"), DEADLINE_S)
        # The alert and the state reporting it are published in one Kafka transaction: status shows it now.
        stuck = status.report(await transactions_in_flight(settings))["stuck"]
        assert any(row["tx_id"] == tx.tx_id for row in stuck), "the hazard is in `polycommit status`"
        assert not result.done()  # the client is not told committed while a store lacks the write
        await cypher(settings, f"MATCH (n:{label} {{id: 'someone-else'}}) DELETE n")  # the operator's fix
        done = await asyncio.wait_for(result, DEADLINE_S)
    assert done.status == "committed"
    assert "resolved" in await alerts_of(settings, tx.tx_id)
    assert not [
        row for row in status.report(await transactions_in_flight(settings))["stuck"] if row["tx_id"] == tx.tx_id
    ]
    nodes: list[Any] = []
    driver = AsyncGraphDatabase.driver(settings.neo4j.uri, auth=(settings.neo4j.user, settings.neo4j.password))
    try:
        async with driver.session() as session:
            nodes = await (await session.run(f"MATCH (n:{label} {{id: $id}}) RETURN n.email AS e", id=doc)).data()
    finally:
        await driver.close()
    assert nodes == [{"e": email}]
    await cypher(settings, f"MATCH (n:{label}) DETACH DELETE n")
