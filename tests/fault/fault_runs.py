"""The fault tests' runs: fresh topics and a Qdrant Edge folder of their own (shared by the fixtures)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from polycommit.bus import create_topics, delete_topics
from polycommit.config import Settings
from polycommit.tooling.bench import prepare
from polycommit.tooling.chaos import run_settings


@contextlib.asynccontextmanager
async def fault_run(settings: Settings, tmp_path: Path, prefix: str, intents: int = 2) -> AsyncIterator[Settings]:
    """Fresh topics under `prefix` (several partitions, so the runs cross them) and a Qdrant Edge folder of
    its own, with the workload's schema ready; the topics are deleted afterwards."""
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix=prefix, edge_path=tmp_path / "qdrant-edge")
    partitions = {"intents": intents, "commands.postgres": 2, "commands.qdrant": 1, "commands.neo4j": 2}
    await create_topics(run, partitions)
    await prepare(run)
    try:
        yield run
    finally:
        await delete_topics(run)
