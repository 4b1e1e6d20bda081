"""Trace spans of one transaction across polycommit's processes: OpenTelemetry, with the W3C trace context
carried in Kafka record headers (`traceparent`, `tracestate`).

Library-safe: importing polycommit configures nothing. Spans are made only when a real tracer provider is
installed, by `configure()` in polycommit's own processes when an OTLP endpoint is set, or by the
application that hosts the client. Otherwise every helper returns at once and no header is written, so an
untraced run pays one provider lookup per hop and sends the same bytes as before.

Batched hops (the coordinator's loop, a consumer's batch) make one span per transaction, with the batch
size as an attribute and the batch's start and end times: the cost is one span per transaction per hop
when tracing is on, and each transaction's trace stays complete (a link from a batch span would leave
the hop out of the transaction's own trace).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Headers = Sequence[tuple[str, bytes]]

_PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = frozenset(_PROPAGATOR.fields)
TRACER_NAME = "polycommit"
ENDPOINT_VARIABLES = ("POLYCOMMIT_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

# Span names, one per hop of a transaction (see README's "Tracing and metrics").
TRANSACTION = "polycommit.transaction"
CLIENT_PUBLISH = "polycommit.client.publish"
COORDINATOR_RECEIVE = "polycommit.coordinator.receive"
COORDINATOR_DECIDE = "polycommit.coordinator.decide"
COORDINATOR_COMMIT = "polycommit.coordinator.kafka_commit"
COMMAND_FETCH = "polycommit.command.fetch"
STORE_APPLY = "polycommit.store.apply"
OUTCOME_PUBLISH = "polycommit.outcome.publish"
CLIENT_RESULT = "polycommit.client.result"
LOCK_ANSWER = "polycommit.lock_manager.answer"  # a lock request's fetch and answer, up to its grant's publish


# What a process reports for its metrics: observe(name, value, labels). The coordinator and the consumers
# call it (a no-op by default); polycommit.tooling.metrics turns it into Prometheus series, so neither
# the library nor the workers import the tooling.
Observe = Callable[[str, float, Mapping[str, str]], None]


def ignore(name: str, value: float, labels: Mapping[str, str]) -> None:
    """The default `Observe`: metrics off."""


def enabled() -> bool:
    """Whether a real tracer provider is installed (the API's default is a proxy to a no-op).

    Asked once per batch or record: it reads the API's global directly, as `get_tracer_provider()` looks
    up an environment variable on every call while none is set (measured 7-8 us a call, busy machine)."""
    provider = getattr(trace, "_TRACER_PROVIDER", None)
    return provider is not None and not isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider))


def tracer() -> Tracer:
    return trace.get_tracer(TRACER_NAME)


def headers_of(span: Span | None) -> Headers | None:
    """The W3C trace context of `span` as Kafka headers (None when there is nothing to carry)."""
    if span is None or not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return [(name, value.encode()) for name, value in carrier.items()]


def parent_of(headers: Headers | None) -> Context | None:
    """The trace context a record's headers carry, or None: an untraced record starts no trace."""
    if not headers:
        return None
    carrier = {name: bytes(value).decode(errors="replace") for name, value in headers if name in _FIELDS}
    if "traceparent" not in carrier:
        return None
    parent = _PROPAGATOR.extract(carrier)
    return parent if trace.get_current_span(parent).get_span_context().is_valid else None


def in_context(span: Span) -> Context:
    return trace.set_span_in_context(span)


def record_time_ns(record: Any) -> int:
    """A Kafka record's timestamp (the producer's create time, ms) in nanoseconds since the epoch."""
    return int(getattr(record, "timestamp", 0) or 0) * 1_000_000


def now_ns() -> int:
    return time.time_ns()


def span(
    name: str,
    parent: Context | None,
    start_ns: int,
    end_ns: int | None = None,
    attributes: Mapping[str, str | int] | None = None,
) -> Span | None:
    """A span of a hop that already happened (or, with no `end_ns`, one still open): None without a parent."""
    if parent is None:
        return None
    made = tracer().start_span(name, context=parent, start_time=start_ns, attributes=attributes)
    if end_ns is not None:
        made.end(end_time=max(start_ns, end_ns))
    return made


def end_all(spans: Sequence[Span | None], end_ns: int | None = None) -> None:
    at = end_ns or now_ns()
    for made in spans:
        if made is not None:
            made.end(end_time=at)


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install an SDK tracer provider exporting over OTLP when an endpoint is configured, and to a span file
    when POLYCOMMIT_TRACE_DIR names a directory (`polycommit bench --trace`, polycommit/span_files.py);
    True if it did.

    Called by polycommit's own processes (`polycommit run`, `consumer`, `bench`), never on import."""
    env = os.environ if environ is None else environ
    trace.get_tracer_provider()  # loads a provider named by OTEL_PYTHON_TRACER_PROVIDER, if any
    endpoint = next((env[name] for name in ENDPOINT_VARIABLES if env.get(name)), None)
    from polycommit import span_files

    directory = env.get(span_files.DIRECTORY_VARIABLE)
    if (endpoint is None and not directory) or enabled():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if endpoint is not None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if directory:
        # Written as each span ends, so a part stopped hard has lost none. A batching processor measured no
        # cheaper (c=32: 250-276 vs 240-249 TPS traced, 391 untraced): the spans themselves are the cost.
        exporter = span_files.SpanFileExporter(span_files.file_for(Path(directory), service_name))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def client_publish(roots: dict[str, Span], tx_id: str, name: str) -> Span | None:
    """When traced: open the transaction's root span (kept in `roots` until its result) and its publish span."""
    if not enabled():
        return None
    root = roots[tx_id] = tracer().start_span(
        TRANSACTION, attributes={"polycommit.tx_id": tx_id, "polycommit.name": name}
    )
    return span(CLIENT_PUBLISH, in_context(root), now_ns())


def client_result(roots: Mapping[str, Span], record: Any) -> None:
    """The result's delivery, from the coordinator's send to the client's fetch, in the transaction's trace."""
    root = roots.get(_key_of(record)) if roots else None
    if root is not None:
        span(CLIENT_RESULT, parent_of(record.headers) or in_context(root), record_time_ns(record), now_ns())


class LoopTrace:
    """The spans a batched loop keeps for the transactions of its current batch; inert when untraced.

    The coordinator's loop calls `batch_read` after each fetch, `received` / `decided` around each
    record's fold (the records it publishes carry `headers()`), and hands `take()` to the Kafka
    transaction that publishes them, which ends those spans once committed."""

    def __init__(self) -> None:
        self.on = False
        self.read_at_ns = 0
        self._decide: Span | None = None
        self._commit: Span | None = None
        self._open: list[Span] = []

    def batch_read(self) -> None:
        self.on = enabled()
        if self.on:
            self.read_at_ns = now_ns()

    def received(self, record: Any) -> None:
        self._decide = self._commit = None
        parent = parent_of(record.headers) if self.on else None
        if parent is None:
            return
        attributes = {"polycommit.tx_id": _key_of(record), "messaging.destination": str(record.topic)}
        span(COORDINATOR_RECEIVE, parent, record_time_ns(record), self.read_at_ns, attributes)
        started = now_ns()
        self._decide = span(COORDINATOR_DECIDE, parent, started, None, attributes)
        # Open from the decision until the Kafka transaction that publishes it commits.
        self._commit = span(COORDINATOR_COMMIT, parent, started, None, attributes)
        if self._commit is not None:
            self._open.append(self._commit)

    def decided(self) -> None:
        if self._decide is not None:
            self._decide.end()
        self._decide = self._commit = None  # a timer's decision, folded next, belongs to no input's trace

    def headers(self) -> Headers | None:
        """The context the records decided from the current input carry (None when untraced)."""
        return None if self._commit is None else headers_of(self._commit)

    def take(self) -> list[Span]:
        taken, self._open = self._open, []
        return taken


def consumer_hops(
    record: Any, read_at_ns: int, apply_ns: tuple[int, int], attributes: Mapping[str, str | int]
) -> Span | None:
    """One command's hops in a store consumer's batch: fetch (from the coordinator's send to this fetch) and
    apply (the batch's store round trip), ended; returns its outcome's publish span, open until acked."""
    parent = parent_of(record.headers)
    if parent is None:
        return None
    attributes = {"polycommit.tx_id": _key_of(record), **attributes}
    span(COMMAND_FETCH, parent, record_time_ns(record), read_at_ns, attributes)
    applied = span(STORE_APPLY, parent, apply_ns[0], apply_ns[1], attributes)
    return span(OUTCOME_PUBLISH, in_context(applied) if applied else parent, apply_ns[1], None, attributes)


def _key_of(record: Any) -> str:
    return record.key.decode(errors="replace") if record.key else ""
