"""`polycommit bench --trace` in the deployed layout: the coordinator and each consumer run as processes of
their own, write their spans to files of the run, and the budget holds every hop of every part — the
budget of the layout users run, not of one process sharing one event loop (`--in-process`)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from polycommit.bus import delete_topics
from polycommit.config import Settings
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.processes import part_environment

pytestmark = pytest.mark.servers


@pytest.fixture
async def own_run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    own = run_settings(settings, uuid.uuid4().hex[:8], prefix="btrace", edge_path=tmp_path / "edge")
    yield own  # the benchmark creates its topics
    await delete_topics(own)


async def test_a_traced_benchmark_of_separate_processes_has_every_hop(own_run: Settings) -> None:
    argv = ["bench", "--transactions", "24", "--concurrency", "4", "--no-direct", "--trace", "--json"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "polycommit.tooling.cli",
        *argv,
        env=part_environment(own_run),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=240)
    assert process.returncode == 0, err.decode()[-3000:]
    [point] = json.loads(out)
    assert point["workers_ran"] == "subprocesses"
    assert point["verified"] == 24
    found = point["budget"]
    assert found["transactions"] == 24  # every transaction of the point has a root, none of the warm-up
    # Hops from each of the five processes: the benchmark's client, the coordinator, three consumers.
    hops = set(found["hop_median_ms"])
    for store in ("postgres", "qdrant", "neo4j"):
        assert {f"command.fetch/{store}", f"store.apply/{store}", f"outcome.publish/{store}"} <= hops, hops
    assert {"client.publish", "coordinator.receive", "coordinator.decide", "coordinator.kafka_commit"} <= hops
    median = [hop["hop"] for hop in found["median"]["hops"]]
    assert median[0] in {"client.publish", "coordinator.receive"}  # the median transaction's own trace
    assert median.count("coordinator.decide") == 4  # the intent and the three outcomes
    assert "client.result" in median
    # The CPU each part spent per transaction: every process of the layout and the local servers, measured.
    cpu = point["cpu"]
    parts = {"bench", "coordinator", "kafka", "neo4j server", "postgres server"}
    assert parts | {f"{store} consumer" for store in ("postgres", "qdrant", "neo4j")} <= set(cpu["ms_per_tx"])
    assert cpu["ms_per_tx"]["coordinator"] > 0 and cpu["ms_per_tx"]["kafka"] > 0
    assert cpu["ceiling_tps"] == round(cpu["cores"] * 1000 / cpu["total_ms_per_tx"])
