"""The local Kafka cluster's shape and each node's server.properties: pure, from the settings.

One node is broker and controller at once, as before. A cluster of N nodes (`scripts/services start
--kafka-brokers 3`) makes every node both as well: three controllers form the KRaft quorum, so killing any
one node leaves a majority (2 of 3) that elects new partition leaders; with one controller, killing its
node would freeze the cluster's metadata. Brokers listen on consecutive ports from the bootstrap port.

Security, when the settings ask for SASL: clients and brokers authenticate with SASL/SCRAM-SHA-512 on the
broker listener (the inter-broker traffic, transaction markers included, runs as the `broker` super
user); the controller listener uses SASL/PLAIN with a static `broker` user from the JAAS line, since
SCRAM credentials live in the metadata log that the controllers themselves serve. Both listeners bind
127.0.0.1 only. The StandardAuthorizer denies whatever no ACL allows (polycommit/acls.py has the ACLs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polycommit.config import Settings, broker_ports

SUPER_USERS = ("broker", "admin")
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
SCRAM = "SCRAM-SHA-512"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024


@dataclass(frozen=True)
class Node:
    """One Kafka process of the local cluster: node 1 keeps the names a single broker always had."""

    node_id: int
    port: int
    controller_port: int

    @property
    def name(self) -> str:
        """Its pid, log and data name: `kafka` for node 1, `kafka-2`, `kafka-3` for the others."""
        return "kafka" if self.node_id == 1 else f"kafka-{self.node_id}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def cluster_nodes(settings: Settings) -> list[Node]:
    port = int(settings.kafka.first_broker.rsplit(":", 1)[1])
    brokers, controllers = broker_ports(port, settings.kafka.controller_port, settings.kafka.brokers)
    return [Node(i + 1, p, c) for i, (p, c) in enumerate(zip(brokers, controllers, strict=True))]


def replication(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of `brokers`: three copies where there are
    three brokers, and a write acknowledged (acks=all) only once two hold it, so one lost disk loses
    nothing and one broker down stops nothing."""
    factor = min(3, brokers)
    return factor, max(1, factor - 1)


def _jaas(module: str, username: str, password: str, extra: str = "") -> str:
    # Passwords are generated hex (scripts/setup): nothing in them needs quoting.
    return f'{module} required username="{username}" password="{password}"{extra};'


def _listener_lines(node: Node, broker_password: str | None) -> list[str]:
    controller = f"CONTROLLER://127.0.0.1:{node.controller_port}"
    if broker_password is None:
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{node.port},{controller}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{node.port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
        ]
    scram = _jaas("org.apache.kafka.common.security.scram.ScramLoginModule", "broker", broker_password)
    plain = _jaas(
        "org.apache.kafka.common.security.plain.PlainLoginModule",
        "broker",
        broker_password,
        f' user_broker="{broker_password}"',
    )
    return [
        f"listeners=SASL_PLAINTEXT://127.0.0.1:{node.port},{controller}",
        f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{node.port}",
        "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name=SASL_PLAINTEXT",
        f"sasl.enabled.mechanisms={SCRAM}",
        f"sasl.mechanism.inter.broker.protocol={SCRAM}",
        f"listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={scram}",
        "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
        "sasl.mechanism.controller.protocol=PLAIN",
        f"listener.name.controller.plain.sasl.jaas.config={plain}",
        f"authorizer.class.name={AUTHORIZER}",
        "super.users=" + ";".join(f"User:{user}" for user in SUPER_USERS),
        "allow.everyone.if.no.acl.found=false",
    ]


def node_properties(settings: Settings, node: Node, log_dirs: Path, broker_password: str | None) -> str:
    """server.properties of `node`; `broker_password` None means PLAINTEXT without authorisation."""
    nodes = cluster_nodes(settings)
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    factor, min_isr = replication(len(nodes))
    return "\n".join(
        [
            "# Written by polycommit/tooling/servers/kafka_config.py at every start; edit there, not here.",
            "process.roles=broker,controller",
            f"node.id={node.node_id}",
            f"controller.quorum.voters={voters}",
            *_listener_lines(node, broker_password),
            "controller.listener.names=CONTROLLER",
            f"log.dirs={log_dirs}",
            # A broker restarted after kill -9 is fenced until its old session expires; keep that short.
            "broker.session.timeout.ms=3000",
            "broker.heartbeat.interval.ms=500",
            "offsets.topic.num.partitions=1",
            f"offsets.topic.replication.factor={factor}",
            "transaction.state.log.num.partitions=1",
            f"transaction.state.log.replication.factor={factor}",
            f"transaction.state.log.min.isr={min_isr}",
            f"min.insync.replicas={min_isr}",
            f"default.replication.factor={factor}",
            "unclean.leader.election.enable=false",
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
            # The cleaner's offset map is allocated on the heap at start, 128 MB by default: a quarter of
            # the 512 MB the local broker runs with (half of the 256 MB it once ran out of). 16 MB holds
            # ~600 000 keys per cleaning, far more than a segment of these topics has. Measured: heap in
            # use after a benchmark 146 MB (the default would hold 112 MB more for good).
            "log.cleaner.dedupe.buffer.size=16777216",
            "auto.create.topics.enable=false",
            f"message.max.bytes={MAX_MESSAGE_BYTES}",
            f"replica.fetch.max.bytes={MAX_MESSAGE_BYTES}",
            "num.network.threads=2",
            "num.io.threads=4",
            "log.retention.hours=168",
            "",
        ]
    )


KAFKA_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
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
