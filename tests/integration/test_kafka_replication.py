"""A three-broker cluster (`scripts/services start --kafka-brokers 3`): losing one broker loses nothing.

Its own cluster on an isolated home (tests/kafka_homes.py), with SASL as by default. Topics get three
replicas and min.insync.replicas 2; an acks=all producer keeps going while one broker is killed, and a
consumer then reads every record it was told were written. (`polycommit chaos --kafka-brokers 3` does the
same under a saga workload, restarting the broker.)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from kafka_homes import isolated_kafka

from polycommit.bus import Publisher, create_topics, make_admin, read_topic, topics_for
from polycommit.config import Settings
from polycommit.tooling.servers import kafka
from polycommit.tooling.servers.kafka_config import cluster_nodes
from polycommit.tooling.services import await_pid_exit, server_status

# The local servers `scripts/services` runs, from the jars: not the containers of POLYCOMMIT_TESTCONTAINERS.
pytestmark = [pytest.mark.servers, pytest.mark.local_processes]

RECORDS_EACH_PHASE = 200


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Settings]:
    async with isolated_kafka(tmp_path_factory.mktemp("kafka-3") / "home", brokers=3) as settings:
        yield dataclasses.replace(settings, topic_prefix=f"rep-{uuid.uuid4().hex[:8]}")


async def _send(producer: AIOKafkaProducer, topic: str, phase: str) -> list[bytes]:
    values = [f"{phase}-{i}".encode() for i in range(RECORDS_EACH_PHASE)]
    futures = [await producer.send(topic, value, key=value) for value in values]
    for future in futures:
        await future  # acks=all: acknowledged by every in-sync replica, at least min.insync.replicas (2)
    return values


async def _read_all(settings: Settings, topic: str) -> list[bytes]:
    found: list[bytes] = []
    await read_topic(settings, topic, lambda record: found.append(record.value))
    return found


async def _describe(settings: Settings, topic: str) -> dict[str, Any]:
    admin = make_admin(settings)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return dict(described)


def _one_partition_each(settings: Settings) -> dict[str, int]:
    # Fewer partitions, a faster creation: the replica count is what this test is about.
    return dict.fromkeys(topics_for(settings).all(), 1)


async def test_the_cluster_lists_three_brokers_and_topics_get_three_replicas(cluster: Settings) -> None:
    status = (await server_status(cluster))["kafka"]
    assert status.healthy, status.extra.get("error")
    assert cluster.kafka.bootstrap.count(",") == 2, "the bootstrap must list every broker"
    report = await create_topics(cluster, _one_partition_each(cluster))
    assert all("3 replicas" in line or line == "exists" for line in report.values()), report
    described = await _describe(cluster, topics_for(cluster).intents)
    assert {len(p["replicas"]) for p in described["partitions"]} == {3}


async def test_an_acks_all_producer_keeps_going_when_one_broker_dies_and_nothing_is_lost(cluster: Settings) -> None:
    await create_topics(cluster, _one_partition_each(cluster))
    topic = topics_for(cluster).intents
    publisher = Publisher(cluster, client_id="replication-test")  # idempotent, acks=all, as polycommit's own
    await publisher.start()
    # The partition's leader: its death forces a leader election, which acks=all writes must ride out.
    leader = (await _describe(cluster, topic))["partitions"][0]["leader"]
    (victim,) = [node for node in cluster_nodes(cluster) if node.node_id == leader]
    try:
        written = await _send(publisher.producer, topic, "before")
        pid = kafka.node_pid(cluster, victim)
        assert pid is not None, f"broker {victim.node_id} is not running"
        os.kill(pid, signal.SIGKILL)
        assert await await_pid_exit(pid, 30), f"broker {victim.node_id} survived SIGKILL"
        written += await _send(publisher.producer, topic, "during")  # two of three replicas suffice
        written += await _send(publisher.producer, topic, "later")
    finally:
        await publisher.stop()

    read = await _read_all(cluster, topic)

    assert sorted(read) == sorted(written)
