"""The local Kafka cluster: one KRaft node (broker and controller), or N of them, from the jars scripts/setup
fetched, with SASL/SCRAM and ACLs when the settings carry Kafka credentials (scripts/setup generates them).

Each node's properties are written at every start (servers/kafka_config.py); its storage is formatted on
first start, with the SCRAM users (servers/kafka_security.py). Readiness is a metadata request that lists
every broker of the cluster, then an offset commit that proves the group coordinator accepts writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from pathlib import Path

from polycommit.config import Settings
from polycommit.kafka_client import client_security, make_admin
from polycommit.tooling.servers import kafka_security as security
from polycommit.tooling.servers.kafka_config import KAFKA_LOG4J2, Node, cluster_nodes, node_properties, replication
from polycommit.tooling.servers.private import private_dir
from polycommit.tooling.servers.process import (
    ProbeFailed,
    Server,
    ServerStartError,
    await_pid_exit,
    data_path,
    java,
    launch_until_ready,
    log_path,
    log_tail,
    marked_pid,
    port_open,
    redact,
    run,
    terminate,
    wait_until_ready,
)

KAFKA_MAIN = "kafka.Kafka"
GROUP_PROBE_DEADLINE_S = 20.0
PROBE_TOPIC = "polycommit-probe"


def _kafka_libs(settings: Settings) -> Path:
    return settings.cache_dir / "kafka" / "libs"


def kafka_version(settings: Settings) -> str | None:
    """The broker's version, read from the jar that scripts/setup fetched (kafka_2.13-<version>.jar)."""
    for jar in sorted(_kafka_libs(settings).glob("kafka_2.13-*.jar")):
        version = jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")
        if version and version[0].isdigit() and "-" not in version:
            return version
    return None


def brokers_file(settings: Settings) -> Path:
    """Where `start` records the cluster size, which config.py reads back for the bootstrap list."""
    return settings.run_dir / "kafka.brokers"


async def _live_brokers(settings: Settings, budget_s: float) -> set[int]:
    admin = make_admin(settings, client_id="polycommit-services", request_timeout_ms=max(500, int(budget_s * 1000)))
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return {int(broker["node_id"]) for broker in cluster.get("brokers", [])}


async def probe(settings: Settings, budget_s: float) -> str:
    """Every broker of the cluster is live (a broker restarted after a crash answers metadata requests
    while still fenced, and is listed only once the controller lets it in)."""
    # aiokafka logs an error for every refused connection; do not let a probe loop flood the caller's log.
    await port_open(settings.kafka.first_broker, budget_s)
    live = await _live_brokers(settings, budget_s)
    missing = {n.node_id for n in cluster_nodes(settings)} - live
    if missing:
        raise ProbeFailed(f"brokers {sorted(missing)} are not live yet (live: {sorted(live)})")
    return kafka_version(settings) or "unknown"


async def node_probe(settings: Settings, node: Node, budget_s: float) -> str:
    """One node is up and registered with the controller quorum."""
    await port_open(node.address, budget_s)
    alone = dataclasses.replace(settings, kafka=dataclasses.replace(settings.kafka, bootstrap=node.address))
    if node.node_id not in await _live_brokers(alone, budget_s):
        raise ProbeFailed(f"broker {node.node_id} answers but is not live yet")
    return kafka_version(settings) or "unknown"


def node_pid(settings: Settings, node: Node) -> int | None:
    return marked_pid(settings, node.name, KAFKA_MAIN)


def server_pid(settings: Settings) -> int | None:
    """The first node's pid while every node of the cluster runs; None when any is down (so that
    `services start` starts the missing ones)."""
    pids = [node_pid(settings, node) for node in cluster_nodes(settings)]
    return None if None in pids else pids[0]


def _node_paths(settings: Settings, node: Node) -> tuple[Path, Path]:
    home = data_path(settings, node.name)
    return home, home / "kraft"


