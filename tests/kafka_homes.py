"""A Kafka of its own for a test: an isolated POLYCOMMIT_HOME, free ports, secrets as scripts/setup writes them.

The shared servers are never touched: the cluster runs from another home on other ports and is stopped
and deleted at the end, whatever happened. PostgreSQL and Neo4j stay the shared ones (same passwords).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polycommit.config import KAFKA_PRINCIPALS, Settings, load_settings
from polycommit.tooling.services import start_servers, stop_servers


def free_port_block(count: int) -> int:
    """The first of `count` consecutive ports nothing listens on now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count >= 65535:
            continue
        held = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise AssertionError(f"no {count} consecutive free ports")


def write_secrets(home: Path, shared: Settings, kafka: bool = True) -> None:
    """secrets.env as scripts/setup generates it (mode 0600): the shared store passwords, new Kafka ones
    (none with `kafka=False`: what an older scripts/setup wrote)."""
    lines = [f"POLYCOMMIT_PG_PASSWORD={shared.postgres.password}", f"POLYCOMMIT_NEO4J_PASSWORD={shared.neo4j.password}"]
    fd = os.open(home / "secrets.env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    if kafka:
        add_kafka_secrets(home)


def add_kafka_secrets(home: Path) -> None:
    """Append one SCRAM password per principal, as scripts/setup does for keys it does not find."""
    with (home / "secrets.env").open("a") as handle:
        for role in KAFKA_PRINCIPALS:
            handle.write(f"POLYCOMMIT_KAFKA_PASSWORD_{role.upper()}={secrets.token_hex(24)}\n")


@contextlib.asynccontextmanager
async def isolated_kafka(home: Path, brokers: int = 1, sasl: bool = True) -> AsyncIterator[Settings]:
    """Start a Kafka cluster of `brokers` (SASL/SCRAM and ACLs, or PLAINTEXT without Kafka secrets) on
    `home`; yields its settings (admin)."""
    shared = load_settings()
    assert shared.postgres.password, "no PostgreSQL password: run scripts/setup"
    home.mkdir(parents=True)  # noqa: ASYNC240 (a test's own folder, before anything runs)
    write_secrets(home, shared, kafka=sasl)
    base = free_port_block(2 * brokers)
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("POLYCOMMIT_KAFKA_"):
                env.delenv(name)
        env.setenv("POLYCOMMIT_HOME", str(home))
        env.setenv("POLYCOMMIT_PG_PASSWORD", shared.postgres.password)
        env.setenv("POLYCOMMIT_NEO4J_PASSWORD", shared.neo4j.password)
        env.setenv("POLYCOMMIT_CACHE", str(shared.cache_dir))  # the jars scripts/setup fetched
        env.setenv("POLYCOMMIT_KAFKA_BOOTSTRAP", f"127.0.0.1:{base}")
        env.setenv("POLYCOMMIT_KAFKA_CONTROLLER_PORT", str(base + brokers))
        env.setenv("POLYCOMMIT_KAFKA_BROKERS", str(brokers))
        settings = load_settings()
        assert settings.kafka.sasl == sasl and settings.kafka.brokers == brokers
        try:
            await start_servers(settings, ["kafka"])
            yield settings
        finally:
            await stop_servers(settings, ["kafka"])
            shutil.rmtree(home, ignore_errors=True)
