"""Interactive transactions locking at their commit (the SDK's default), on the real servers: reads take no
lock, the commit asks every lock at once and checks the reads under them. No deadlock detector runs and the
lock waits are longer than the tests: a cycle would end as a DeadlockVictimError (the coordinator's own
verdict on a cycle of two) or a LockTimeoutError, and the tests count every attempt's ending, so a cycle
fails them. What they show:

- two increments of one counter that both read it before either commits (the upgrade deadlock when
  locking as they go) race instead: one commits, the other's read is stale, it runs again and commits;
- write skew at SERIALIZABLE: two withdrawals each checking the sum of two accounts and writing its own
  cannot both pass (the second sees the first's write on its retry);
- a burst of increments over a few hot counters, reads in random orders: no attempt deadlocks, none is
  lost, and PostgreSQL, Qdrant and Neo4j hold the same counts;
- a commit-time request waiting in both modes survives a coordinator restart.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from lock_events import lock_history, restart_while_waiting
from runtimes import reading_client, started_runtime

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.interactive import InteractiveScope
from polycommit.results import TransactionResult
from polycommit.tooling.bench_contended import Contention
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers

POLICY = SagaPolicy(default_timeout_ms=20_000, backoff_base_ms=50, backoff_max_ms=1000, compensation_retries=3)
TABLE, COLLECTION, LABEL = "race_counters", "race_counters", "RaceCounter"
VECTOR = [0.0, 1.0]
LOCK_WAIT_S = 60.0  # far longer than a test: only a cycle would wait this long


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    tables = [f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, n integer NOT NULL)"]
    options: dict[str, Any] = {"policy": POLICY, "batch_size": 200, "start_timeout": 120}
    async with started_runtime(topics, tables=tables, collection=(COLLECTION, len(VECTOR)), **options) as rt:
        yield rt


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with reading_client(runtime, timeout=120) as coordinator:
        yield coordinator


async def read_count(tx: InteractiveScope, key: str) -> int:
    found = await tx.postgres.get(TABLE, {"id": key})
    return int(found.value["n"]) if found.value is not None else 0


async def write_count(tx: InteractiveScope, key: str, n: int) -> None:
    await tx.postgres.upsert(TABLE, {"id": key}, {"n": n})
    await tx.qdrant.upsert(COLLECTION, [ops.point(key, VECTOR, {"n": n})])
    await tx.neo4j.merge_node(LABEL, {"id": key}, {"n": n})


async def counts(client: Coordinator, key: str) -> tuple[int | None, int | None, int | None]:
    """The count of `key` in PostgreSQL, Qdrant and Neo4j (None where it is absent)."""
    row = await client.reads.read_row(TABLE, {"id": key})
    point = await client.reads.read_point(COLLECTION, key)
    node = await client.reads.read_node(LABEL, {"id": key})
    return tuple(None if v.value is None else int(v.value["n"]) for v in (row, point, node))  # type: ignore[return-value]


class Attempts:
    """Every transaction `run` starts (`coordinator.run(..., attempts=...)`), and how each attempt ended: ""
    when it committed, else the error class (the bench's count, one per block run again too)."""

    def __init__(self) -> None:
        self.scopes: list[InteractiveScope] = []

    def endings(self) -> list[str]:
        contention = Contention()
        contention.add_attempts(self.scopes)
        return contention.outcomes


async def run(client: Coordinator, attempts: Attempts, block: Callable[[InteractiveScope], Awaitable[None]]) -> Any:
    return await client.run(
        block, attempts=attempts.scopes, retries=20, backoff=0.01, isolation="SERIALIZABLE", lock_wait=LOCK_WAIT_S
    )


async def test_two_increments_that_read_one_counter_race_and_the_loser_runs_again_instead_of_deadlocking(
    client: Coordinator,
) -> None:
    counter = f"c-{uuid.uuid4().hex[:8]}"
    attempts, both_read = Attempts(), [asyncio.Event(), asyncio.Event()]

    def increment(i: int) -> Callable[[InteractiveScope], Awaitable[None]]:
        async def block(tx: InteractiveScope) -> None:
            n = await read_count(tx, counter)
            both_read[i].set()
            await both_read[1 - i].wait()  # both read before either commits (set once: a retry goes on)
            await write_count(tx, counter, n + 1)

        return block

    results = await asyncio.gather(run(client, attempts, increment(0)), run(client, attempts, increment(1)))
    assert [r.status for r in results] == ["completed", "completed"], results
    assert sorted(attempts.endings()) == ["", "", "StaleReadError"], attempts.endings()
    assert await counts(client, counter) == (2, 2, 2)


async def test_write_skew_at_serializable_lets_one_of_two_withdrawals_through(client: Coordinator) -> None:
    """Each withdraws 100 from its own account when the two hold 100 or more together: serially the second
    sees 20 left and withdraws nothing; a write skew would take both (-40 and -40)."""
    run_id = uuid.uuid4().hex[:8]
    a, b = f"a-{run_id}", f"b-{run_id}"
    setup = Attempts()
    await run(client, setup, lambda tx: write_count(tx, a, 60))
    await run(client, setup, lambda tx: write_count(tx, b, 60))
    attempts, both_read = Attempts(), [asyncio.Event(), asyncio.Event()]

    def withdraw(i: int, mine: str, theirs: str) -> Callable[[InteractiveScope], Awaitable[None]]:
        async def block(tx: InteractiveScope) -> None:
            own, other = await read_count(tx, mine), await read_count(tx, theirs)
            both_read[i].set()
            await both_read[1 - i].wait()
            if own + other >= 100:
                await write_count(tx, mine, own - 100)

        return block

    results: list[TransactionResult] = await asyncio.gather(
        run(client, attempts, withdraw(0, a, b)), run(client, attempts, withdraw(1, b, a))
    )
    assert [r.status for r in results] == ["completed", "completed"], results
    final = {(await counts(client, k))[0] for k in (a, b)}
    assert final == {-40, 60}, final  # one withdrew; the other saw the sum drop to 20
    assert "StaleReadError" in attempts.endings(), attempts.endings()


async def test_a_burst_of_increments_on_hot_counters_never_deadlocks_loses_nothing_and_the_stores_agree(
    client: Coordinator,
) -> None:
    run_id, rng = uuid.uuid4().hex[:8], random.Random(7)
    keys = [f"h-{run_id}-{i}" for i in range(4)]
    attempts, gate, size = Attempts(), asyncio.Semaphore(16), 120

    async def one() -> TransactionResult:
        target, other = rng.sample(keys, 2)

        async def block(tx: InteractiveScope) -> None:
            n = await read_count(tx, target)
            await read_count(tx, other)
            await write_count(tx, target, n + 1)

        async with gate:
            result: TransactionResult = await run(client, attempts, block)
            return result

    results = await asyncio.gather(*(one() for _ in range(size)))
    assert all(r.status == "completed" for r in results), [r for r in results if r.status != "completed"][:3]
    endings = attempts.endings()
    assert set(endings) <= {"", "StaleReadError"}, sorted(set(endings))  # no victim, no lock-wait timeout
    assert endings.count("") == size
    found = [await counts(client, k) for k in keys]
    assert all(len(set(c)) == 1 for c in found), found  # the three stores agree on every counter
    assert sum(c[0] or 0 for c in found) == size  # no increment lost


async def test_a_commit_time_request_waiting_in_both_modes_is_rebuilt_by_a_coordinator_restart(
    runtime: Runtime, client: Coordinator
) -> None:
    """The holder keeps C EXCLUSIVE (a `tx.lock`); the waiter read C and writes B, so its commit asks B
    EXCLUSIVE and C SHARED in one request, and waits. The coordinator restarts (its lock table rebuilt
    from the snapshots); when the holder ends, the waiter is granted both, finds C unchanged and commits,
    in one attempt."""
    run_id = uuid.uuid4().hex[:8]
    b, c, a = f"b-{run_id}", f"c-{run_id}", f"a-{run_id}"
    c_key = ops.lock_keys(ops.upsert_row(TABLE, {"id": c}, {}))[0]
    held, may_finish, waiter_started, waiter_ids = asyncio.Event(), asyncio.Event(), asyncio.Event(), list[str]()

    async def holder() -> Any:
        async with client.transaction(name="holder", interactive=True, lock_wait=LOCK_WAIT_S) as tx:
            await tx.lock([c_key], "EXCLUSIVE")
            held.set()
            await may_finish.wait()
            await write_count(tx, a, 1)
        return tx.result

    async def waiter(tx: InteractiveScope) -> None:
        waiter_ids.append(tx.tx_id)
        waiter_started.set()
        await held.wait()
        n = await read_count(tx, c)
        await write_count(tx, b, n + 7)

    attempts = Attempts()
    tasks = [asyncio.create_task(holder()), asyncio.create_task(run(client, attempts, waiter))]
    await waiter_started.wait()
    results = await restart_while_waiting(runtime, waiter_ids[0], may_finish, tasks)
    assert [r.status for r in results] == ["completed", "completed"], results
    assert attempts.endings() == [""]  # granted after the restart, C unchanged: one attempt
    assert await counts(client, b) == (7, 7, 7)
    history = await lock_history(runtime.settings, c_key)
    holder_id = results[0].tx_id
    assert history.index((holder_id, "RELEASED")) < history.index((waiter_ids[0], "GRANTED")), history
