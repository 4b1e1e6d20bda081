"""One transaction's trace: every hop, across the client, the coordinator and the three store consumers,
lands in ONE trace, linked parent to child through the Kafka record headers; and the same run feeds the
processes' metrics."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.locking import write_keys
from polycommit import tracing
from polycommit.bus import create_topics, delete_topics
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.partitioning import partition_of
from polycommit.tooling import bench
from polycommit.tooling.metrics import Metrics
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)  # once per process: later modules run traced, into a stopped exporter
    yield spans
    provider.shutdown()


def _trace_of(spans: tuple[ReadableSpan, ...], tx_id: str) -> list[ReadableSpan]:
    roots = [
        s for s in spans if s.name == tracing.TRANSACTION and (s.attributes or {}).get("polycommit.tx_id") == tx_id
    ]
    assert len(roots) == 1, f"{len(roots)} root spans for {tx_id}"
    trace_id = roots[0].context.trace_id
    return [s for s in spans if s.context.trace_id == trace_id]


@pytest.fixture
async def own_topics(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """Topics of this test alone: the session's may hold other tests' sagas still in flight (a stuck one
    retried forever), whose commands the runtime would resend and the metrics below would count."""
    edge = dataclasses.replace(settings.qdrant, edge_path=tmp_path / "edge")
    own = dataclasses.replace(settings, topic_prefix=f"trace-{uuid.uuid4().hex[:8]}", qdrant=edge)
    await create_topics(own)
    yield own
    await delete_topics(own)


async def test_every_hop_of_a_transaction_is_in_one_trace(own_topics: Settings, exporter: InMemorySpanExporter) -> None:
    topics = own_topics
    await bench.prepare(topics)
    metrics = Metrics()
    runtime = await Runtime(topics, observe=metrics.observe).start()
    try:
        async with Coordinator(topics, timeout=60) as client:
            write = bench.writes(f"trace-{uuid.uuid4().hex[:6]}", 1)[0]
            saga = bench.saga_of(write)
            result = await client.execute(saga)
    finally:
        await runtime.stop()  # drains the coordinator's last Kafka transaction: every span has ended
    assert result.status == "completed"
    spans = _trace_of(exporter.get_finished_spans(), saga.tx_id)
    names = [s.name for s in spans]
    for hop in (
        tracing.TRANSACTION,
        tracing.CLIENT_PUBLISH,
        tracing.COORDINATOR_RECEIVE,
        tracing.COORDINATOR_DECIDE,
        tracing.COORDINATOR_COMMIT,
        tracing.CLIENT_RESULT,
    ):
        assert hop in names, f"{hop} missing from the trace: {sorted(set(names))}"
    for hop in (tracing.COMMAND_FETCH, tracing.STORE_APPLY, tracing.OUTCOME_PUBLISH):
        stores = {(s.attributes or {}).get("polycommit.store") for s in spans if s.name == hop}
        assert stores == {"postgres", "qdrant", "neo4j"}, f"{hop} seen for {stores}"
    # The intent and each of the three outcomes are received and decided: four decisions.
    assert names.count(tracing.COORDINATOR_DECIDE) == 4
    # Linked, not merely sharing an id: every span but the root has its parent in the same trace.
    ids = {s.context.span_id for s in spans}
    orphans = [
        s.name for s in spans if s.name != tracing.TRANSACTION and (s.parent is None or s.parent.span_id not in ids)
    ]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
    assert all(s.end_time is not None and s.start_time is not None and s.end_time >= s.start_time for s in spans)

    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert sample("polycommit_transactions_total", {"protocol": "saga", "outcome": "completed"}) == 1
    # The intent's and the last outcome's, at least (the other outcomes' loops may be put off and
    # committed with the last one: orchestrator/deferred.py); the consumers' commits are counted too.
    assert sample("polycommit_kafka_transaction_seconds_count") >= 2
    for store in ("postgres", "qdrant", "neo4j"):
        assert sample("polycommit_step_seconds_count", {"store": store}) == 1
        assert sample("polycommit_batch_size_count", {"process": store}) >= 1


async def test_a_saga_asking_the_partitioned_lock_manager_stays_in_one_trace(
    own_topics: Settings, exporter: InMemorySpanExporter
) -> None:
    """With the lock manager partitioned by key, the trace goes through it: each partition asked answers
    within the saga's trace (its answer span a child of the coordinator's commit of the request), and the
    store hops follow in the same trace."""
    topics = dataclasses.replace(own_topics, lock_manager="partitioned")
    await create_topics(topics, {"lock-requests": 4})  # the fixture made them with the default: already there
    await bench.prepare(topics)
    runtime = await Runtime(topics, lock_manager=True).start()
    try:
        async with Coordinator(topics, timeout=60) as client:
            saga = bench.saga_of(bench.writes(f"trace-{uuid.uuid4().hex[:6]}", 1)[0])
            result = await client.execute(saga)
    finally:
        await runtime.stop()
    assert result.status == "completed"
    spans = _trace_of(exporter.get_finished_spans(), saga.tx_id)
    names = [s.name for s in spans]
    assert runtime.service is not None and runtime.service.partitioned is not None
    partitions = runtime.service.partitioned.partitions
    asked = {partition_of(key, partitions) for key in write_keys(saga.intent("", ""))}
    assert names.count(tracing.LOCK_ANSWER) == len(asked) >= 1, sorted(names)
    for hop in (tracing.COMMAND_FETCH, tracing.STORE_APPLY, tracing.OUTCOME_PUBLISH, tracing.CLIENT_RESULT):
        assert hop in names, f"{hop} missing from the trace: {sorted(set(names))}"
    ids = {s.context.span_id for s in spans}
    orphans = [
        s.name for s in spans if s.name != tracing.TRANSACTION and (s.parent is None or s.parent.span_id not in ids)
    ]
    assert not orphans, f"spans whose parent is not in the trace: {orphans}"
