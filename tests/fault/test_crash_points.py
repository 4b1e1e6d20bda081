"""Crash every process at every named failpoint, and the broker mid-run; the checker judges the stores.

The coordinator and the three store consumers run as subprocesses (`polycommit.tooling.processes.Cluster`). One of
them is armed with `POLYCOMMIT_FAILPOINT`, which SIGKILLs it between two protocol steps; the test waits
for that death (exit by SIGKILL), starts the process again without the failpoint, waits for every
result, stops everything cleanly, and runs `polycommit.tooling.checker`: every transaction must have completed,
with its markers and its data in all three stores, and nothing may be applied twice or left behind.

Nothing here sleeps: every wait is for an event (a ready line, an exit, a result) under a deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from neo4j import AsyncGraphDatabase

from polycommit import operations as ops
from polycommit.client import Coordinator, Saga, TransactionResult
from polycommit.config import Settings
from polycommit.failpoints import FAILPOINTS, LOCK_MANAGER_ONLY, TWO_PHASE_ONLY
from polycommit.tooling.bench import LABEL, TABLE, writes
from polycommit.tooling.chaos import kill_broker, saga_of
from polycommit.tooling.chaos_workload import STEP_TIMEOUT_S
from polycommit.tooling.checker import (
    COMPENSATED_IN_COMPLETED,
    CONFLICTING,
    EFFECT_MISSING,
    EFFECT_PRESENT,
    EFFECT_WRONG,
    HANGING,
    LOST,
    MISSING_EXECUTE,
    History,
    check,
)
from polycommit.tooling.processes import Cluster

pytestmark = pytest.mark.servers

TRANSACTIONS = 20
DEATH_DEADLINE_S = 60.0  # the armed process reaches its failpoint and dies
RESULTS_DEADLINE_S = 120.0  # every result, once the crashed process is back (a rebalance waits ~10 s)
CLIENT_TIMEOUT_S = 300.0


def owner_of(failpoint: str) -> str:
    """The process that runs a failpoint's code: the coordinator, or (by default) the PostgreSQL consumer."""
    if failpoint.startswith("coordinator."):
        return "coordinator"
    if failpoint.startswith("worker."):
        return "postgres"
    if failpoint.startswith(("postgres.", "qdrant.", "neo4j.")):
        return failpoint.split(".", 1)[0]
    raise AssertionError(f"failpoint {failpoint} has no owning process: teach owner_of() about it")


# Every failpoint on its owner; the worker points once more on the Qdrant and Neo4j consumers. The
# coordinator dies at its second Kafka transaction, so that sagas it already started are in flight.
CASES: list[tuple[str, str, str]] = [
    (name, owner_of(name), f"{name}:2" if owner_of(name) == "coordinator" else name)
    for name in FAILPOINTS
    # Sagas never reach those: tests/fault/test_twopc_crash_points.py, tests/integration/test_lock_manager.py.
    if name not in TWO_PHASE_ONLY | LOCK_MANAGER_ONLY
] + [
    ("worker.after_apply", "qdrant", "worker.after_apply"),
    ("worker.after_publish", "neo4j", "worker.after_publish"),
]


def sagas(count: int, step_timeout_s: float = STEP_TIMEOUT_S) -> list[Saga]:
    return [saga_of(w, timeout=step_timeout_s) for w in writes(f"f{uuid.uuid4().hex[:6]}", count)]


async def submit(
    client: Coordinator, history: History, items: Iterable[Saga]
) -> list[asyncio.Future[TransactionResult]]:
    futures = []
    for saga in items:
        history.invoke(saga)
        futures.append(await client.submit(saga))
    return futures


