"""The test servers in Docker containers (testcontainers), for machines with Docker but without `scripts/setup`.

`POLYCOMMIT_TESTCONTAINERS=1 pytest ...` makes tests/conftest.py call `start_if_requested()` from
`pytest_configure`, before any fixture loads the settings. It starts PostgreSQL 15, Kafka 4 (KRaft, one
node), Neo4j 5.26 and Qdrant in containers, each port published on 127.0.0.1 only (on a port Docker picks),
waits until each one answers a real request (the probes of polycommit/tooling/services.py), and exports the
variables polycommit/config.py reads (POLYCOMMIT_PG_*, POLYCOMMIT_KAFKA_BOOTSTRAP, POLYCOMMIT_KAFKA_SECURITY_PROTOCOL
= PLAINTEXT since the container's Kafka has no SASL, POLYCOMMIT_NEO4J_*, QDRANT_URL), so `load_settings()`
points at the containers. The returned stopper removes the containers and restores those variables;
testcontainers' reaper removes them too if the test process dies.

The server settings mirror docker-compose.yml and polycommit/tooling/services.py. Images can be overridden with
POLYCOMMIT_POSTGRES_IMAGE, POLYCOMMIT_KAFKA_IMAGE, POLYCOMMIT_NEO4J_IMAGE and POLYCOMMIT_QDRANT_IMAGE.
With the switch unset this module does nothing and imports nothing beyond the standard library.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

    from polycommit.config import Settings

SWITCH = "POLYCOMMIT_TESTCONTAINERS"
# Set once the containers run: pytest-xdist workers and child processes inherit the environment and
# must use these containers, not start their own.
STARTED = "POLYCOMMIT_TESTCONTAINERS_STARTED"

DEFAULT_IMAGES: dict[str, str] = {
    "postgres": "postgres:15",
    "kafka": "apache/kafka:4.4.0",
    "neo4j": "neo4j:5.26-community",
    "qdrant": "qdrant/qdrant:v1.19.1",
}
READY_DEADLINE_S: dict[str, float] = {"postgres": 90.0, "kafka": 90.0, "neo4j": 150.0, "qdrant": 60.0}

PG_USER = "polycommit"
PG_DATABASE = "polycommit"
NEO4J_USER = "neo4j"

# The variables config.py reads that this module sets; the stopper restores their previous values.
EXPORTED: tuple[str, ...] = (
    "POLYCOMMIT_PG_HOST",
    "POLYCOMMIT_PG_PORT",
    "POLYCOMMIT_PG_USER",
    "POLYCOMMIT_PG_PASSWORD",
    "POLYCOMMIT_PG_DATABASE",
    "POLYCOMMIT_KAFKA_BOOTSTRAP",
    "POLYCOMMIT_KAFKA_SECURITY_PROTOCOL",
    "POLYCOMMIT_KAFKA_BROKERS",
    "POLYCOMMIT_NEO4J_URI",
    "POLYCOMMIT_NEO4J_USER",
    "POLYCOMMIT_NEO4J_PASSWORD",
    "QDRANT_URL",
    STARTED,
)

_KAFKA_CLIENT_PORT = 9092
_KAFKA_CONTROLLER_PORT = 9093
_KAFKA_BROKER_PORT = 9094
_KAFKA_ADVERTISED_FILE = "/tmp/polycommit-advertised-listeners"
_MAX_MESSAGE_BYTES = str(4 * 1024 * 1024 + 64 * 1024)

# Same broker settings as polycommit/tooling/servers/kafka_config.py (PLAINTEXT). Clients use PLAINTEXT, advertised
# with the host port Docker picked (known only once the container exists, hence the file the start
# command waits for); the broker talks to itself (transaction markers) over BROKER inside the container.
_KAFKA_ENV: dict[str, str] = {
    "CLUSTER_ID": "b-vYpCpcTnmiq7yt-nfSzQ",
    "KAFKA_NODE_ID": "1",
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_CONTROLLER_QUORUM_VOTERS": f"1@127.0.0.1:{_KAFKA_CONTROLLER_PORT}",
    "KAFKA_LISTENERS": (
        f"PLAINTEXT://0.0.0.0:{_KAFKA_CLIENT_PORT},BROKER://127.0.0.1:{_KAFKA_BROKER_PORT},"
        f"CONTROLLER://127.0.0.1:{_KAFKA_CONTROLLER_PORT}"
    ),
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
    "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
    "KAFKA_LOG_DIRS": "/var/lib/kafka/data",
    "KAFKA_BROKER_SESSION_TIMEOUT_MS": "3000",
    "KAFKA_BROKER_HEARTBEAT_INTERVAL_MS": "500",
    "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "1",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_MIN_INSYNC_REPLICAS": "1",
    "KAFKA_DEFAULT_REPLICATION_FACTOR": "1",
    "KAFKA_NUM_PARTITIONS": "1",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    "KAFKA_TRANSACTION_PARTITION_VERIFICATION_ENABLE": "false",
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    "KAFKA_MESSAGE_MAX_BYTES": _MAX_MESSAGE_BYTES,
    "KAFKA_REPLICA_FETCH_MAX_BYTES": _MAX_MESSAGE_BYTES,
}
_KAFKA_COMMAND = [
    "sh",
    "-c",
    f"while [ ! -s {_KAFKA_ADVERTISED_FILE} ]; do sleep 0.1; done; "
    f'KAFKA_ADVERTISED_LISTENERS="$(cat {_KAFKA_ADVERTISED_FILE})"; export KAFKA_ADVERTISED_LISTENERS; '
    "exec /etc/kafka/docker/run",
]
_NEO4J_ENV: dict[str, str] = {
    "NEO4J_server_http_enabled": "false",
    "NEO4J_server_https_enabled": "false",
    "NEO4J_server_bolt_listen__address": "0.0.0.0:7687",
    "NEO4J_server_memory_heap_initial__size": "512m",
    "NEO4J_server_memory_heap_max__size": "512m",
    "NEO4J_server_memory_pagecache_size": "256m",
}
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class ContainersError(RuntimeError):
    """The containers could not be started or did not become ready."""


def requested() -> bool:
    """True when this process should start the containers (switch on, and none started by a parent)."""
    return os.environ.get(SWITCH, "").strip().lower() in ("1", "true", "yes", "on") and not os.environ.get(STARTED)


def start_if_requested() -> Callable[[], None] | None:
    """Start the containers when POLYCOMMIT_TESTCONTAINERS=1 and export their addresses; returns a stopper.

    Returns None, doing nothing, when the switch is unset (or a parent process already started them).
    """
    if not requested():
        return None
    return _start()


def _image(name: str) -> str:
    return os.environ.get(f"POLYCOMMIT_{name.upper()}_IMAGE") or DEFAULT_IMAGES[name]


def _publish(container: DockerContainer, port: int, loopback_only: bool) -> None:
    """Publish `port` on a host port Docker picks, on 127.0.0.1 only when Docker runs on this machine."""
    # docker-py takes (host ip,) for "this interface, any port"; testcontainers' type says int | None.
    binding: Any = ("127.0.0.1",) if loopback_only else None
    container.ports[f"{port}/tcp"] = binding


def _host_address(container: DockerContainer) -> str:
    host = container.get_container_host_ip()
    return "127.0.0.1" if host in _LOCAL_HOSTS else host


def _logs_tail(container: DockerContainer, lines: int = 40) -> str:
    try:
        out, err = container.get_logs()
    except Exception as exc:
        return f"(no logs: {type(exc).__name__}: {exc})"
    text = (out + err).decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _start() -> Callable[[], None]:
    import asyncio
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    from testcontainers.core.container import DockerContainer
    from testcontainers.core.docker_client import DockerClient

    try:
        docker_host = DockerClient().host()
    except Exception as exc:
        raise ContainersError(f"{SWITCH}=1 but Docker is not reachable: {type(exc).__name__}: {exc}") from exc
    loopback_only = docker_host in _LOCAL_HOSTS

    pg_password = os.environ.get("POLYCOMMIT_PG_PASSWORD") or secrets.token_hex(24)
    # Neo4j refuses passwords shorter than 8 characters.
    neo4j_password = os.environ.get("POLYCOMMIT_NEO4J_PASSWORD") or secrets.token_hex(24)

    postgres = (
        DockerContainer(_image("postgres"))
        .with_env("POSTGRES_USER", PG_USER)
        .with_env("POSTGRES_PASSWORD", pg_password)
        .with_env("POSTGRES_DB", PG_DATABASE)
        .with_command(["postgres", "-c", "max_prepared_transactions=200", "-c", "max_connections=200"])
    )
    _publish(postgres, 5432, loopback_only)

    kafka = DockerContainer(_image("kafka")).with_envs(**_KAFKA_ENV).with_command(_KAFKA_COMMAND)
    _publish(kafka, _KAFKA_CLIENT_PORT, loopback_only)

    neo4j = DockerContainer(_image("neo4j")).with_envs(**_NEO4J_ENV, NEO4J_AUTH=f"{NEO4J_USER}/{neo4j_password}")
    _publish(neo4j, 7687, loopback_only)

    qdrant = DockerContainer(_image("qdrant"))
    api_key = os.environ.get("QDRANT_API_KEY")
    if api_key:
        qdrant.with_env("QDRANT__SERVICE__API_KEY", api_key)
    _publish(qdrant, 6333, loopback_only)

    containers: dict[str, DockerContainer] = {"postgres": postgres, "kafka": kafka, "neo4j": neo4j, "qdrant": qdrant}
    started: list[DockerContainer] = []
    saved = {name: os.environ.get(name) for name in EXPORTED}

    def stop() -> None:
        for container in reversed(started):
            try:
                container.stop()
            except Exception as exc:  # keep removing the others
                print(f"tests/containers.py: could not remove a container: {type(exc).__name__}: {exc}")
        started.clear()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def start_one(container: DockerContainer) -> None:
        container.start()  # pulls the image if missing
        started.append(container)

    try:
        # Pulling and creating dominate; do the four side by side.
        with ThreadPoolExecutor(max_workers=len(containers)) as pool:
            futures = {name: pool.submit(start_one, c) for name, c in containers.items()}
        failed = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
        if failed:
            detail = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failed.items())
            raise ContainersError(f"could not start the containers: {detail}")

        kafka_address = f"{_host_address(kafka)}:{kafka.get_exposed_port(_KAFKA_CLIENT_PORT)}"
        advertised = f"PLAINTEXT://{kafka_address},BROKER://127.0.0.1:{_KAFKA_BROKER_PORT}"
        tmp = f"{_KAFKA_ADVERTISED_FILE}.tmp"
        result = kafka.exec(["sh", "-c", f"printf '%s' '{advertised}' > {tmp} && mv {tmp} {_KAFKA_ADVERTISED_FILE}"])
        if result.exit_code != 0:
            raise ContainersError(f"kafka: could not pass the advertised listeners: {result.output!r}")

        env = {
            "POLYCOMMIT_PG_HOST": _host_address(postgres),
            "POLYCOMMIT_PG_PORT": str(postgres.get_exposed_port(5432)),
            "POLYCOMMIT_PG_USER": PG_USER,
            "POLYCOMMIT_PG_PASSWORD": pg_password,
            "POLYCOMMIT_PG_DATABASE": PG_DATABASE,
            "POLYCOMMIT_KAFKA_BOOTSTRAP": kafka_address,
            # The container's Kafka is PLAINTEXT without ACLs (as in docker-compose.yml): the Kafka
            # passwords scripts/setup may have generated must not switch the clients to SASL.
            "POLYCOMMIT_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
            "POLYCOMMIT_KAFKA_BROKERS": "1",
            "POLYCOMMIT_NEO4J_URI": f"bolt://{_host_address(neo4j)}:{neo4j.get_exposed_port(7687)}",
            "POLYCOMMIT_NEO4J_USER": NEO4J_USER,
            "POLYCOMMIT_NEO4J_PASSWORD": neo4j_password,
            "QDRANT_URL": f"http://{_host_address(qdrant)}:{qdrant.get_exposed_port(6333)}",
            STARTED: "1",
        }
        os.environ.update(env)

        from polycommit.config import load_settings

        asyncio.run(_wait_all_ready(load_settings(), containers))
    except BaseException:
        stop()
        raise
    return stop


async def _wait_all_ready(settings: Settings, containers: dict[str, DockerContainer]) -> None:
    """Each server answers a real request (polycommit.tooling.services' probes) by its deadline, or ContainersError."""
    import asyncio
    import logging
    import time

    from polycommit.tooling.servers.process import wait_until_ready
    from polycommit.tooling.services import ServicesError, wait_ready

    # The probes hit ports that do not answer yet; the client libraries would log every refusal.
    for noisy in ("aiokafka", "neo4j"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    async def ready(name: str) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S[name]
        try:
            if name != "qdrant":
                await wait_ready(settings, name, READY_DEADLINE_S[name])
                return
            # For Qdrant, wait_ready is a single status check: let the servers' own readiness loop
            # repeat it until the deadline.

            async def healthy(_: float) -> str:
                status = await wait_ready(settings, name, READY_DEADLINE_S[name])
                if not status.healthy:
                    raise ServicesError(f"qdrant: not ready: {status.extra.get('error', 'unhealthy')}")
                return status.version or ""

            await wait_until_ready(name, settings, max(1.0, deadline - time.monotonic()), healthy)
        except ServicesError as exc:
            raise ContainersError(
                f"{name} container not ready: {exc}\n--- container log ---\n{_logs_tail(containers[name])}"
            ) from exc

    results = await asyncio.gather(*(ready(name) for name in containers), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise ContainersError("\n\n".join(str(e) for e in errors))
