"""P6: transactions left in flight are finished by a later coordinator, from the log alone."""

from __future__ import annotations

import asyncio
import uuid

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.tooling import workload
from polycommit.tooling.inspect import transactions_in_flight
from polycommit.tooling.recovery import recover
from polycommit.tooling.runtime import Runtime


async def test_recover_finishes_every_transaction_left_in_flight(topics: Settings) -> None:
    await workload.prepare_postgres(topics)
    # A coordinator with no store consumers: it sends every first step and records the sagas in its
    # changelog, but nothing can answer, so all of them are in flight when it goes away.
    only_coordinator = await Runtime(topics, stores=(), policy=SagaPolicy(default_timeout_ms=60_000)).start()
    keys = [f"r-{uuid.uuid4().hex[:8]}" for _ in range(12)]
    sagas = [
        Saga("left in flight")
        .step(ops.upsert_row("documents", {"id": key}, {"title": "recovered"}))
        .step(ops.merge_node("Document", {"id": key}, {"title": "recovered"}))
        for key in keys
    ]
    async with Coordinator(topics, timeout=120) as client:
        futures = [await client.submit(saga) for saga in sagas]

        async def all_in_flight() -> None:
            while not {s.tx_id for s in sagas} <= set(await transactions_in_flight(topics)):
                pass

        await asyncio.wait_for(all_in_flight(), 60)
        await only_coordinator.stop()

        report = await recover(topics, wait=120)
        results = await asyncio.wait_for(asyncio.gather(*futures), 60)

    ours = {s.tx_id for s in sagas}
    assert ours <= set(report.in_flight)
    assert {report.finished[t] for t in ours} == {"completed"}
    assert not report.unfinished
    assert not ours & set(report.still_stuck)  # (an earlier test's stuck saga may be listed there)
    assert {r.status for r in results} == {"completed"}
    assert not ours & set(await transactions_in_flight(topics))  # nothing of ours left in the log
