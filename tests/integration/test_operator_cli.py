"""`polycommit topics list --json` and `polycommit services env` on the real servers (read-only commands)."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys

import pytest
from test_operator_commands import cli

from polycommit.bus import topics_for
from polycommit.config import Settings

pytestmark = pytest.mark.servers


async def test_topics_list_shows_partitions_and_replication_per_topic(topics: Settings) -> None:
    code, listed = await cli(topics, "topics", "list", "--json")
    assert code == 0
    names = topics_for(topics)
    assert set(listed) == set(names.all())
    assert listed[names.intents]["partitions"] == 2  # as the session created them (tests/conftest.py)
    assert listed[names.commands("qdrant")]["partitions"] == 1
    assert listed[names.outcomes]["partitions"] == listed[names.intents]["partitions"]
    assert {t["replication_factor"] for t in listed.values()} == {1}
    assert all(t["exists"] for t in listed.values())


async def env_output(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "polycommit.tooling.cli", "services", "env", *args, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    return stdout.decode()


def parse_exports(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            values[name] = shlex.split(value)[0] if value else ""
    return values


async def test_services_env_hides_passwords_unless_asked_and_lets_psql_connect(settings: Settings) -> None:
    hidden = await env_output()
    assert "PGPASSWORD" not in parse_exports(hidden) and "--show-secrets" in hidden
    assert settings.postgres.password not in hidden and settings.neo4j.password not in hidden
    shown = parse_exports(await env_output("--show-secrets"))
    assert shown["PGPASSWORD"] == settings.postgres.password
    assert shown["NEO4J_PASSWORD"] == settings.neo4j.password
    psql = shutil.which("psql")
    assert psql is not None, "psql is installed with PostgreSQL (scripts/setup)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POLYCOMMIT_PG"))} | shown
    process = await asyncio.create_subprocess_exec(
        psql, "-tAc", "SELECT 41 + 1", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, stdout.decode().strip()) == (0, "42"), stderr.decode()
