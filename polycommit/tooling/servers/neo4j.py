"""The local Neo4j server: the embedded Neo4j that scripts/neo4j/build compiles, serving Bolt on 127.0.0.1.

Readiness is a real query (`RETURN 1`); the password reaches the process through its environment.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

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
    marked_pid,
    port_open,
    terminate,
)

NEO4J_MAIN = "polycommit.neo4j.Launcher"


def _neo4j_port(settings: Settings) -> int:
    return urlsplit(settings.neo4j.uri).port or 7687


async def probe(settings: Settings, budget_s: float) -> str:
    from neo4j import AsyncGraphDatabase

    await port_open(settings.neo4j.address, budget_s)
    driver = AsyncGraphDatabase.driver(
        settings.neo4j.uri,
        auth=(settings.neo4j.user, settings.neo4j.password),
        connection_timeout=budget_s,
        connection_acquisition_timeout=budget_s,
        max_transaction_retry_time=0,
    )
    try:
        await driver.verify_connectivity()
        async with driver.session() as session:
            result = await session.run("RETURN 1 AS one")
            record = await result.single()
            if record is None or record["one"] != 1:
                raise ProbeFailed("RETURN 1 did not return 1")
            result = await session.run("CALL dbms.components() YIELD versions RETURN versions[0] AS version")
            component = await result.single()
            return str(component["version"]) if component is not None else "unknown"
    finally:
        await driver.close()


def server_pid(settings: Settings) -> int | None:
    return marked_pid(settings, "neo4j", NEO4J_MAIN)


async def start(settings: Settings, deadline_s: float) -> str:
    cache = settings.cache_dir / "neo4j"
    log = log_path(settings, "neo4j")
    if not any((cache / "lib").glob("*.jar")) or not (cache / "classes").is_dir():
        raise ServerStartError(
            "neo4j", f"the embedded Neo4j is not built in {cache}: run scripts/setup (scripts/neo4j/build)", log
        )
    home = data_path(settings, "neo4j")
    private_dir(home, settings.home)
    argv = [java(), "-Xmx512m", "-Djava.awt.headless=true"]
    # JVM flags that scripts/neo4j/build writes for Neo4j (module opens for its page cache, GC choice).
    if (cache / "jvm.options").is_file():
        argv.append(f"@{cache / 'jvm.options'}")
    argv += ["-cp", f"{cache}/lib/*:{cache}/classes", NEO4J_MAIN]
    argv += ["--home", str(home), "--bolt", f"127.0.0.1:{_neo4j_port(settings)}"]
    # The password goes through the environment: a command line is readable by every local user.
    env = {**os.environ, "POLYCOMMIT_NEO4J_PASSWORD": settings.neo4j.password}
    return await launch_until_ready("neo4j", settings, argv, cwd=home, deadline_s=deadline_s, probe=probe, env=env)


async def stop(settings: Settings) -> None:
    await terminate(settings, "neo4j", server_pid(settings))


def address(settings: Settings) -> tuple[str, dict[str, str]]:
    return settings.neo4j.address, {"uri": settings.neo4j.uri}


SERVER = Server("neo4j", 90.0, start, probe, server_pid, stop, address)
