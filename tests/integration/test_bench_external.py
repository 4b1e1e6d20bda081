"""`polycommit bench --external`: the workers run elsewhere and hold the Qdrant Edge storage, which allows
one opener. The read-back used to open it anyway and failed the whole run after every transaction had
committed; it now reads PostgreSQL and Neo4j back and leaves Edge to its holder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polycommit.bus import create_topics, delete_topics
from polycommit.config import Settings
from polycommit.errors import StoreUnavailableError
from polycommit.tooling import bench
from polycommit.tooling.bench_workload import stores
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers


@pytest.fixture
async def own_topics(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="bext", edge_path=tmp_path / "edge")
    own = dataclasses.replace(run, qdrant=dataclasses.replace(run.qdrant, url=None))  # Edge, whatever the env
    await create_topics(own)
    yield own
    await delete_topics(own)


def bench_args(**overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--transactions", "12", "--concurrency", "4", "--external", "--json"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


async def test_an_external_bench_reads_back_what_it_can_while_the_workers_hold_edge(
    own_topics: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = own_topics
    await bench.prepare(settings)  # before the workers open the Edge storage
    runtime = await Runtime(settings).start()  # the "elsewhere": this process's workers hold Edge
    try:
        with pytest.raises(StoreUnavailableError):  # what the read-back ran into before
            async with stores(settings):
                pass
        code = await bench.run_bench(settings, bench_args())
    finally:
        await runtime.stop()
    [point] = json.loads(capsys.readouterr().out)
    assert code == 0, point
    assert point["workers_ran"] == "external"
    assert point["ok"] == 12
    assert point["verified"] == 12
    assert sorted(point["verified_stores"]) == ["neo4j", "postgres"]  # Edge is the workers' to read