async def _format(settings: Settings, deadline_s: float) -> None:
    """Format every node's storage (once; again only when formatted for another cluster or security)."""
    nodes = cluster_nodes(settings)
    wanted = security.format_digest(settings, nodes)
    markers = [security.read_marker(_node_paths(settings, n)[0]) for n in nodes]
    if all(m is not None and security.compatible(m, wanted) for m in markers):
        return
    for node, marker in zip(nodes, markers, strict=True):
        home, _ = _node_paths(settings, node)
        if marker is not None:
            kept = security.move_aside(home, "before-" + str(wanted["security"]).split(":")[0])
            with log_path(settings, node.name).open("a") as handle:
                handle.write(f"polycommit: storage formatted for something else; kept as {kept}\n")
    cluster = security.cluster_id()
    libs = _kafka_libs(settings)
    results = await asyncio.gather(*(_format_node(settings, n, cluster, libs, deadline_s) for n in nodes))
    for node, (code, out) in zip(nodes, results, strict=True):
        with log_path(settings, node.name).open("a") as handle:
            handle.write(redact(out, settings))
        if code != 0:
            log = log_path(settings, node.name)
            tail = redact(log_tail(log), settings)  # the tool may echo an argument, passwords included
            raise ServerStartError(node.name, f"formatting the KRaft storage failed (exit {code})", log, tail)
        security.write_marker(_node_paths(settings, node)[0], wanted)


async def _format_node(settings: Settings, node: Node, cluster: str, libs: Path, deadline_s: float) -> tuple[int, str]:
    props = _write_config(settings, node)
    home = props.parent
    # A short-lived tool: the C1 compiler alone starts it sooner (three of these run at once for a cluster).
    argv = [java(), "-XX:TieredStopAtLevel=1", f"-Dlog4j2.configurationFile={home / 'log4j2.xml'}", "-cp", f"{libs}/*"]
    argv += [str(security.STDIN_ARGS), security.STORAGE_TOOL]
    return await run(argv, input_text=security.format_input(settings, cluster, props), limit_s=deadline_s)


