"""Two coordinator members active at once, on the real servers: split among members
(POLYCOMMIT_COORDINATOR_MEMBERS=partitioned), each coordinates the transactions of its partitions, and both
ask one lock manager partitioned by key (POLYCOMMIT_LOCK_MANAGER=partitioned).
- A saga coordinated by one member waits for the keys of a saga in flight on the other, and its writes
  survive that saga's compensation in every store (with each member's own table it would not wait, and
  the compensation would put the before-images back over its writes: the anomaly members.py warns of).
- Sagas on shared documents, coordinated by both members: every one completes, the three stores agree
  on each document's last writer, and the checker finds nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from runtimes import started_runtime, violations_in_log
from test_coordinator_members import listening
from test_partitioned_locks import waiter_survives_compensation
from test_saga_locks import POLICY, WAIT_S, titles, write

from orchestrator.service import CoordinatorService
from polycommit.bus import create_topics, delete_topics
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.partitioning import partition_of
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="active", edge_path=tmp_path / "edge")
    run = dataclasses.replace(run, coordinator_members="partitioned", lock_manager="partitioned")
    await create_topics(run, {"intents": 2, "lock-requests": 4})
    try:
        yield run
    finally:
        await delete_topics(run)


async def test_two_active_members_on_one_lock_manager_keep_shared_keys_in_order(run: Settings) -> None:
    stop = asyncio.Event()
    members = [CoordinatorService(run, POLICY, instance=f"member-{i}") for i in range(2)]
    parts = started_runtime(run, coordinator=False, lock_manager=True, batch_size=200)
    async with parts as runtime, listening() as log:
        tasks = [asyncio.create_task(member.run(stop)) for member in members]
        try:
            owned = await log.said("owns 1 of 2 transaction partitions", times=2)  # the second join split them
            assert not any("lock table covers only" in m for m in owned), owned
            async with Coordinator(runtime.settings, timeout=WAIT_S) as client:
                # A on one member, B on the other: only a lock manager both ask makes B wait for A.
                await waiter_survives_compensation(runtime, client, (tx_on(0), tx_on(1)))
            await shared_documents(runtime, members)
        finally:
            stop.set()
            await asyncio.gather(*tasks)


def tx_on(partition: int) -> str:
    """A transaction id of the intents' `partition` (of 2): the member owning it coordinates it."""
    while partition_of(tx_id := str(uuid.uuid4()), [0, 1]) != partition:
        pass
    return tx_id


async def shared_documents(runtime: Runtime, members: list[CoordinatorService]) -> None:
    docs = [f"aa-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    sagas = []
    for n in range(40):  # two documents each: key sets overlap without being equal
        first, second = docs[n % 4], docs[(n * 3 + 1) % 4]
        saga = write(Saga(f"shared-{n}"), first, f"t{n}")
        sagas.append(write(saga, second, f"t{n}") if second != first else saga)
    async with Coordinator(runtime.settings, timeout=WAIT_S) as client:
        results = await asyncio.wait_for(asyncio.gather(*(client.execute(s) for s in sagas)), 4 * WAIT_S)
    assert [r.status for r in results] == ["completed"] * len(sagas)
    assert all(member.stats.intents > 0 for member in members), "both members must coordinate some"
    for doc in docs:
        assert len(set(await titles(runtime, doc))) == 1, doc  # the three stores agree on its last writer
    assert await violations_in_log(runtime) == []
