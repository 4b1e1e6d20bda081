"""The metrics endpoint serves what the workers observe: counters and histograms driven here, then scraped
over HTTP from 127.0.0.1, as Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from polycommit.tooling.metrics import Metrics, port_from


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_endpoint_serves_what_the_workers_observe() -> None:
    metrics = Metrics()
    server = metrics.serve(0)
    try:
        port = server.server_port
        assert server.server_address[0] == "127.0.0.1"
        before = _scrape(port)
        completed = ("polycommit_transactions_total", (("outcome", "completed"), ("protocol", "saga")))
        assert before.get(completed, 0.0) == 0.0
        for _ in range(3):
            metrics.observe("transaction", 1, {"protocol": "saga", "outcome": "completed"})
        metrics.observe("transaction", 1, {"protocol": "saga", "outcome": "compensated"})
        for seconds in (0.004, 0.2):
            metrics.observe("step", seconds, {"store": "neo4j"})
        metrics.observe("batch", 120, {"process": "postgres"})
        metrics.observe("consumer_lag", 42, {"process": "postgres"})
        metrics.observe("dead_letter", 1, {"process": "coordinator"})
        metrics.observe("kafka_transaction", 0.008, {})
        for kind, tx in (("stuck", "a"), ("stuck", "a"), ("stuck", "b"), ("resolved", "a")):
            metrics.observe("alert", 1, {"kind": kind, "tx_id": tx})
        after = _scrape(port)
    finally:
        server.shutdown()
    assert after[completed] == 3
    assert after[("polycommit_transactions_total", (("outcome", "compensated"), ("protocol", "saga")))] == 1
    assert after[("polycommit_step_seconds_count", (("store", "neo4j"),))] == 2
    assert after[("polycommit_step_seconds_bucket", (("le", "0.005"), ("store", "neo4j")))] == 1
    assert after[("polycommit_batch_size_sum", (("process", "postgres"),))] == 120
    assert after[("polycommit_consumer_lag", (("process", "postgres"),))] == 42
    assert after[("polycommit_dead_letters_total", (("process", "coordinator"),))] == 1
    assert after[("polycommit_kafka_transaction_seconds_count", ())] == 1
    assert after[("polycommit_stuck_transactions", ())] == 1  # "a" alerted twice, then resolved; "b" stuck


def test_the_port_comes_from_the_option_then_the_environment_and_is_off_otherwise() -> None:
    assert port_from(9100, {"POLYCOMMIT_METRICS_PORT": "9200"}) == 9100
    assert port_from(None, {"POLYCOMMIT_METRICS_PORT": "9200"}) == 9200
    assert port_from(None, {}) is None
