"""The fault tests' shared fixture (a module may define its own `fault_settings`, as the 2PC ones do)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polycommit.bus import create_topics, delete_topics
from polycommit.config import Settings
from polycommit.tooling.bench import prepare
from polycommit.tooling.chaos import run_settings


@pytest.fixture
async def fault_settings(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """Per test: fresh topics and a Qdrant Edge folder of its own, with the workload's schema ready."""
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="fault", edge_path=tmp_path / "qdrant-edge")
    await create_topics(run, {"intents": 2, "commands.postgres": 2, "commands.qdrant": 1, "commands.neo4j": 2})
    await prepare(run)
    yield run
    await delete_topics(run)
