"""Changelog-only coordinator loops are not committed on their own (orchestrator/deferred.py), on the real
servers: a saga whose three steps run in parallel costs the coordinator two Kafka transactions, its start
and its end, not one more per intermediate outcome; and what was put off is in the changelog once the
member stops."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from runtimes import started_runtime

from orchestrator import deferred
from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import create_topics, delete_topics
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.tooling import workload
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.inspect import transactions_in_flight
from polycommit.tooling.runtime import Runtime

POLICY = SagaPolicy(default_timeout_ms=30_000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
SAGAS = 20

pytestmark = pytest.mark.servers


@pytest.fixture
async def runtime(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtime]:
    # Longer than any step here, so the count below does not depend on the machine's speed.
    monkeypatch.setattr(deferred, "DEFER_MS", 10_000)
    # Topics of its own: no transaction left in flight by another test adds commits to the count.
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="deferred", edge_path=tmp_path / "edge")
    await create_topics(run)
    try:
        async with started_runtime(run, policy=POLICY, batch_size=200) as rt:
            yield rt
    finally:
        await delete_topics(run)


def three_steps(doc: str) -> Saga:
    saga = Saga("deferred")
    saga.step(ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": doc}))
    saga.step(ops.upsert_points(workload.DOCUMENTS, [ops.point(doc, workload.embed(doc), {"title": doc})]))
    saga.step(ops.merge_node("Document", {"id": doc}, {"title": doc}))
    return saga


async def test_a_saga_with_parallel_steps_costs_the_coordinator_two_kafka_transactions(runtime: Runtime) -> None:
    assert runtime.service is not None
    async with Coordinator(runtime.settings, timeout=60) as client:
        assert (await client.execute(three_steps(f"w-{uuid.uuid4().hex[:8]}"))).status == "completed"  # warm
        before = runtime.service.stats.kafka_transactions
        ours = [three_steps(f"d-{uuid.uuid4().hex[:8]}") for _ in range(SAGAS)]
        for saga in ours:  # one at a time: its outcomes come in separate loops
            assert (await client.execute(saga)).status == "completed"
        spent = runtime.service.stats.kafka_transactions - before
    # Two per saga (intent -> commands; last outcome -> result); a commit per outcome would be four.
    print(f"\ncoordinator Kafka transactions for {SAGAS} sagas: {spent}")
    assert spent <= 2 * SAGAS + 1, spent
    await runtime.stop()  # flushes what the last loops put off
    assert await transactions_in_flight(runtime.settings) == {}  # the changelog, as a restart would read it
