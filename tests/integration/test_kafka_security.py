"""The local Kafka with SASL/SCRAM and ACLs: nobody without credentials, each role only where it belongs.

Runs its own broker (tests/kafka_homes.py: an isolated home and ports, as `scripts/services start` runs it),
so the shared servers are never restarted. PostgreSQL is the shared one: the client's saga really runs,
through a coordinator and a store consumer that authenticate as their own principals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import stat
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from kafka_homes import add_kafka_secrets, isolated_kafka

from polycommit import Saga, acls, ops
from polycommit.bus import create_topics, delete_topics, prefix_grants, topics_for
from polycommit.client import Coordinator
from polycommit.config import Settings, load_settings
from polycommit.kafka_client import client_security, make_admin
from polycommit.tooling import workload
from polycommit.tooling.runtime import Runtime
from polycommit.tooling.servers.process import data_path
from polycommit.tooling.services import server_status, start_servers, statuses_to_json

# The local servers `scripts/services` runs, from the jars: not the containers of POLYCOMMIT_TESTCONTAINERS.
pytestmark = [pytest.mark.servers, pytest.mark.local_processes]


@pytest.fixture(scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Settings]:
    """A SASL broker of its own, its topics (and their ACLs) created by the admin principal."""
    async with isolated_kafka(tmp_path_factory.mktemp("kafka-sasl") / "home") as settings:
        run = dataclasses.replace(settings, topic_prefix=f"sec-{uuid.uuid4().hex[:8]}")
        await create_topics(run, {"intents": 1, "commands.postgres": 1})
        yield run


def _producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**client_security(settings), acks="all", enable_idempotence=True, request_timeout_ms=5000)


async def test_a_client_without_credentials_is_refused(secured: Settings) -> None:
    anonymous = dataclasses.replace(secured, kafka=dataclasses.replace(secured.kafka, security_protocol="PLAINTEXT"))
    producer = _producer(anonymous)
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(producer.start(), 30)
    finally:
        await producer.stop()


async def test_a_wrong_password_is_refused(secured: Settings, caplog: pytest.LogCaptureFixture) -> None:
    client = secured.as_role("client").kafka
    assert client.credentials is not None and client.credentials.username == "client"
    forged = dataclasses.replace(client, credentials=dataclasses.replace(client.credentials, password="guess"))
    producer = _producer(dataclasses.replace(secured, kafka=forged))
    try:
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(producer.start(), 30)
    finally:
        await producer.stop()
    # aiokafka turns the refusal into "unable to bootstrap"; its log says why.
    assert "SaslAuthenticationFailed" in caplog.text


async def test_the_client_principal_cannot_write_a_command_topic(secured: Settings) -> None:
    producer = _producer(secured.as_role("client"))
    await producer.start()
    try:
        compensate = b"a COMPENSATE the client has no business sending"
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(topics_for(secured).commands("postgres"), compensate, key=b"tx")
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(topics_for(secured).results, b"forged result", key=b"tx")
    finally:
        await producer.stop()


async def test_the_client_principal_publishes_an_intent_and_reads_its_reply(secured: Settings) -> None:
    await workload.prepare_postgres(secured)
    runtime = Runtime(secured, stores=("postgres",), batch_size=50)
    await runtime.start()  # the coordinator and the consumer as their own principals (Runtime picks them)
    try:
        assert runtime.service is not None and runtime.service.settings.kafka.credentials is not None
        assert runtime.service.settings.kafka.credentials.username == "coordinator"
        assert runtime.workers["postgres"].settings.kafka.credentials.username == "consumer"  # type: ignore[union-attr]
        doc = f"d-sec-{uuid.uuid4().hex[:8]}"
        saga = Saga("over SASL").step(ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": "Guarded"}))
        async with Coordinator(secured.as_role("client"), timeout=60) as client:
            result = await client.execute(saga)
        assert result.status == "completed", result
    finally:
        await runtime.stop()


async def test_status_names_the_protocol_and_never_a_kafka_password(secured: Settings) -> None:
    statuses = await server_status(secured)
    kafka = statuses["kafka"]
    assert kafka.healthy, kafka.extra.get("error")
    assert kafka.extra["security_protocol"] == "SASL_PLAINTEXT"
    text = json.dumps(statuses_to_json(statuses)) + repr(statuses) + repr(secured)
    for credentials in secured.kafka.roles.values():
        assert credentials.password not in text
    properties = data_path(secured, "kafka") / "server.properties"  # it holds the brokers' password
    modes = [stat.S_IMODE(p.stat().st_mode) for p in (properties, properties.parent / "kraft")]
    assert modes == [0o600, 0o700]


async def test_a_plaintext_broker_of_an_older_setup_restarts_with_sasl_and_keeps_its_old_log(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The shared servers' upgrade: Kafka ran PLAINTEXT; scripts/setup adds the Kafka passwords; the next
    `services start` restarts the broker with SASL, its old storage kept aside."""
    async with isolated_kafka(tmp_path_factory.mktemp("kafka-upgrade") / "home", sasl=False) as plain:
        old_pid = (await server_status(plain))["kafka"].pid
        add_kafka_secrets(plain.home)
        upgraded = load_settings()
        assert upgraded.kafka.security_protocol == "SASL_PLAINTEXT"

        statuses = await start_servers(upgraded, ["kafka"])  # no stop first: start sees the stale config

        assert statuses["kafka"].healthy and statuses["kafka"].pid != old_pid
        kept = [p.name for p in upgraded.data_dir.iterdir() if p.name.startswith("kafka.before-scram-")]
        assert len(kept) == 1, sorted(p.name for p in upgraded.data_dir.iterdir())
        run = dataclasses.replace(upgraded, topic_prefix=f"up-{uuid.uuid4().hex[:8]}")
        await create_topics(run, {"intents": 1})
        producer = _producer(run.as_role("client"))
        await producer.start()
        try:
            await producer.send_and_wait(topics_for(run).intents, b"after the upgrade", key=b"tx")
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait(topics_for(run).commands("postgres"), b"refused", key=b"tx")
        finally:
            await producer.stop()


async def test_deleting_a_prefixs_topics_deletes_its_acls(secured: Settings) -> None:
    """Each test's and chaos run's prefix gets ~60 ACLs with its topics; they go with them, or a long-used
    broker accumulates thousands (which slowed every CreateAcls and authorisation)."""
    run = dataclasses.replace(secured, topic_prefix=f"gone-{uuid.uuid4().hex[:8]}")
    grants = prefix_grants(run)
    await create_topics(run, {"intents": 1})
    await delete_topics(run)
    admin = make_admin(run)
    await admin.start()
    try:
        assert await acls.revoke(admin, grants) == []  # none left to delete
        assert await acls.grant(admin, grants[:1])  # created again, it is held, and deleted once more
        assert await acls.revoke(admin, grants) == grants[:1]
    finally:
        await admin.close()
