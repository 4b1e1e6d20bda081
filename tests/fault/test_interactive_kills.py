"""Interactive increments, locking at their commit (the SDK's default), on a few hot keys while the
coordinator is killed -9 twice in the middle: the open transactions (their commit-time requests granted or
waiting) are rebuilt from the log, a request or an intent the dead process had not answered is answered
by its successor, and whatever a kill ended is run again by `coordinator.run`. Every increment ends
committed, none is lost (the counts in PostgreSQL add up to the increments, and Qdrant and Neo4j hold the
same counts), and `polycommit check` finds no violation in the log and the stores."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fault.fault_runs import fault_run
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.interactive import InteractiveScope
from polycommit.results import TransactionResult
from polycommit.tooling import bench_contended
from polycommit.tooling.bench_verify import read_values
from polycommit.tooling.bench_workload import keep_in_flight, stores
from polycommit.tooling.checker.judge import check
from polycommit.tooling.checker.log import read_log
from polycommit.tooling.processes import Cluster

pytestmark = pytest.mark.servers

INCREMENTS, HOT_KEYS, IN_FLIGHT = 200, 5, 16
KILL_AFTER = (40, 110)  # results seen before each kill of the coordinator


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    async with fault_run(settings, tmp_path, "intkill", intents=2) as run:
        yield run


async def test_increments_on_hot_keys_survive_coordinator_kills_and_none_is_lost(run: Settings, tmp_path: Path) -> None:
    name = f"k{uuid.uuid4().hex[:6]}"
    items = bench_contended.hot_transactions(name, INCREMENTS, HOT_KEYS, seed=11)
    keys = bench_contended.hot_keys(name, HOT_KEYS)
    cluster = Cluster(run, tmp_path / "logs", supervise=False)
    await cluster.start()
    results: list[TransactionResult] = []
    progressed = asyncio.Condition()
    try:
        async with Coordinator(run, timeout=120) as client:

            async def one(item: bench_contended.HotTransaction) -> None:
                async def block(tx: InteractiveScope) -> None:
                    await bench_contended.increment(tx, item, for_update=False)

                result = await client.run(block, retries=30, backoff=0.05, name="hot", isolation="SERIALIZABLE")
                async with progressed:
                    results.append(result)
                    progressed.notify_all()

            async def killer() -> None:
                for at in KILL_AFTER:
                    async with progressed:
                        await progressed.wait_for(lambda at=at: len(results) >= at)  # type: ignore[misc]
                    assert len(results) < INCREMENTS, "the run ended before its kills"
                    part = cluster.processes["coordinator"]
                    part.kill()
                    await part.exited()
                    await cluster.restart("coordinator")

            await asyncio.gather(keep_in_flight(items, IN_FLIGHT, one), killer())
    finally:
        await cluster.stop()
    assert [r.status for r in results].count("completed") == INCREMENTS, [r for r in results if not r.ok][:3]
    async with stores(run) as (qdrant, neo4j):
        found = await read_values(run, keys, qdrant.backend, neo4j.driver)
    agreed = bench_contended.agreement(keys, found)
    assert agreed.verified == HOT_KEYS, (agreed, found)  # every hot key: the same count in the three stores
    assert bench_contended.lost_updates(keys, found["postgres"], INCREMENTS) == 0, found["postgres"]
    history, facts = await read_log(run)
    report = await check(run, history, keys_owned=False, log=facts)
    assert report.violations == [], report.violations[:5]
