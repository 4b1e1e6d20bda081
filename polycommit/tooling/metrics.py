"""The Prometheus endpoint of polycommit's long-running processes, fed by the workers' `Observe` calls.

Off unless asked (`--metrics-port` / POLYCOMMIT_METRICS_PORT), bound to 127.0.0.1. Each process keeps its
own registry, so tests and in-process runtimes never collide on the global one.

| series | type | labels | what |
|---|---|---|---|
| polycommit_transactions_total | counter | protocol, outcome | results published by the coordinator |
| polycommit_step_seconds | histogram | store | a command's trip: coordinator send -> outcome acked by the broker |
| polycommit_batch_size | histogram | process | records per coordinator loop / consumer batch |
| polycommit_consumer_lag | gauge | process | records behind the high watermark after the latest fetch |
| polycommit_dead_letters_total | counter | process | dead-letter records written |
| polycommit_stuck_transactions | gauge | | transactions with a `stuck` alert not yet `resolved` |
| polycommit_kafka_transaction_seconds | histogram | | the coordinator's Kafka transaction, begin -> commit |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PORT_VARIABLE = "POLYCOMMIT_METRICS_PORT"
HOST = "127.0.0.1"

# Latency buckets from 1 ms to 10 s; batch sizes from 1 to the consumers' largest batches.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    """The series of one process; `observe` is the `polycommit.tracing.Observe` the workers call."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.transactions = Counter(
            "polycommit_transactions", "Transactions ended", ["protocol", "outcome"], registry=r
        )
        self.step_seconds = Histogram(
            "polycommit_step_seconds", "Command sent to outcome acked", ["store"], buckets=SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "polycommit_batch_size", "Records per batch", ["process"], buckets=SIZES, registry=r
        )
        self.consumer_lag = Gauge(
            "polycommit_consumer_lag", "Records behind the high watermark", ["process"], registry=r
        )
        self.dead_letters = Counter("polycommit_dead_letters", "Dead-letter records written", ["process"], registry=r)
        self.stuck = Gauge("polycommit_stuck_transactions", "Transactions stuck (alert not resolved)", registry=r)
        self.kafka_transaction_seconds = Histogram(
            "polycommit_kafka_transaction_seconds", "Coordinator Kafka transaction", buckets=SECONDS, registry=r
        )
        self._stuck: set[str] = set()

    def observe(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        if name == "step":
            self.step_seconds.labels(labels["store"]).observe(value)
        elif name == "batch":
            self.batch_size.labels(labels["process"]).observe(value)
        elif name == "kafka_transaction":
            self.kafka_transaction_seconds.observe(value)
        elif name == "transaction":
            self.transactions.labels(labels["protocol"], labels["outcome"]).inc(value)
        elif name == "consumer_lag":
            self.consumer_lag.labels(labels["process"]).set(value)
        elif name == "dead_letter":
            self.dead_letters.labels(labels["process"]).inc(value)
        elif name == "alert":
            self._alert(labels["kind"], labels["tx_id"])

    def _alert(self, kind: str, tx_id: str) -> None:
        # A set, not a counter: a stuck transaction alerted again (a restarted coordinator) counts once.
        if kind == "stuck":
            self._stuck.add(tx_id)
        elif kind == "resolved":
            self._stuck.discard(tx_id)
        self.stuck.set(len(self._stuck))

    def serve(self, port: int) -> Any:
        """Serve /metrics on 127.0.0.1:`port` (0: any free port) from a daemon thread; returns the server."""
        server, _thread = start_http_server(port, addr=HOST, registry=self.registry)
        return server


def port_from(option: int | None, environ: Mapping[str, str] | None = None) -> int | None:
    """The metrics port: the command-line option, else POLYCOMMIT_METRICS_PORT, else None (off)."""
    if option is not None:
        return option
    value = (os.environ if environ is None else environ).get(PORT_VARIABLE, "")
    return int(value) if value.strip() else None
