"""Recovery of two-phase commit with hundreds of transactions in flight: kill -9 every polycommit
process (coordinator and the three consumers; never the broker or the servers), start them again, and
measure how long until every transaction has its result. The seconds are printed (run with -s) and
asserted on nothing but completeness: this is a measurement, not a timing test."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fault.fault_runs import fault_run
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.events import STORES
from polycommit.tooling.bench import saga_of, writes
from polycommit.tooling.inspect import transactions_in_flight
from polycommit.tooling.processes import Cluster

pytestmark = pytest.mark.servers

WARM_UP = 300  # a first wave, until results flow: the pipeline is working when the kill comes
TRANSACTIONS = 1000  # the second wave: the kill comes once the coordinator holds 500 of it in flight
IN_FLIGHT_AT_KILL = 500


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    async with fault_run(settings, tmp_path, "rec2pc", intents=4) as run:
        yield run


async def test_every_process_killed_with_hundreds_in_flight_recovers_them_all(run: Settings, tmp_path: Path) -> None:
    cluster = Cluster(run, tmp_path / "logs", supervise=False)
    await cluster.start()
    try:
        async with Coordinator(run, timeout=600) as client:
            transactions = [saga_of(w, mode="2pc") for w in writes(f"r{uuid.uuid4().hex[:6]}", WARM_UP + TRANSACTIONS)]
            futures = await asyncio.gather(*(client.submit(t) for t in transactions[:WARM_UP]))
            # Batching across transactions can finish a whole wave at once, so the kill does not wait for
            # results to trickle: once the first wave has results, a second one is submitted, the store
            # consumers are frozen (SIGSTOP) so that no transaction can end any more, and every process is
            # killed once the coordinator's committed state holds 500 in flight. Without the freeze, on a
            # loaded machine a whole wave could end between reading the state and the kill, leaving none.
            await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
            futures += await asyncio.gather(*(client.submit(t) for t in transactions[WARM_UP:]))
            for store in STORES:
                cluster[store].freeze()
            while len(await transactions_in_flight(run)) < IN_FLIGHT_AT_KILL:
                assert not all(f.done() for f in futures), "every transaction ended before the kill"
            for part in cluster.processes.values():
                part.kill()
            await asyncio.gather(*(part.exited() for part in cluster.processes.values()))
            unfinished = sum(1 for f in futures if not f.done())
            coordinator_in_flight = len(await transactions_in_flight(run))
            assert coordinator_in_flight >= IN_FLIGHT_AT_KILL, coordinator_in_flight
            started = time.monotonic()
            await asyncio.gather(*(cluster.start_one(name) for name in cluster.names))
            restarted = time.monotonic() - started
            results = await asyncio.wait_for(asyncio.gather(*futures), 300)
            seconds = time.monotonic() - started
    finally:
        await cluster.stop()
    statuses: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.error:
            reasons[r.error[:80]] = reasons.get(r.error[:80], 0) + 1
    assert set(statuses) <= {"committed", "aborted"}, statuses
    assert len(await transactions_in_flight(run)) == 0
    print(
        f"\nrecovery: {unfinished} transactions without a result at the kill ({coordinator_in_flight} in the "
        f"coordinator's state); processes ready after {restarted:.2f} s; every result after {seconds:.2f} s; "
        f"statuses {statuses}; abort reasons {sorted(reasons.items(), key=lambda kv: -kv[1])[:3]}"
    )
