"""A server whose port is taken is refused before it starts, with the port, the holder and the variable.

Only a socket of this test is involved: it listens on a free port and the setting is pointed at it; the
check runs without starting (or touching) any server.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator

import pytest

from polycommit.config import Settings, load_settings
from polycommit.tooling.servers import ports


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def with_ports(pg: int, kafka: int, neo4j: int) -> Settings:
    base = load_settings()
    return dataclasses.replace(
        base,
        postgres=dataclasses.replace(base.postgres, port=pg),
        kafka=dataclasses.replace(base.kafka, bootstrap=f"127.0.0.1:{kafka}", controller_port=kafka + 1),
        neo4j=dataclasses.replace(base.neo4j, uri=f"bolt://127.0.0.1:{neo4j}"),
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("server", "variable"),
    [("postgres", "POLYCOMMIT_PG_PORT"), ("kafka", "POLYCOMMIT_KAFKA_BOOTSTRAP"), ("neo4j", "POLYCOMMIT_NEO4J_URI")],
)
def test_a_taken_port_names_itself_its_holder_and_the_variable(listening: int, server: str, variable: str) -> None:
    others = free_port()
    settings = with_ports(
        listening if server == "postgres" else others,
        listening if server == "kafka" else others + 10,
        listening if server == "neo4j" else others + 20,
    )
    with pytest.raises(ports.PortInUseError) as raised:
        ports.require_free(settings, [server])
    message = str(raised.value)
    assert f"port {listening}" in message
    assert f"pid {os.getpid()}" in message  # this test's process holds it
    assert variable in message


def test_free_ports_pass(listening: int) -> None:
    # Each port picked free on its own: a neighbour of a free port may be some connection's local port.
    pg, kafka, controller, neo4j = free_port(), free_port(), free_port(), free_port()
    settings = with_ports(pg, kafka, neo4j)
    settings = dataclasses.replace(settings, kafka=dataclasses.replace(settings.kafka, controller_port=controller))
    ports.require_free(settings, ["postgres", "kafka", "neo4j"])
