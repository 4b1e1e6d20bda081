"""Spans written to JSON-lines files, one per process, and read back: how `polycommit bench --trace` sees the
hops of the coordinator and the consumers when they run as processes of their own, as deployed.

A process started with POLYCOMMIT_TRACE_DIR set (`polycommit.tracing.configure`) appends each span it ends
to `<dir>/<service>-<pid>.jsonl`, at once (a process stopped hard loses nothing already ended). The
reader gives back spans with the few attributes a budget needs (`polycommit.tooling.bench_trace`): all
processes of one machine share its clock, so their times line up. For a benchmark, not for production:
production traces go over OTLP.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

DIRECTORY_VARIABLE = "POLYCOMMIT_TRACE_DIR"


@dataclass(frozen=True)
class SpanContext:
    trace_id: int
    span_id: int


@dataclass(frozen=True)
class FileSpan:
    """A span read back from a file: what `bench_trace` reads of an SDK span, under the same names."""

    name: str
    context: SpanContext
    parent_span_id: int | None
    start_time: int
    end_time: int
    attributes: Mapping[str, Any] = field(default_factory=dict)


class SpanFileExporter(SpanExporter):
    """Appends every exported span to one file as a JSON line, flushed line by line."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] | None = path.open("a", buffering=1, encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._file is None:
            return SpanExportResult.FAILURE
        for span in spans:
            self._file.write(json.dumps(record_of(span)) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def record_of(span: ReadableSpan) -> dict[str, Any]:
    context, parent = span.context, span.parent
    return {
        "name": span.name,
        "trace_id": context.trace_id if context is not None else 0,
        "span_id": context.span_id if context is not None else 0,
        "parent_span_id": parent.span_id if parent is not None else None,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
    }


def file_for(directory: Path, service_name: str) -> Path:
    return directory / f"{service_name}-{os.getpid()}.jsonl"


def read_spans(directory: Path) -> list[FileSpan]:
    """Every ended span the processes wrote under `directory` (a line cut short by a kill is skipped)."""
    spans: list[FileSpan] = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                raw = json.loads(line)
                spans.append(
                    FileSpan(
                        raw["name"],
                        SpanContext(int(raw["trace_id"]), int(raw["span_id"])),
                        raw["parent_span_id"],
                        int(raw["start"]),
                        int(raw["end"]),
                        raw["attributes"],
                    )
                )
            except (ValueError, KeyError, TypeError):
                continue
    return spans
