"""`polycommit bench`: throughput and latency of sagas over a curve of concurrencies, checked against the
stores and set beside two baselines that make the same writes with no coordination.

Each transaction makes three writes (a PostgreSQL upsert, a Qdrant upsert, a Neo4j MERGE) on keys of its
own. For each concurrency of `--concurrency 1,8,32` the run keeps that many transactions in flight; then,
once the workers have stopped (Qdrant Edge admits one process per storage path), every transaction's
writes are read back from the three stores (`verified`: success is what the stores hold, not only the
coordinator's word), and the same writes are made directly: batched like the consumers (the machine's
limit) and one call per store per transaction at the same concurrency (what a user writes by hand).
`--consumers N` runs N consumer processes for PostgreSQL and Neo4j (Qdrant too with a Qdrant server,
`QDRANT_URL`: Edge stays at one process); `--trace` prints where the median and p99 transactions spent
their time, hop by hop (polycommit.tooling.bench_trace).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polycommit.bus import create_topics
from polycommit.client import Coordinator, TransactionResult
from polycommit.config import Settings
from polycommit.errors import PolycommitError
from polycommit.tooling import bench_direct, bench_output, bench_trace
from polycommit.tooling.bench_verify import read_back
from polycommit.tooling.bench_workload import (
    COLLECTION,
    DIMENSIONS,
    LABEL,
    TABLE,
    Write,
    keep_in_flight,
    percentile,
    prepare,
    saga_of,
    stores,
    writes,
)
from polycommit.tooling.processes import PARTS, Cluster
from polycommit.tooling.runtime import Runtime

__all__ = ["COLLECTION", "DIMENSIONS", "LABEL", "TABLE", "Write", "keep_in_flight", "prepare", "saga_of", "writes"]


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--mode",
        choices=["saga", "saga-unlocked", "2pc"],
        default="saga",
        help="sagas, sagas opted out of their locks (locks=False), or two-phase commit (STRONG)",
    )
    bench.add_argument("--transactions", type=int, default=10_000, help="transactions per concurrency")
    bench.add_argument("--concurrency", default="256", help="transactions in flight; a list (1,8,32) runs a curve")
    bench.add_argument("--external", action="store_true", help="the workers already run elsewhere")
    bench.add_argument(
        "--in-process",
        action="store_true",
        help="run the coordinator and the consumers in this process (default: one process each, as deployed)",
    )
    bench.add_argument("--consumers", type=int, default=1, help="consumer processes per scalable store")
    bench.add_argument("--trace", action="store_true", help="per-hop budget of the median and p99 transaction")
    bench.add_argument("--no-direct", action="store_true", help="skip the direct-write baselines")
    bench.add_argument("--json", action="store_true")


def concurrencies(text: str) -> list[int]:
    """`--concurrency 1,8,32` -> [1, 8, 32]; each must be a positive integer."""
    values = [part.strip() for part in str(text).split(",") if part.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise SystemExit(f"polycommit bench: --concurrency wants positive integers like 1,8,32, got {text!r}")
    return [int(v) for v in values]


def scalable_stores(settings: Settings) -> tuple[str, ...]:
    """Stores whose consumer group can have several processes (Edge's storage path admits one)."""
    return ("postgres", "qdrant", "neo4j") if settings.qdrant.url else ("postgres", "neo4j")


def cluster_for(settings: Settings, consumers: int) -> Cluster:
    """One process per part, plus `consumers - 1` more for each scalable store, each a static member."""
    extra = [f"{store}#{i}" for store in scalable_stores(settings) for i in range(1, consumers)]
    cluster = Cluster(settings, names=[*PARTS, *extra], supervise=False, own_session=False)
    for name in extra:
        cluster.processes[name].extra_env = {"POLYCOMMIT_CONSUMER_INSTANCE": name.partition("#")[2]}
    return cluster


async def run_sagas(
    client: Coordinator, items: Sequence[Write], concurrency: int, progress: Progress | None, mode: str = "saga"
) -> tuple[list[float], list[TransactionResult | Exception], float]:
    """Keep `concurrency` transactions in flight; return latencies (ms), results and elapsed seconds."""
    latencies: list[float] = []
    results: list[TransactionResult | Exception] = []
    what = "two-phase commits" if mode == "2pc" else "sagas"
    task = progress.add_task(f"{what}, {concurrency} in flight", total=len(items)) if progress else None

    async def one(write: Write) -> None:
        started = time.perf_counter()
        try:
            results.append(await client.execute(saga_of(write, mode=mode)))
        except PolycommitError as exc:
            results.append(exc)
        latencies.append((time.perf_counter() - started) * 1000)
        if progress is not None and task is not None:
            progress.advance(task)

    started = time.perf_counter()
    await keep_in_flight(items, concurrency, one)
    return latencies, results, time.perf_counter() - started


def latency_summary(latencies: Sequence[float], count: int, elapsed: float) -> dict[str, float]:
    return {
        "tps": round(count / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else 0.0,
    }


def report(
    concurrency: int, latencies: list[float], results: Sequence[Any], elapsed: float, mode: str = "saga"
) -> dict[str, Any]:
    """One point of the curve, from the client's side."""
    ok = sum(1 for r in results if isinstance(r, TransactionResult) and r.ok)
    statuses: dict[str, int] = {}
    for r in results:
        key = r.status if isinstance(r, TransactionResult) else type(r).__name__
        statuses[key] = statuses.get(key, 0) + 1
    items = len(results)
    return {
        "mode": mode,
        "transactions": items,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        **latency_summary(latencies, items, elapsed),
        "ok": ok,
        "success_rate": round(ok / items, 5) if items else 0.0,
        "statuses": statuses,
    }


def passed(point: dict[str, Any]) -> bool:
    """A point passes when nearly every saga completed and the stores hold every completed one."""
    verified = point.get("verified")
    return bool(point["success_rate"] >= 0.999 and (verified is None or verified >= point["ok"]))


async def _start_workers(settings: Settings, args: argparse.Namespace) -> Runtime | Cluster | None:
    if args.external:
        return None
    if args.in_process or args.trace:
        return await Runtime(settings).start()
    return await cluster_for(settings, args.consumers).start()


async def _run_points(
    settings: Settings, args: argparse.Namespace, levels: list[int], console: Console
) -> tuple[list[tuple[dict[str, Any], list[Write]]], str, dict[str, Any]]:
    exporter = bench_trace.install() if args.trace else None
    workers = await _start_workers(settings, args)
    run = f"b{uuid.uuid4().hex[:6]}"
    points: list[tuple[dict[str, Any], list[Write]]] = []
    try:
        async with Coordinator(settings, timeout=300) as client:
            warm_up = writes(f"{run}w", min(200, args.transactions))
            await run_sagas(client, warm_up, 32, None, args.mode)
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            with Progress(*columns, console=console, transient=args.json) as progress:
                for level in levels:
                    if exporter is not None:
                        exporter.clear()
                    items = writes(f"{run}c{level}", args.transactions)
                    point = report(level, *await run_sagas(client, items, level, progress, args.mode), args.mode)
                    if exporter is not None:
                        point["budget"] = bench_trace.budget(exporter.get_finished_spans())
                    points.append((point, items))
        stats = workers.stats() if isinstance(workers, Runtime) else {}
    finally:
        if workers is not None:
            await workers.stop()
    return points, run, stats


async def _check_and_compare(
    settings: Settings, args: argparse.Namespace, run: str, points: list[tuple[dict[str, Any], list[Write]]]
) -> None:
    """After the workers stopped: read every point's writes back, then the baselines beside each point."""
    async with stores(settings) as (qdrant, neo4j):
        # With --external the consumers still hold Qdrant Edge: its writes are not read back then.
        backend = None if args.external and not settings.qdrant.url else qdrant.backend
        for point, items in points:
            checked = await read_back(settings, items, backend, neo4j.driver)
            point["verified"] = checked.verified
            point["verified_stores"] = list(checked.checked)
            point["unverified_by_store"] = checked.missing
        if args.external or args.no_direct:
            return
        batched_s = await bench_direct.batched(
            settings, qdrant.backend, neo4j.driver, writes(f"{run}d", args.transactions)
        )
        for point, _items in points:
            level = point["concurrency"]
            direct = writes(f"{run}p{level}", args.transactions)
            latencies, elapsed = await bench_direct.per_call(settings, qdrant.backend, neo4j.driver, direct, level)
            point["direct_batched_tps"] = round(args.transactions / batched_s, 1)
            point["direct_per_call"] = latency_summary(latencies, len(direct), elapsed)
            point["ratio_batched"] = round(point["tps"] / point["direct_batched_tps"], 3)
            point["ratio_per_call"] = round(point["tps"] / point["direct_per_call"]["tps"], 3)


async def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    levels = concurrencies(args.concurrency)
    if args.consumers > 1 and (args.in_process or args.trace or args.external):
        raise SystemExit(
            "polycommit bench: --consumers runs consumer processes; not with --in-process/--trace/--external"
        )
    console = Console(stderr=True)
    await create_topics(settings)
    if not args.external:
        await prepare(settings)
    points, run, stats = await _run_points(settings, args, levels, console)
    with console.status("reading the writes back; the same writes directly"):
        await _check_and_compare(settings, args, run, points)
    summaries = [point for point, _items in points]
    for point in summaries:
        point["workers_ran"] = (
            "external" if args.external else ("in-process" if args.in_process or args.trace else "subprocesses")
        )
        point["consumers_per_store"] = (
            {s: args.consumers for s in scalable_stores(settings)} if args.consumers > 1 else None
        )
    if stats:
        summaries[-1]["workers"] = stats  # cumulative over the curve
    if args.json:
        print(json.dumps(summaries, indent=2, default=str))
    else:
        bench_output.print_curve(console, summaries, args.transactions)
    return 0 if all(passed(point) for point in summaries) else 1
