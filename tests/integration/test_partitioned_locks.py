"""Sagas under the lock manager partitioned by key (POLYCOMMIT_LOCK_MANAGER=partitioned: the coordinator
asks `polycommit run lock-manager`'s partitions, orchestrator/partitioned_locking.py), on the real servers.

- A saga whose keys are held by a saga in flight waits (its partition answers WAITING, naming the holder),
  and its writes survive the holder's compensation in all three stores; the checker finds nothing.
- Sagas on a few shared documents, all at once: every one completes, the stores agree, the checker finds
  nothing (each key's writers in the order the locks were granted).
- Two-phase commits and interactive transactions are refused with a typed error: they need the member's
  lock table, which this coordinator does not keep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from log_follow import follow
from runtimes import started_runtime, violations_in_log
from test_saga_locks import POLICY, WAIT_S, AdvisoryLock, applied, seeded, titles, write

from polycommit.bus import create_topics, delete_topics, topics_for
from polycommit.client import Coordinator, Saga, Transaction
from polycommit.config import Settings
from polycommit.errors import UnsupportedError
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
async def runtime(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    edge = Path(tmp_path_factory.mktemp("partitioned-edge"))
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="plocks", edge_path=edge)
    run = dataclasses.replace(run, lock_manager="partitioned")
    await create_topics(run, {"intents": 2, "lock-requests": 4})
    try:
        async with started_runtime(run, policy=POLICY, batch_size=200, lock_manager=True) as rt:
            yield rt
    finally:
        await delete_topics(run)


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with Coordinator(runtime.settings, timeout=WAIT_S) as coordinator:
        yield coordinator


async def test_a_saga_waits_for_a_saga_in_flight_and_its_writes_survive_the_compensation(
    runtime: Runtime, client: Coordinator
) -> None:
    await waiter_survives_compensation(runtime, client)


async def waiter_survives_compensation(
    runtime: Runtime, client: Coordinator, tx_ids: tuple[str | None, str | None] = (None, None)
) -> None:
    """Saga A writes a document and stalls on a step that then fails; saga B (the same document) waits for
    A's keys, its partition naming A; A compensates, then B runs: B's writes are what every store holds."""
    doc = f"pl-{uuid.uuid4().hex[:8]}"
    await seeded(client, doc)
    settings, topics = runtime.settings, topics_for(runtime.settings)
    async with AdvisoryLock(settings) as held:
        first = write(Saga("A", tx_id=tx_ids[0]), doc, "A").step(held.failing_step(), timeout=WAIT_S)
        second = write(Saga("B", tx_id=tx_ids[1]), doc, "B")
        first_result = await client.submit(first)
        await follow(settings, topics.outcomes, "StepOutcome", applied(first.tx_id, 2))
        second_result = await client.submit(second)
        waiting = await follow(settings, topics.lock_grants, "LockPartitionGrant", lambda g: g["tx_id"] == second.tx_id)
        assert not waiting["granted"] and waiting["blockers"] == [first.tx_id]
        assert await titles(runtime, doc) == ("A", "A", "A")  # A's writes are in, B waits
        await held.release()  # A's last step fails now: A compensates, then B runs
        a, b = await asyncio.wait_for(asyncio.gather(first_result, second_result), WAIT_S)
    assert (a.status, b.status) == ("compensated", "completed"), (a, b)
    assert await titles(runtime, doc) == ("B", "B", "B")
    assert await violations_in_log(runtime) == []


async def test_sagas_on_shared_documents_all_complete_and_the_stores_agree(
    runtime: Runtime, client: Coordinator
) -> None:
    docs = [f"ps-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    sagas = []
    for n in range(40):  # each writes two documents, so key sets overlap without being equal
        first, second = docs[n % 4], docs[(n * 3 + 1) % 4]
        saga = write(Saga(f"shared-{n}"), first, f"t{n}")
        sagas.append(write(saga, second, f"t{n}") if second != first else saga)
    results = await asyncio.wait_for(asyncio.gather(*(client.execute(s) for s in sagas)), 4 * WAIT_S)
    assert [r.status for r in results] == ["completed"] * len(sagas)
    for doc in docs:
        assert len(set(await titles(runtime, doc))) == 1, doc  # the three stores agree on its last writer
    assert await violations_in_log(runtime) == []


async def test_two_phase_commits_and_interactive_transactions_are_refused(client: Coordinator) -> None:
    strong = Transaction(name="strong", consistency="STRONG")
    for step in write(Saga("x"), f"pr-{uuid.uuid4().hex[:8]}", "x").steps:
        strong.add(step["operation"])
    result = await client.execute(strong)
    assert result.status == "failed" and result.error is not None and result.error.startswith("UnsupportedError")
    with pytest.raises(UnsupportedError, match="partitioned"):
        async with client.transaction(interactive=True, lock_at="access", isolation="SERIALIZABLE") as tx:
            await tx.postgres.get("documents", {"id": "nobody"})
