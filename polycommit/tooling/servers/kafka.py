"""The local Kafka broker: a single KRaft node (broker and controller) from the jars scripts/setup fetched.

Its properties are written at every start; readiness is a metadata request that lists a live broker.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from pathlib import Path

from polycommit.config import Settings
from polycommit.tooling.servers.private import private_dir
from polycommit.tooling.servers.process import (
    ProbeFailed,
    Server,
    ServerStartError,
    data_path,
    java,
    launch_until_ready,
    log_path,
    log_tail,
    marked_pid,
    port_open,
    run,
    terminate,
    wait_until_ready,
)

KAFKA_MAIN = "kafka.Kafka"


def _kafka_libs(settings: Settings) -> Path:
    return settings.cache_dir / "kafka" / "libs"


def kafka_version(settings: Settings) -> str | None:
    """The broker's version, read from the jar that scripts/setup fetched (kafka_2.13-<version>.jar)."""
    for jar in sorted(_kafka_libs(settings).glob("kafka_2.13-*.jar")):
        version = jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")
        if version and version[0].isdigit() and "-" not in version:
            return version
    return None


def _kafka_properties(settings: Settings, log_dirs: Path) -> str:
    port = int(settings.kafka.bootstrap.rsplit(":", 1)[1])
    controller = settings.kafka.controller_port
    max_bytes = 4 * 1024 * 1024 + 64 * 1024
    return "\n".join(
        [
            "# Written by polycommit/tooling/servers/kafka.py at every start; edit there, not here.",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={log_dirs}",
            # A broker restarted after kill -9 is fenced until its old session expires; keep that short.
            "broker.session.timeout.ms=3000",
            "broker.heartbeat.interval.ms=500",
            "offsets.topic.num.partitions=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "min.insync.replicas=1",
            "default.replication.factor=1",
            "num.partitions=1",
            "group.initial.rebalance.delay.ms=0",
            # KIP-890's server-side check that a partition joined the transaction answers clients
            # that predate it (aiokafka) with a retriable NOT_ENOUGH_REPLICAS, and each retry waits
            # retry_backoff_ms: 100 ms added to most transactional produces. Transaction protocol
            # v2 clients would not need this.
            "transaction.partition.verification.enable=false",
            # Small segments let compaction keep the offsets and transaction logs short (the defaults
            # roll at 100 MB, which a test machine never reaches): after a crash the coordinators
            # reload a few thousand records, not every commit ever made.
            "offsets.topic.segment.bytes=1048576",
            "transaction.state.log.segment.bytes=1048576",
            "auto.create.topics.enable=false",
            f"message.max.bytes={max_bytes}",
            f"replica.fetch.max.bytes={max_bytes}",
            "num.network.threads=2",
            "num.io.threads=4",
            "log.retention.hours=168",
            "",
        ]
    )


_KAFKA_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by polycommit/tooling/servers/kafka.py: everything to stdout, which the launcher sends to kafka.log. -->
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="STDOUT"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Logger name="kafka.server.KafkaConfig" level="WARN"/>
  </Loggers>
</Configuration>
"""


def _kafka_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


async def probe(settings: Settings, budget_s: float) -> str:
    from polycommit.kafka_client import make_admin

    # aiokafka logs an error for every refused connection; do not let a probe loop flood the caller's log.
    await port_open(settings.kafka.first_broker, budget_s)
    admin = make_admin(
        settings,
        client_id="polycommit-services",
        request_timeout_ms=max(500, int(budget_s * 1000)),
    )
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    # A broker restarted after a crash answers metadata requests while still fenced; it lists no live
    # broker until the controller lets it in.
    if not cluster.get("brokers"):
        raise ProbeFailed("the broker answers but lists no live broker yet")
    return kafka_version(settings) or "unknown"


def server_pid(settings: Settings) -> int | None:
    return marked_pid(settings, "kafka", KAFKA_MAIN)


async def start(settings: Settings, deadline_s: float) -> str:
    libs = _kafka_libs(settings)
    log = log_path(settings, "kafka")
    if kafka_version(settings) is None:
        raise ServerStartError("kafka", f"no Kafka jars in {libs}: run scripts/setup", log)
    home = data_path(settings, "kafka")
    log_dirs = home / "kraft"
    private_dir(log_dirs, settings.home)  # the log holds every event: intents and before-images
    props = home / "server.properties"
    props.write_text(_kafka_properties(settings, log_dirs))
    log4j = home / "log4j2.xml"
    log4j.write_text(_KAFKA_LOG4J2)
    java_bin = java()
    classpath = f"{libs}/*"
    jvm_logging = f"-Dlog4j2.configurationFile={log4j}"
    if not (log_dirs / "meta.properties").exists():
        argv = [java_bin, jvm_logging, "-cp", classpath, "kafka.tools.StorageTool", "format"]
        argv += ["-t", _kafka_cluster_id(), "-c", str(props)]
        code, out = await run(argv, limit_s=deadline_s)
        with log.open("a") as handle:
            handle.write(out)
        if code != 0:
            raise ServerStartError("kafka", f"formatting the KRaft storage failed (exit {code})", log, log_tail(log))
    argv = [java_bin, "-Xmx256m", "-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    argv += ["-Djava.awt.headless=true", jvm_logging, "-cp", classpath, KAFKA_MAIN, str(props)]
    version = await launch_until_ready("kafka", settings, argv, cwd=home, deadline_s=deadline_s, probe=probe)
    try:
        await wait_until_ready("kafka", settings, GROUP_PROBE_DEADLINE_S, lambda t: group_probe(settings, t))
    except ServerStartError:
        # Seen with Kafka 4.4 after a kill -9: the group coordinator reloads __consumer_offsets and then
        # finds itself "out of sync with the underlying log" on every write, forever; no consumer group
        # can form. A clean restart reloads it correctly, so do that once, and say so in the log.
        with log.open("a") as handle:
            handle.write("polycommit: the group coordinator does not accept writes; restarting the broker cleanly\n")
        await terminate(settings, "kafka", server_pid(settings))
        version = await launch_until_ready("kafka", settings, argv, cwd=home, deadline_s=deadline_s, probe=probe)
        await wait_until_ready("kafka", settings, GROUP_PROBE_DEADLINE_S, lambda t: group_probe(settings, t))
    return version


GROUP_PROBE_DEADLINE_S = 20.0
PROBE_TOPIC = "polycommit-probe"


async def group_probe(settings: Settings, budget_s: float) -> str:
    """Commit an offset for a probe group: proves the group coordinator loads and accepts writes, which a
    metadata request does not."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from polycommit.kafka_client import client_security, make_admin

    timeout_ms = max(500, int(budget_s * 1000))
    admin = make_admin(settings, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        if PROBE_TOPIC not in await admin.list_topics():
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(PROBE_TOPIC, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        **client_security(settings),
        group_id="polycommit-probe",
        enable_auto_commit=False,
        request_timeout_ms=timeout_ms,
        client_id="polycommit-services",
    )
    await consumer.start()
    try:
        tp = TopicPartition(PROBE_TOPIC, 0)
        consumer.assign([tp])
        await consumer.commit({tp: 0})
    finally:
        await consumer.stop()
    return "group coordinator ready"


async def stop(settings: Settings) -> None:
    await terminate(settings, "kafka", server_pid(settings))


def address(settings: Settings) -> tuple[str, dict[str, str]]:
    return settings.kafka.address, {"bootstrap": settings.kafka.bootstrap}


SERVER = Server("kafka", 60.0, start, probe, server_pid, stop, address, installed_version=kafka_version)
