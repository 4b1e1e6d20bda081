"""`polycommit bench --trace`: where a transaction's time goes, hop by hop, from its spans.

The spans of the coordinator and the consumers are only visible together in one process, so `--trace`
runs the parts in-process (`--in-process`) with an in-memory span exporter; the latency is then that of a
single process on this machine, sharing one event loop, not the deployed layout's. Each hop is a span
(polycommit.tracing), so a transaction's budget is its trace: the hops in the order they started, each
with its offset from the transaction's start and its own duration. Hops overlap where the system works
in parallel (a command is fetched while the coordinator's Kafka transaction that sent it commits: the
fetch hop starts at the record's create time).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from polycommit import tracing


def install() -> Any:
    """Install an SDK tracer provider with an in-memory exporter in this process; returns the exporter."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def hop_name(span: Any) -> str:
    name = str(span.name).removeprefix("polycommit.")
    store = (span.attributes or {}).get("polycommit.store")
    return f"{name}/{store}" if store else name


def traces(spans: Iterable[Any]) -> list[tuple[Any, list[Any]]]:
    """(root span, its trace's other spans), for each trace that has a finished transaction root."""
    by_trace: dict[int, list[Any]] = defaultdict(list)
    roots: dict[int, Any] = {}
    for span in spans:
        trace_id = span.context.trace_id
        if span.name == tracing.TRANSACTION:
            roots[trace_id] = span
        else:
            by_trace[trace_id].append(span)
    return [(root, by_trace[trace_id]) for trace_id, root in roots.items()]


def budget_of(root: Any, spans: Sequence[Any]) -> dict[str, Any]:
    """One transaction's hops in start order: offset from its start and duration, in milliseconds."""
    hops = [
        {
            "hop": hop_name(s),
            "at_ms": round((s.start_time - root.start_time) / 1e6, 2),
            "ms": round((s.end_time - s.start_time) / 1e6, 2),
        }
        for s in sorted(spans, key=lambda s: (s.start_time, s.end_time))
    ]
    return {"total_ms": round((root.end_time - root.start_time) / 1e6, 2), "hops": hops}


def budget(spans: Iterable[Any]) -> dict[str, Any]:
    """The median and the p99 transaction's hop budgets, and each hop's median duration over all."""
    found = sorted(traces(spans), key=lambda pair: pair[0].end_time - pair[0].start_time)
    if not found:
        return {"transactions": 0}
    durations: dict[str, list[float]] = defaultdict(list)
    for _root, members in found:
        for span in members:
            durations[hop_name(span)].append((span.end_time - span.start_time) / 1e6)
    median_hop = {hop: round(sorted(values)[len(values) // 2], 2) for hop, values in sorted(durations.items())}
    return {
        "transactions": len(found),
        "median": budget_of(*found[len(found) // 2]),
        "p99": budget_of(*found[min(len(found) - 1, int(0.99 * len(found)))]),
        "hop_median_ms": median_hop,
    }
