"""Interactive transactions deadlocking across the stores, on the real servers with the coordinator, the
store consumers and the deadlock detector running: exactly one victim per cycle, chosen by the score (the
lower priority; at equal priority the younger with less work), the others commit and their writes are in
the stores; `coordinator.run` retries the victim until both business actions completed. The transactions
lock as each write is made (lock_at="access"): the SDK's default, every lock asked at once at the commit,
cannot close a cycle (tests/integration/test_racing_increments.py)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cycles import Lock, committed, cycle_plans, docs, extra_lock, node, point, row, run_cycle, victims
from lock_events import lock_history, restart_while_waiting, waiting_recorded
from runtimes import started_runtime

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.client import Coordinator, Transaction
from polycommit.config import Settings
from polycommit.interactive import InteractiveScope
from polycommit.tooling import workload
from polycommit.tooling.runtime import Runtime

# A lock wait far longer than detection: a cycle the detector missed fails the test (LockTimeoutError).
POLICY = SagaPolicy(default_timeout_ms=20_000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
LATENCY_RUNS = int(os.environ.get("POLYCOMMIT_DEADLOCK_RUNS", "50"))
pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    async with started_runtime(topics, policy=POLICY, batch_size=200, detector=True, start_timeout=120) as rt:
        yield rt


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with Coordinator(runtime.settings, timeout=60) as coordinator:
        yield coordinator


async def title_of_row(settings: Settings, doc: str) -> str | None:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        value = await conn.fetchval(f"SELECT title FROM {workload.DOCUMENTS} WHERE id = $1", doc)
        return None if value is None else str(value)
    finally:
        await conn.close()


async def title_of_node(runtime: Runtime, doc: str) -> str | None:
    found = await runtime.workers["neo4j"].participant.read_node("Document", {"id": doc})  # type: ignore[attr-defined]
    return None if found is None else str(found["title"])


async def test_opposite_orders_across_two_stores_one_victim_the_younger_with_less_work(
    runtime: Runtime, client: Coordinator
) -> None:
    a, b = docs(2)
    plans = [
        ([row(a, "t0"), extra_lock(a)], node(b, "t0")),  # older, two locks held
        ([node(b, "t1")], row(a, "t1")),  # younger, one lock held: the victim
    ]
    outcomes, _ = await run_cycle(client, plans)
    assert victims(outcomes) == [1], outcomes
    assert committed(outcomes) == [0], outcomes
    assert await title_of_row(runtime.settings, a) == "t0"
    assert await title_of_node(runtime, b) == "t0"


async def test_the_lower_priority_dies_even_when_it_is_older_with_more_work(
    runtime: Runtime, client: Coordinator
) -> None:
    a, b = docs(2)
    plans = [([row(a, "low"), extra_lock(a)], node(b, "low")), ([node(b, "high")], row(a, "high"))]
    outcomes, _ = await run_cycle(client, plans, priorities=[0, 5])
    assert victims(outcomes) == [0], outcomes
    assert committed(outcomes) == [1], outcomes
    assert await title_of_row(runtime.settings, a) == "high"
    assert await title_of_node(runtime, b) == "high"


async def test_a_three_cycle_across_the_three_stores_has_one_victim_and_two_commits(
    runtime: Runtime, client: Coordinator
) -> None:
    a, b, c = docs(3)
    plans = [
        ([row(a, "t0"), extra_lock(a)], node(b, "t0")),
        ([node(b, "t1"), extra_lock(b)], point(c, "t1")),
        ([point(c, "t2")], row(a, "t2")),  # the youngest, with the least work
    ]
    outcomes, _ = await run_cycle(client, plans)
    assert victims(outcomes) == [2], outcomes
    assert committed(outcomes) == [0, 1], outcomes
    assert await title_of_row(runtime.settings, a) == "t0"
    assert await title_of_node(runtime, b) == "t0"
    qdrant = runtime.workers["qdrant"].participant
    points = await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(c)])  # type: ignore[attr-defined]
    assert len(points) == 1


async def test_run_retries_the_victim_until_both_business_actions_complete(
    runtime: Runtime, client: Coordinator
) -> None:
    a, b = docs(2)
    holding = [asyncio.Event(), asyncio.Event()]
    attempts = [0, 0]

    def transfer(i: int, first: Lock, then: Lock) -> Callable[[InteractiveScope], Awaitable[None]]:
        async def block(tx: InteractiveScope) -> None:
            attempts[i] += 1
            await first(tx)
            holding[i].set()
            await holding[1 - i].wait()  # set once: a retry goes straight on
            await then(tx)

        return block

    results = await asyncio.gather(
        client.run(transfer(0, row(a, "t0"), node(b, "t0")), retries=5, lock_at="access", name="transfer-0"),
        client.run(transfer(1, node(b, "t1"), row(a, "t1")), retries=5, lock_at="access", name="transfer-1"),
    )
    assert [r.status for r in results] == ["completed", "completed"], results
    assert sorted(attempts)[0] == 1 and sorted(attempts)[1] >= 2, attempts  # one victim, retried
    last = "t0" if attempts[0] > 1 else "t1"  # the retried one ran after the survivor
    assert await title_of_row(runtime.settings, a) == last
    assert await title_of_node(runtime, b) == last


@pytest.mark.parametrize("length", [2, 3])
async def test_detection_latency_over_many_cycles(runtime: Runtime, client: Coordinator, length: int) -> None:
    """Each cycle gets exactly one victim; the time from the cycle-closing request leaving the client to
    the victim's abort reaching it is recorded (an upper bound of the detection latency: it includes the
    request's own hop), and written to POLYCOMMIT_DEADLOCK_REPORT (one file per length) when set. Cycles
    of two are judged by the coordinator itself, longer ones by the detector."""
    latencies: list[float] = []
    for _ in range(LATENCY_RUNS if length == 2 else max(1, LATENCY_RUNS // 2)):
        outcomes, cycle = await run_cycle(client, cycle_plans(length))
        assert len(victims(outcomes)) == 1 and len(committed(outcomes)) == length - 1, outcomes
        (victim,) = victims(outcomes)
        latencies.append((cycle.ended_at[victim] - max(cycle.asked_at)) * 1000)
    ordered = sorted(latencies)
    report = {
        "cycle": length,
        "runs": len(ordered),
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max_ms": ordered[-1],
    }
    print(f"deadlock detection latency: {report}")
    target = os.environ.get("POLYCOMMIT_DEADLOCK_REPORT")
    if target:
        path = Path(f"{target}.{length}")
        await asyncio.to_thread(path.write_text, json.dumps({**report, "all_ms": latencies}, indent=2))


async def test_a_coordinator_restart_rebuilds_the_locks_open_transactions_hold_and_await(
    runtime: Runtime, client: Coordinator
) -> None:
    a, b = docs(2)
    held, may_finish, waiter_opened = asyncio.Event(), asyncio.Event(), asyncio.Event()
    waiter_ids: list[str] = []

    async def holder() -> Any:
        async with client.transaction(name="holder", interactive=True, lock_at="access", lock_wait=120) as tx:
            await row(a, "holder")(tx)
            held.set()
            await may_finish.wait()
            await node(b, "holder")(tx)
        return tx.result

    async def waiter() -> Any:
        await held.wait()
        async with client.transaction(name="waiter", interactive=True, lock_at="access", lock_wait=120) as tx:
            waiter_ids.append(tx.tx_id)
            waiter_opened.set()
            await row(a, "waiter")(tx)
        return tx.result

    tasks = [asyncio.create_task(holder()), asyncio.create_task(waiter())]
    await waiter_opened.wait()
    results = await restart_while_waiting(runtime, waiter_ids[0], may_finish, tasks)
    assert [r.status for r in results] == ["completed", "completed"], results
    assert await title_of_row(runtime.settings, a) == "waiter"  # it ran after the holder, as the lock said
    assert await title_of_node(runtime, b) == "holder"


async def test_a_saga_waiting_for_its_write_keys_can_be_the_victim_of_an_interactive_transaction(
    runtime: Runtime, client: Coordinator
) -> None:
    a, b = docs(2)
    saga = Transaction(name="plain saga")
    saga.add(ops.upsert_row(workload.DOCUMENTS, {"id": a}, {"title": "saga"}))
    saga.add(ops.merge_node("Document", {"id": b}, {"title": "saga"}))
    async with client.transaction(name="interactive", interactive=True, lock_at="access") as tx:
        await row(a, "interactive")(tx)
        pending = asyncio.create_task(client.execute(saga))  # takes the node, waits for the row
        await waiting_recorded(runtime.settings, saga.tx_id)
        await node(b, "interactive")(tx)  # closes the cycle: the saga is younger and has done nothing
        result = await pending
    assert result.status == "aborted" and result.error is not None, result
    assert result.error.startswith("DeadlockVictimError"), result.error
    assert tx.result is not None and tx.result.status == "completed", tx.result
    assert await title_of_row(runtime.settings, a) == "interactive"
    assert await title_of_node(runtime, b) == "interactive"


async def test_a_serializable_read_lock_keeps_a_writer_out_until_the_reader_ends(
    runtime: Runtime, client: Coordinator
) -> None:
    a, b = docs(2)
    key = ops.lock_keys(ops.upsert_row(workload.DOCUMENTS, {"id": a}, {}))[0]
    writer_opened = asyncio.Event()
    writer_ids: list[str] = []

    async def writer() -> Any:
        async with client.transaction(name="writer", interactive=True, lock_at="access") as tx:
            writer_ids.append(tx.tx_id)
            writer_opened.set()
            await row(a, "writer")(tx)
        return tx.result

    async with client.transaction(
        name="reader", interactive=True, lock_at="access", isolation="SERIALIZABLE"
    ) as reader:
        await reader.lock_for_read([key])
        writing = asyncio.create_task(writer())
        await writer_opened.wait()
        await waiting_recorded(runtime.settings, writer_ids[0])
        await node(b, "reader")(reader)
    assert reader.result is not None and reader.result.status == "completed"
    assert (await writing).status == "completed"
    history = await lock_history(runtime.settings, key)
    assert history.index((reader.tx_id, "RELEASED")) < history.index((writer_ids[0], "GRANTED")), history
