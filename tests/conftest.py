"""Shared fixtures. Tests that need a server talk to the real one and FAIL when it is down: CI starts them.

Each test session gets its own topic prefix and Qdrant Edge folder, so a run never reads another run's
events nor fights a running demo for the Edge storage lock.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from polycommit.config import Settings, load_settings
from polycommit.tooling import kafka_tuning

_STOP_CONTAINERS = pytest.StashKey[Callable[[], None]]()


def pytest_configure(config: pytest.Config) -> None:
    """POLYCOMMIT_TESTCONTAINERS=1: run the servers in containers (tests/containers.py) before any fixture."""
    # The clients the tests start in this process run with the tuning polycommit's processes use (it
    # only shortens a retry backoff, so tests run faster; tests/unit/test_library_imports.py checks the
    # library alone leaves aiokafka untouched, in a fresh interpreter).
    kafka_tuning.apply()
    from containers import ContainersError, start_if_requested  # tests/ is on sys.path (no __init__.py)

    try:
        stop = start_if_requested()
    except ContainersError as exc:
        raise pytest.UsageError(str(exc)) from exc
    if stop is not None:
        config.stash[_STOP_CONTAINERS] = stop


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("POLYCOMMIT_TESTCONTAINERS_STARTED"):
        return
    local = [item for item in items if item.get_closest_marker("local_processes")]
    if local:
        config.hook.pytest_deselected(items=local)
        items[:] = [item for item in items if not item.get_closest_marker("local_processes")]


def pytest_unconfigure(config: pytest.Config) -> None:
    stop = config.stash.get(_STOP_CONTAINERS, None)
    if stop is not None:
        stop()


@pytest.fixture(scope="session")
def session_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def settings(session_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    base = load_settings()
    edge = tmp_path_factory.mktemp("qdrant-edge")
    yield dataclasses.replace(
        base,
        topic_prefix=f"test-{session_id}",
        qdrant=dataclasses.replace(base.qdrant, edge_path=Path(edge)),
    )


@pytest.fixture(scope="session")
async def topics(settings: Settings) -> AsyncIterator[Settings]:
    """The session's topics exist (created once); yields the settings that name them."""
    from polycommit.bus import create_topics, delete_topics

    await create_topics(settings, {"intents": 2, "commands.postgres": 2, "commands.neo4j": 2, "commands.qdrant": 1})
    yield settings
    if not os.environ.get("POLYCOMMIT_KEEP_TEST_TOPICS"):
        await delete_topics(settings)
