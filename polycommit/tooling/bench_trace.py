"""`polycommit bench --trace`: where a transaction's time goes, hop by hop, from its spans.

The benchmark's own spans (the client's) go to an in-memory exporter; with the coordinator and the
consumers in processes of their own (the default, as deployed) each of them writes its spans to a file in
a directory of the run (POLYCOMMIT_TRACE_DIR, polycommit/span_files.py), read back once they have stopped;
with `--in-process` they share the in-memory exporter (the latency is then that of one process sharing one
event loop, not the deployed layout's). Each hop is a span (polycommit.tracing), so a transaction's budget
is its trace: the hops in the order they started, each with its offset from the transaction's start and its
own duration. Hops overlap where the system works in parallel (a command is fetched while the
coordinator's Kafka transaction that sent it commits: the fetch hop starts at the record's create time).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from polycommit import span_files, tracing


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


class BenchTracing:
    """A traced benchmark: this process's spans in memory and, with `processes`, a directory of span files
    that the parts started as processes write to (`environment()` names it to them)."""

    def __init__(self, processes: bool) -> None:
        self.exporter = install()
        self.directory = Path(tempfile.mkdtemp(prefix="polycommit-trace-")) if processes else None

    def environment(self) -> dict[str, str]:
        """What a part's environment needs to write its spans where `budget` reads them."""
        return {} if self.directory is None else {span_files.DIRECTORY_VARIABLE: str(self.directory)}

    def take(self) -> list[Any]:
        """The spans this process ended since the last `take` (one point's client spans and roots)."""
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        return spans

    def budget(self, own: Sequence[Any]) -> dict[str, Any]:
        """A point's budget: its roots pick their traces among every span file (call after the parts stopped)."""
        others = span_files.read_spans(self.directory) if self.directory is not None else []
        return budget([*own, *others])

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


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