async def await_results(
    cluster: Cluster, history: History, futures: Sequence[asyncio.Future[TransactionResult]], deadline_s: float
) -> list[TransactionResult]:
    """Every result, failing fast if a process dies meanwhile (nothing here should, uninvited)."""
    results: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*futures))
    exits: dict[asyncio.Future[Any], str] = {
        asyncio.ensure_future(part.exited()): name for name, part in cluster.processes.items() if part.running
    }
    try:
        done, _ = await asyncio.wait([results, *exits], timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED)
        died = {exits[t]: t.result() for t in done if t in exits}
        assert not died, f"processes exited while transactions were in flight: {died}; logs in {cluster.log_dir}"
        got = sum(1 for f in futures if f.done())
        assert results in done, f"{got}/{len(futures)} results within {deadline_s}s; logs in {cluster.log_dir}"
        for result in results.result():
            history.record_result(result)
        return list(results.result())
    finally:
        for task in exits:
            task.cancel()
        results.cancel()


async def judge(settings: Settings, cluster: Cluster, history: History, results: Sequence[TransactionResult]) -> None:
    codes = await cluster.stop()
    assert codes == dict.fromkeys(cluster.names, 0), f"unclean exits {codes}; logs in {cluster.log_dir}"
    report = await check(settings, history)
    assert report.ok, report.to_json()
    assert report.statuses == {"completed": len(history.intents)}, report.to_json()
    # Recovery also loses no outcome: a step run twice would mean its first outcome was dropped (the
    # coordinator folded it before restoring its state) and the saga hung until the step's timeout.
    retried = [r.tx_id for r in results if any(step.attempts > 1 for step in r.steps)]
    assert not retried, f"{len(retried)} transactions waited out a step timeout (an outcome was lost): {retried}"


@pytest.mark.parametrize(("failpoint", "owner", "spec"), CASES, ids=[f"{f}@{o}" for f, o, _ in CASES])
async def test_a_process_killed_at_a_failpoint_recovers_and_every_transaction_completes(
    fault_settings: Settings, tmp_path: Path, failpoint: str, owner: str, spec: str
) -> None:
    cluster = Cluster(fault_settings, tmp_path / "logs", supervise=False)
    history = History()
    await cluster.start({owner: spec})
    try:
        async with Coordinator(fault_settings, timeout=CLIENT_TIMEOUT_S) as client:
            futures = await submit(client, history, sagas(TRANSACTIONS))
            code = await cluster[owner].exited(DEATH_DEADLINE_S)
            assert code == -signal.SIGKILL, f"{owner} exited with {code}, not by its failpoint {spec}"
            assert sum(1 for f in futures if f.done()) < TRANSACTIONS, "the crash came after the whole run"
            await cluster.restart(owner)
            results = await await_results(cluster, history, futures, RESULTS_DEADLINE_S)
    finally:
        await cluster.stop()
    await judge(fault_settings, cluster, history, results)


