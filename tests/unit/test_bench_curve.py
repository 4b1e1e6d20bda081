"""The benchmark's pure parts: the concurrency curve, the read-back verdict, the pass rule, the hop budget,
and the extra consumer processes of a scaling run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from polycommit import tracing
from polycommit.client import TransactionResult
from polycommit.config import load_settings
from polycommit.tooling.bench import cluster_for, concurrencies, passed, report
from polycommit.tooling.bench_trace import budget
from polycommit.tooling.bench_verify import verify
from polycommit.tooling.bench_workload import writes
from polycommit.tooling.processes import part_command


def test_a_list_of_concurrencies_is_a_curve_in_the_order_given() -> None:
    assert concurrencies("1,8,32,256,1024") == [1, 8, 32, 256, 1024]
    assert concurrencies("64") == [64]
    for bad in ("", "0", "8,x", "-1"):
        with pytest.raises(SystemExit):
            concurrencies(bad)


def test_read_back_counts_a_transaction_only_when_every_store_holds_its_value() -> None:
    items = writes("r", 4)  # values 0..3
    found: dict[str, dict[str, Any]] = {
        "postgres": {w.key: w.value for w in items},
        "qdrant": {w.key: w.value for w in items[1:]},  # the first point is missing
        "neo4j": {**{w.key: w.value for w in items}, items[2].key: 99},  # the third node has another value
    }
    checked = verify(items, found)
    assert checked.verified == 2
    assert checked.missing == {"postgres": 0, "qdrant": 1, "neo4j": 1}
    assert verify(items, {"postgres": found["postgres"]}).verified == 4  # a store not read is not judged


def _result(status: str) -> TransactionResult:
    return TransactionResult(tx_id="t", status=status, steps=(), error=None, duration_ms=1)


def test_a_point_fails_when_the_stores_hold_fewer_transactions_than_the_coordinator_reported() -> None:
    results: list[Any] = [_result("completed")] * 999 + [_result("compensated")]
    point = report(32, [float(i) for i in range(1000)], results, 2.0)
    assert (point["ok"], point["tps"], point["p50_ms"]) == (999, 500.0, 500.0)
    assert point["statuses"] == {"completed": 999, "compensated": 1}
    assert passed({**point, "verified": 999})
    assert not passed({**point, "verified": 998})
    assert passed({**point, "verified": None})  # not read back (external workers)
    assert not passed({**report(32, [1.0], [_result("compensated")] * 10, 1.0), "verified": 0})


def _span(name: str, trace_id: int, start_ms: float, end_ms: float, store: str | None = None) -> Any:
    attributes = {"polycommit.store": store} if store else {}
    return SimpleNamespace(
        name=name,
        context=SimpleNamespace(trace_id=trace_id),
        start_time=int(start_ms * 1e6),
        end_time=int(end_ms * 1e6),
        attributes=attributes,
    )


def test_the_budget_shows_the_median_and_p99_transactions_hop_by_hop() -> None:
    spans = []
    for trace_id, total in enumerate([10.0, 30.0, 20.0, 40.0, 50.0], start=1):
        base = trace_id * 1000.0
        spans.append(_span(tracing.TRANSACTION, trace_id, base, base + total))
        spans.append(_span(tracing.STORE_APPLY, trace_id, base + 2, base + 2 + total / 2, "neo4j"))
        spans.append(_span(tracing.CLIENT_PUBLISH, trace_id, base, base + 1))
    spans.append(_span(tracing.STORE_APPLY, 99, 0, 5, "postgres"))  # no root: an unfinished transaction
    found = budget(spans)
    assert found["transactions"] == 5
    assert found["median"]["total_ms"] == 30.0
    assert found["p99"]["total_ms"] == 50.0
    assert found["median"]["hops"] == [
        {"hop": "client.publish", "at_ms": 0.0, "ms": 1.0},
        {"hop": "store.apply/neo4j", "at_ms": 2.0, "ms": 15.0},
    ]
    assert found["hop_median_ms"] == {"client.publish": 1.0, "store.apply/neo4j": 15.0}
    assert budget([]) == {"transactions": 0}


def test_extra_consumers_are_static_members_of_the_scalable_stores_only(tmp_path: Path) -> None:
    settings = load_settings()
    edge = dataclasses.replace(settings, qdrant=dataclasses.replace(settings.qdrant, url=None))
    cluster = cluster_for(edge, 3)
    extra = {name: part.extra_env for name, part in cluster.processes.items() if "#" in name}
    assert extra == {
        "postgres#1": {"POLYCOMMIT_CONSUMER_INSTANCE": "1"},
        "postgres#2": {"POLYCOMMIT_CONSUMER_INSTANCE": "2"},
        "neo4j#1": {"POLYCOMMIT_CONSUMER_INSTANCE": "1"},
        "neo4j#2": {"POLYCOMMIT_CONSUMER_INSTANCE": "2"},
    }
    assert part_command("neo4j#2")[-2:] == ["consumer", "neo4j"]
    server = dataclasses.replace(settings, qdrant=dataclasses.replace(settings.qdrant, url="http://127.0.0.1:6333"))
    assert "qdrant#1" in cluster_for(server, 2).processes
    assert len(cluster_for(edge, 1).processes) == 4
