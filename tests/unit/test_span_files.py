"""Span files (polycommit/span_files.py): what a process ends is on disk at once, and reads back with the
names, trace ids, parents, times and attributes a hop budget uses; a line cut short by a kill is skipped."""

from __future__ import annotations

from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from polycommit import span_files, tracing
from polycommit.tooling.bench_trace import budget


def test_spans_written_by_one_provider_read_back_as_one_trace(tmp_path: Path) -> None:
    exporter = span_files.SpanFileExporter(span_files.file_for(tmp_path, "polycommit-neo4j"))
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    root = tracer.start_span(tracing.TRANSACTION, start_time=1_000_000)
    child = tracer.start_span(
        tracing.STORE_APPLY,
        context=trace.set_span_in_context(root),
        start_time=3_000_000,
        attributes={"polycommit.store": "neo4j", "polycommit.batch_size": 4},
    )
    child.end(end_time=7_000_000)
    root.end(end_time=9_000_000)
    # No flush, no shutdown: a part stopped hard has already written what it ended.
    (tmp_path / "polycommit-coordinator-1.jsonl").write_text('{"name": "polycommit.coordinator.dec')  # cut short

    read = {s.name: s for s in span_files.read_spans(tmp_path)}
    assert set(read) == {tracing.TRANSACTION, tracing.STORE_APPLY}
    apply = read[tracing.STORE_APPLY]
    assert apply.context.trace_id == read[tracing.TRANSACTION].context.trace_id == root.get_span_context().trace_id
    assert apply.parent_span_id == root.get_span_context().span_id
    assert (apply.start_time, apply.end_time) == (3_000_000, 7_000_000)
    assert apply.attributes == {"polycommit.store": "neo4j", "polycommit.batch_size": 4}
    found = budget(read.values())
    assert found["median"]["hops"] == [{"hop": "store.apply/neo4j", "at_ms": 2.0, "ms": 4.0}]
    provider.shutdown()