async def test_the_broker_killed_mid_run_comes_back_and_every_transaction_completes(
    fault_settings: Settings, tmp_path: Path
) -> None:
    """kill -9 of the Kafka broker with transactions in flight, and more sent while it is down.

    The steps' timeout is the whole results deadline, not chaos's 30 s: a step's outcome cannot arrive
    while the broker is down, and on a loaded machine the broker's restart and every client's reconnection
    can outlast 30 s, so a timer firing then would be a legitimate retry, not the lost outcome `judge`
    looks for. With this timeout any retry is one."""
    cluster = Cluster(fault_settings, tmp_path / "logs", supervise=False)
    history = History()
    await cluster.start()
    try:
        async with Coordinator(fault_settings, timeout=CLIENT_TIMEOUT_S) as client:
            first = await submit(client, history, sagas(5 * TRANSACTIONS, RESULTS_DEADLINE_S))
            some, _ = await asyncio.wait(first, timeout=RESULTS_DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
            assert some, "no result before the broker was killed"
            done_when_gone: list[int] = []  # counted once the broker is dead, before it comes back
            dead = asyncio.Event()

            def gone() -> None:
                done_when_gone.append(sum(1 for f in first if f.done()))
                dead.set()

            restarted = asyncio.ensure_future(kill_broker(fault_settings, gone))
            died = asyncio.ensure_future(dead.wait())
            await asyncio.wait([restarted, died], return_when=asyncio.FIRST_COMPLETED)  # a failed kill raises below
            died.cancel()
            # Sent while the broker is down (or coming back): the client's producer holds and retries them.
            second = await submit(client, history, sagas(TRANSACTIONS, RESULTS_DEADLINE_S))
            await asyncio.wait_for(restarted, 120)
            assert done_when_gone[0] < len(first), "the kill came after the whole first wave"
            results = await await_results(cluster, history, [*first, *second], RESULTS_DEADLINE_S)
    finally:
        await cluster.stop()
    await judge(fault_settings, cluster, history, results)


async def test_the_checker_finds_violations_planted_in_the_stores(fault_settings: Settings, tmp_path: Path) -> None:
    """A checker that never fails proves nothing: damage a finished run in each way it must notice."""
    cluster = Cluster(fault_settings, tmp_path / "logs", supervise=False)
    history = History()
    items = writes(f"k{uuid.uuid4().hex[:6]}", 6)
    completed = [saga_of(w) for w in items[:4]]
    doomed = saga_of(items[4]).step(ops.cypher("THIS IS NOT CYPHER"))  # fails: steps 2, 1, 0 are undone
    lost = saga_of(items[5])
    row_id = {s.tx_id: w.key for s, w in zip([*completed, doomed], items, strict=False)}
    await cluster.start()
    try:
        async with Coordinator(fault_settings, timeout=CLIENT_TIMEOUT_S) as client:
            futures = await submit(client, history, [*completed, doomed])
            await await_results(cluster, history, futures, RESULTS_DEADLINE_S)
    finally:
        await cluster.stop()
    assert history.final(doomed.tx_id) == "compensated"
    clean = await check(fault_settings, history)
    assert clean.ok, clean.to_json()

    history.invoke(lost)  # never sent: no result can exist
    a, b, c, d = (s.tx_id for s in completed)
    history.record(d, "compensated")  # a second, different final result
    conn = await asyncpg.connect(fault_settings.postgres.dsn)
    try:
        await conn.execute(f"UPDATE {TABLE} SET v = -1 WHERE id = $1", row_id[a])
        await conn.execute("DELETE FROM polycommit_steps WHERE tx_id = $1 AND step_index = 0", b)
        await conn.execute("INSERT INTO polycommit_steps (tx_id, step_index, action) VALUES ($1, 0, 'COMPENSATE')", c)
        await conn.execute(f"INSERT INTO {TABLE} (id, v) VALUES ($1, 0)", row_id[doomed.tx_id])
        # The doomed saga's step 0 ran and was undone: make its EXECUTE marker look later than its undo.
        await conn.execute(
            "UPDATE polycommit_steps SET applied_at = applied_at + $2 WHERE tx_id = $1 AND action = 'EXECUTE'",
            doomed.tx_id,
            datetime.timedelta(hours=1),
        )
    finally:
        await conn.close()
    cfg = fault_settings.neo4j
    driver = AsyncGraphDatabase.driver(cfg.uri, auth=(cfg.user, cfg.password))
    try:
        async with driver.session() as session:
            await (await session.run(f"MATCH (n:{LABEL} {{id: $id}}) DELETE n", id=row_id[c])).consume()
    finally:
        await driver.close()

    report = await check(fault_settings, history)
    found = {(v.tx_id, v.kind) for v in report.violations}
    assert found == {
        (lost.tx_id, LOST),
        (d, CONFLICTING),
        (a, EFFECT_WRONG),
        (b, MISSING_EXECUTE),
        (c, COMPENSATED_IN_COMPLETED),
        (c, EFFECT_MISSING),
        (doomed.tx_id, EFFECT_PRESENT),
        (doomed.tx_id, HANGING),
    }, report.to_json()
    assert report.statuses == {"completed": 3, "compensated": 2, "none": 1}