def _write_config(settings: Settings, node: Node) -> Path:
    """The node's server.properties (0600: with SASL it holds the brokers' password) and log4j2.xml."""
    home, log_dirs = _node_paths(settings, node)
    private_dir(log_dirs, settings.home)  # the log holds every event: intents and before-images
    props = home / "server.properties"
    fd = os.open(props, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(node_properties(settings, node, log_dirs, security.broker_password(settings)))
    props.chmod(0o600)
    (home / "log4j2.xml").write_text(KAFKA_LOG4J2)
    return props


def stale(settings: Settings) -> bool:
    """A running node's server.properties differ from what these settings would write (its security mode,
    its listeners or its cluster changed since it started): it must restart to take them."""
    for node in cluster_nodes(settings):
        home, log_dirs = _node_paths(settings, node)
        try:
            running = (home / "server.properties").read_text()
        except OSError:
            continue
        if running != node_properties(settings, node, log_dirs, security.broker_password(settings)):
            return True
    return False


def _node_argv(settings: Settings, node: Node) -> list[str]:
    props = _write_config(settings, node)
    # 512 MB: with 256 the broker ran out of heap, and died, holding ~1500 partitions (many benchmark and
    # test prefixes on one development broker) under load.
    argv = [java(), "-Xmx512m", "-Xms512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]
    argv += [f"-Dlog4j2.configurationFile={props.parent / 'log4j2.xml'}", "-cp", f"{_kafka_libs(settings)}/*"]
    return [*argv, KAFKA_MAIN, str(props)]


async def start_node(settings: Settings, node: Node, deadline_s: float) -> str:
    """Launch one node (formatted already) and wait until the controller lists it as a live broker."""
    argv = _node_argv(settings, node)
    home, _ = _node_paths(settings, node)

    async def ready(s: Settings, budget_s: float) -> str:
        return await node_probe(s, node, budget_s)

    return await launch_until_ready(node.name, settings, argv, cwd=home, deadline_s=deadline_s, probe=ready)


async def kill_node(settings: Settings, index: int) -> Node:
    """SIGKILL one node of the cluster (`index` modulo its size) and wait until it is gone; the other
    nodes keep serving. `start_node` brings it back."""
    node = cluster_nodes(settings)[index % settings.kafka.brokers]
    pid = node_pid(settings, node)
    if pid is None:
        raise ServerStartError(node.name, "is not running", log_path(settings, node.name))
    os.kill(pid, signal.SIGKILL)
    if not await await_pid_exit(pid, 30):
        raise ServerStartError(node.name, f"pid {pid} survived SIGKILL for 30 s", log_path(settings, node.name))
    return node


async def _start_missing(settings: Settings, deadline_s: float) -> None:
    # Side by side: a node of a cluster becomes live only once a quorum of controllers runs.
    missing = [n for n in cluster_nodes(settings) if node_pid(settings, n) is None]
    await asyncio.gather(*(start_node(settings, n, deadline_s) for n in missing))


async def start(settings: Settings, deadline_s: float) -> str:
    if kafka_version(settings) is None:
        raise ServerStartError(
            "kafka", f"no Kafka jars in {_kafka_libs(settings)}: run scripts/setup", log_path(settings, "kafka")
        )
    brokers_file(settings).write_text(f"{settings.kafka.brokers}\n")
    await _format(settings, deadline_s)
    await _start_missing(settings, deadline_s)
    version = await wait_until_ready("kafka", settings, deadline_s, lambda t: probe(settings, t))
    try:
        await wait_until_ready("kafka", settings, GROUP_PROBE_DEADLINE_S, lambda t: group_probe(settings, t))
    except ServerStartError:
        # Seen with Kafka 4.4 after a kill -9: the group coordinator reloads __consumer_offsets and then
        # finds itself "out of sync with the underlying log" on every write, forever; no consumer group
        # can form. A clean restart reloads it correctly, so do that once, and say so in the log.
        with log_path(settings, "kafka").open("a") as handle:
            handle.write("polycommit: the group coordinator does not accept writes; restarting the broker cleanly\n")
        await stop(settings)
        await _start_missing(settings, deadline_s)
        version = await wait_until_ready("kafka", settings, deadline_s, lambda t: probe(settings, t))
        await wait_until_ready("kafka", settings, GROUP_PROBE_DEADLINE_S, lambda t: group_probe(settings, t))
    return version


async def group_probe(settings: Settings, budget_s: float) -> str:
    """Commit an offset for a probe group: proves the group coordinator loads and accepts writes, which a
    metadata request does not."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    timeout_ms = max(500, int(budget_s * 1000))
    admin = make_admin(settings, request_timeout_ms=timeout_ms)
    await admin.start()
    try:
        if PROBE_TOPIC not in await admin.list_topics():
            factor = replication(settings.kafka.brokers)[0]
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(PROBE_TOPIC, num_partitions=1, replication_factor=factor)])
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
    """Stop every node that runs (all side by side, as a cluster shuts down), those of a larger cluster
    this home ran before included (their pid files say so)."""
    names = {n.name for n in cluster_nodes(settings)} | {p.stem for p in settings.run_dir.glob("kafka-*.pid")}
    await asyncio.gather(*(terminate(settings, name, marked_pid(settings, name, KAFKA_MAIN)) for name in names))


def address(settings: Settings) -> tuple[str, dict[str, str]]:
    extra = {"bootstrap": settings.kafka.bootstrap, "security_protocol": settings.kafka.security_protocol}
    if settings.kafka.brokers > 1:
        extra["brokers"] = str(settings.kafka.brokers)
    return settings.kafka.address, extra


SERVER = Server("kafka", 60.0, start, probe, server_pid, stop, address, installed_version=kafka_version, stale=stale)
