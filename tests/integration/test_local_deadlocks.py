"""A deadlock of two is broken by the coordinator itself, on the real servers with no deadlock detector running:
two SERIALIZABLE readers of one row, locking as they go (lock_at="access"), both go on to write it (each
upgrade waits for the other's read lock). The lock waits are far longer than the test, so only the
coordinator's own verdict can end the cycle: one victim (DeadlockVictimError), the other commits and its write
is in PostgreSQL. The same for a cycle between an interactive transaction and a two-phase commit (one lock
table for both)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from log_follow import follow

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import topics_for
from polycommit.client import Coordinator, Transaction
from polycommit.config import Settings
from polycommit.errors import DeadlockVictimError
from polycommit.tooling import workload
from polycommit.tooling.runtime import Runtime

POLICY = SagaPolicy(default_timeout_ms=20_000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
LOCK_WAIT_S = 600.0  # no lock-wait timeout ends the cycle within the test's time

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
async def client(topics: Settings) -> AsyncIterator[Coordinator]:
    await workload.prepare_postgres(topics)
    runtime = Runtime(topics, stores=("postgres",), policy=POLICY, batch_size=200)  # no detector
    await runtime.start(timeout=120)
    try:
        async with Coordinator(runtime.settings, timeout=60) as coordinator:
            yield coordinator
    finally:
        await runtime.stop()


async def test_two_readers_upgrading_one_row_lose_one_victim_without_a_detector(
    client: Coordinator, topics: Settings
) -> None:
    doc = f"local-{uuid.uuid4().hex[:8]}"
    both_read = [asyncio.Event(), asyncio.Event()]

    async def reader_then_writer(i: int) -> Any:
        scope = client.transaction(
            name=f"upgrade-{i}", interactive=True, lock_at="access", isolation="SERIALIZABLE", lock_wait=LOCK_WAIT_S
        )
        async with scope as tx:
            if i == 0:
                await tx.lock([f"test:extra:{doc}"])  # more work done: the other one is the victim
            else:
                await both_read[0].wait()  # and younger
            await tx.postgres.get(workload.DOCUMENTS, {"id": doc})  # SHARED, held to the end
            both_read[i].set()
            for read in both_read:
                await read.wait()
            await tx.postgres.upsert(workload.DOCUMENTS, {"id": doc}, {"title": f"writer-{i}"})  # the upgrade
        return scope.result

    outcomes = await asyncio.wait_for(
        asyncio.gather(*(reader_then_writer(i) for i in range(2)), return_exceptions=True), timeout=60
    )
    victims = [i for i, o in enumerate(outcomes) if isinstance(o, DeadlockVictimError)]
    survivors = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException) and o.status == "completed"]
    assert len(victims) == 1 and len(survivors) == 1, outcomes
    assert victims == [1]  # equal priority: the younger with less work dies (the detector's rule)
    conn = await asyncpg.connect(topics.postgres.dsn)
    try:
        title = await conn.fetchval(f"SELECT title FROM {workload.DOCUMENTS} WHERE id = $1", doc)
    finally:
        await conn.close()
    assert title == f"writer-{survivors[0]}"


async def test_a_two_phase_commit_in_a_cycle_with_an_interactive_transaction_is_the_lower_priority_victim(
    client: Coordinator, topics: Settings
) -> None:
    """One lock table for every protocol: an interactive transaction holds one row and asks for a second,
    which a two-phase commit holds while it waits for the first. The request closes the cycle; the two-phase
    commit (lower priority), still waiting with nothing prepared, is aborted as the victim; the interactive
    transaction gets the row and completes."""
    first, second = f"cyc-a-{uuid.uuid4().hex[:8]}", f"cyc-b-{uuid.uuid4().hex[:8]}"
    scope = client.transaction(
        name="interactive", interactive=True, lock_at="access", priority=5, lock_wait=LOCK_WAIT_S
    )
    async with scope as tx:
        await tx.postgres.upsert(workload.DOCUMENTS, {"id": first}, {"title": "interactive"})  # EXCLUSIVE now
        strong = Transaction(name="strong", consistency="STRONG", priority=0)
        strong.add(ops.upsert_row(workload.DOCUMENTS, {"id": first}, {"title": "strong"}))
        strong.add(ops.upsert_row(workload.DOCUMENTS, {"id": second}, {"title": "strong"}))
        strong_result = await client.submit(strong)
        waiting = await follow(topics, topics_for(topics).locks, "LockEvent", waits(strong.tx_id))
        assert waiting["blockers"] == [scope.tx_id]  # it holds the second row, and waits for the first
        await tx.postgres.upsert(workload.DOCUMENTS, {"id": second}, {"title": "interactive"})  # closes the cycle
    assert scope.result is not None and scope.result.status == "completed"
    victim = await asyncio.wait_for(strong_result, 60)
    assert victim.status == "aborted" and victim.error is not None, victim
    assert victim.error.startswith("DeadlockVictimError"), victim.error
    conn = await asyncpg.connect(topics.postgres.dsn)
    try:
        rows = await conn.fetch(f"SELECT id, title FROM {workload.DOCUMENTS} WHERE id = ANY($1)", [first, second])
    finally:
        await conn.close()
    assert {r["id"]: r["title"] for r in rows} == {first: "interactive", second: "interactive"}


def waits(tx_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["tx_id"] == tx_id and e["action"] == "WAITING"


async def test_two_readers_for_update_queue_at_the_read_instead_of_deadlocking(
    client: Coordinator, topics: Settings
) -> None:
    """The first test's read-then-write, each read `for_update` (EXCLUSIVE at once, as SELECT ... FOR
    UPDATE): the second reader waits at its read (seen in the lock log) while the first still holds the row,
    so the first writes and commits, and the second then reads its write. No cycle, no victim, both
    increments land. (A SHARED read would be granted at once: no wait to see, and the writes would meet in
    the first test's deadlock.)"""
    doc = f"for-update-{uuid.uuid4().hex[:8]}"
    scopes = [
        client.transaction(
            name=f"for-update-{i}", interactive=True, lock_at="access", isolation="SERIALIZABLE", lock_wait=LOCK_WAIT_S
        )
        for i in range(2)
    ]
    first_read = asyncio.Event()

    async def increment(i: int) -> Any:
        async with scopes[i] as tx:
            if i == 1:
                await first_read.wait()
            row = await tx.postgres.get(workload.DOCUMENTS, {"id": doc}, for_update=True)
            if i == 0:
                first_read.set()
                await follow(topics, topics_for(topics).locks, "LockEvent", waits(scopes[1].tx_id))
            count = int(row.value["title"]) if row.value is not None else 0
            await tx.postgres.upsert(workload.DOCUMENTS, {"id": doc}, {"title": str(count + 1)})
        return scopes[i].result

    outcomes = await asyncio.wait_for(asyncio.gather(*(increment(i) for i in range(2))), timeout=90)
    assert [o.status for o in outcomes] == ["completed", "completed"], outcomes
    conn = await asyncpg.connect(topics.postgres.dsn)
    try:
        title = await conn.fetchval(f"SELECT title FROM {workload.DOCUMENTS} WHERE id = $1", doc)
    finally:
        await conn.close()
    assert title == "2"
