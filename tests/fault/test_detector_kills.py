"""The deadlock detector killed -9, as separate processes on the real servers. Its wait-for graph lives in
memory and a started detector reads the locks topic from its end (orchestrator/detector.py): what breaks
a cycle after a kill is the coordinator announcing every wait it still has again (REANNOUNCE_MS).

Only the detector judges cycles longer than two (the coordinator judges cycles of two at once), so the
tests close cycles of three across the three stores, with a lock-wait timeout far longer than the test:
a cycle the restarted detector missed would hang the test, never end quietly by a timeout.
- A cycle closed while the detector is dead waits (every member's WAITING is in the log, no verdict);
  once it is back, exactly one victim, chosen by the score, is aborted as a deadlock victim and the other
  two commit.
- Cycles in a row while the detector is killed and restarted at once between them and in the middle of
  them (a verdict in flight, a graph half folded): each one still has exactly one victim and two commits.
`polycommit check` then finds no violation in the log and the stores.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cycles import Cycle, committed, cycle_plans, run_cycle, victims
from lock_events import waiting_recorded

from fault.fault_runs import fault_run
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.errors import DeadlockVictimError
from polycommit.tooling import workload
from polycommit.tooling.bench_workload import stores
from polycommit.tooling.checker.judge import check
from polycommit.tooling.checker.log import read_log
from polycommit.tooling.processes import PARTS, Cluster

pytestmark = pytest.mark.servers

LOCK_WAIT_S = 600.0  # far longer than the test: only a verdict ends a cycle here
VERDICT_BOUND_S = 60.0  # a cycle not broken by then was missed (REANNOUNCE_MS is 2 s): a failure, not a hang
CYCLES_IN_A_ROW = 6
KILL_DURING = (1, 3)  # the cycles during which the detector is killed (and restarted at once)


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    async with fault_run(settings, tmp_path, "detkill") as run:
        await workload.prepare_postgres(run)  # the cycles write documents (tests/cycles.py)
        async with stores(run) as (qdrant, _):  # before the Qdrant consumer holds the Edge storage
            await qdrant.ensure_collection(workload.DOCUMENTS, workload.DIMENSIONS)
        yield run


@contextlib.asynccontextmanager
async def running(run: Settings, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The parts and the detector as processes, stopped on leaving (the checker then opens the Edge storage)."""
    cluster = Cluster(run, tmp_path / "logs", names=[*PARTS, "detector"], supervise=False)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


async def no_violation(run: Settings) -> None:
    history, facts = await read_log(run)
    report = await check(run, history, keys_owned=False, log=facts)
    assert report.violations == [], report.violations[:5]


async def kill(cluster: Cluster, part: str) -> None:
    process = cluster[part]
    process.kill()
    await process.exited()


def one_victim_the_youngest(outcomes: list[object]) -> None:
    """Member 2 is the youngest with the least work (cycle_plans): the score's victim; 0 and 1 commit."""
    assert victims(outcomes) == [2], outcomes
    assert committed(outcomes) == [0, 1], outcomes


async def test_a_cycle_closed_while_the_detector_is_dead_is_broken_once_it_is_back(
    run: Settings, tmp_path: Path
) -> None:
    async with running(run, tmp_path) as cluster, Coordinator(run, timeout=LOCK_WAIT_S) as client:
        await kill(cluster, "detector")
        cycle = Cycle(3)
        closing = asyncio.create_task(run_cycle(client, cycle_plans(3), cycle=cycle, lock_wait=LOCK_WAIT_S))
        for asking in cycle.asking:
            await asking.wait()
        for tx_id in cycle.tx_ids:
            await waiting_recorded(run, tx_id)  # the cycle is closed, in the log
        assert not closing.done()  # nobody judged it: the coordinator leaves cycles of three to the detector
        await cluster.restart("detector")
        outcomes, _ = await asyncio.wait_for(closing, VERDICT_BOUND_S)
    one_victim_the_youngest(outcomes)
    assert isinstance(outcomes[2], DeadlockVictimError)  # a verdict, not a lock-wait timeout
    await no_violation(run)


async def test_cycles_in_a_row_each_get_one_victim_while_the_detector_is_killed_among_them(
    run: Settings, tmp_path: Path
) -> None:
    async with running(run, tmp_path) as cluster, Coordinator(run, timeout=LOCK_WAIT_S) as client:
        for n in range(CYCLES_IN_A_ROW):
            cycle = Cycle(3)
            closing = asyncio.create_task(run_cycle(client, cycle_plans(3), cycle=cycle, lock_wait=LOCK_WAIT_S))
            if n in KILL_DURING:  # as the cycle closes: the verdict may be judged, in flight, or not yet folded
                await cycle.asking[2].wait()
                await kill(cluster, "detector")
                await cluster.restart("detector")
            outcomes, _ = await asyncio.wait_for(closing, VERDICT_BOUND_S)
            one_victim_the_youngest(outcomes)
        assert cluster["detector"].starts == 1 + len(KILL_DURING)
    await no_violation(run)
