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
their time, hop by hop (polycommit.tooling.bench_trace). `--hot-keys K [--interactive]` makes transactions
contend for K hot keys and reports what it cost (polycommit.tooling.bench_contended).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polycommit.bus import create_topics
from polycommit.client import Coordinator, TransactionResult
from polycommit.config import Settings
from polycommit.errors import PolycommitError
from polycommit.tooling import (
    bench_contended,
    bench_direct,
    bench_fold,
    bench_output,
    bench_trace,
    cpu_meter,
    gc_tuning,
)
from polycommit.tooling.bench_args import add_arguments, check_options
from polycommit.tooling.bench_verify import read_back, read_values
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
from polycommit.tooling.event_loop import running_loop_name
from polycommit.tooling.processes import PARTS, Cluster, lock_manager_parts
from polycommit.tooling.runtime import Runtime

__all__ = [
    "COLLECTION",
    "DIMENSIONS",
    "LABEL",
    "TABLE",
    "Write",
    "add_arguments",
    "check_options",
    "keep_in_flight",
    "prepare",
    "saga_of",
    "writes",
]


def concurrencies(text: str) -> list[int]:
    """`--concurrency 1,8,32` -> [1, 8, 32]; each must be a positive integer."""
    values = [part.strip() for part in str(text).split(",") if part.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise SystemExit(f"polycommit bench: --concurrency wants positive integers like 1,8,32, got {text!r}")
    return [int(v) for v in values]


def scalable_stores(settings: Settings) -> tuple[str, ...]:
    """Stores whose consumer group can have several processes (Edge's storage path admits one)."""
    return ("postgres", "qdrant", "neo4j") if settings.qdrant.url else ("postgres", "neo4j")


def cluster_for(
    settings: Settings, consumers: int, *, detector: bool = False, env: Mapping[str, str] | None = None
) -> Cluster:
    """One process per part (and the deadlock detector if asked), plus `consumers - 1` more for each scalable
    store, each a static member; `env` goes to every part's environment."""
    extra = [f"{store}#{i}" for store in scalable_stores(settings) for i in range(1, consumers)]
    parts = [*PARTS, *(["detector"] if detector else []), *lock_manager_parts(settings)]
    cluster = Cluster(settings, names=[*parts, *extra], supervise=False, own_session=False)
    for name, part in cluster.processes.items():
        instance = {"POLYCOMMIT_CONSUMER_INSTANCE": name.partition("#")[2]} if name in extra else {}
        part.extra_env = {**(env or {}), **instance}
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
        "event_loop": running_loop_name(),  # the bench's own; its subprocesses get the same (tooling/event_loop.py)
        "gc": "tuned" if gc_tuning.tuned() else "default",  # tooling/gc_tuning.py, the same in every process
    }


def passed(point: dict[str, Any]) -> bool:
    """A point passes when nearly every saga completed and the stores hold every completed one."""
    verified = point.get("verified")
    enough = point.get("verified_of", point["ok"])  # hot keys: every key written, not every transaction
    lost = point.get("lost_updates")
    return bool(
        point["success_rate"] >= 0.999
        and (verified is None or verified >= enough)
        and (lost is None or not point.get("reads_locked") or lost == 0)
    )


async def _start_workers(
    settings: Settings, args: argparse.Namespace, env: Mapping[str, str]
) -> Runtime | Cluster | None:
    if args.external:
        return None
    if args.in_process:
        return await Runtime(settings, detector=args.interactive).start()
    return await cluster_for(settings, args.consumers, detector=args.interactive, env=env).start()


async def _run_points(
    settings: Settings, args: argparse.Namespace, levels: list[int], console: Console
) -> tuple[list[tuple[dict[str, Any], list[Write]]], str, dict[str, Any]]:
    tracer = bench_trace.BenchTracing(processes=not (args.in_process or args.external)) if args.trace else None
    run = f"b{uuid.uuid4().hex[:6]}"
    try:
        points, traced, stats = await _measure(settings, args, levels, console, run, tracer)
        if tracer is not None:  # the parts have stopped: their span files are complete
            for (point, _items), own in zip(points, traced, strict=True):
                point["budget"] = tracer.budget(own)
    finally:
        if tracer is not None:
            tracer.close()
    return points, run, stats


async def _measure(
    settings: Settings,
    args: argparse.Namespace,
    levels: list[int],
    console: Console,
    run: str,
    tracer: bench_trace.BenchTracing | None,
) -> tuple[list[tuple[dict[str, Any], list[Write]]], list[list[Any]], dict[str, Any]]:
    """Each point of the curve after a warm-up, with the benchmark's own spans of each when traced."""
    points: list[tuple[dict[str, Any], list[Write]]] = []
    traced: list[list[Any]] = []
    workers = await _start_workers(settings, args, tracer.environment() if tracer is not None else {})
    try:
        async with Coordinator(settings, timeout=300) as client:
            warm_up = writes(f"{run}w", min(200, args.transactions))
            await run_sagas(client, warm_up, 32, None, args.mode)
            gc_tuning.settle()  # the client (and an in-process stack) is built: the collector stops scanning it
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            meter = cpu_meter.CpuMeter(cpu_meter.bench_parts(settings, workers))
            with Progress(*columns, console=console, transient=args.json) as progress:
                for level in levels:
                    if tracer is not None:
                        tracer.take()  # the warm-up's or the point before's
                    before = meter.sample()
                    points.append(await _one_point(client, args, f"{run}c{level}", level, progress))
                    points[-1][0]["cpu"] = meter.per_transaction(before, meter.sample(), points[-1][0]["ok"])
                    if tracer is not None:
                        traced.append(tracer.take())
        stats = workers.stats() if isinstance(workers, Runtime) else {}
    finally:
        if workers is not None:
            await workers.stop()
    return points, traced, stats


async def _one_point(
    client: Coordinator, args: argparse.Namespace, name: str, level: int, progress: Progress
) -> tuple[dict[str, Any], list[Write]]:
    """One point of the curve: fresh keys (the default), sagas on hot keys, or interactive increments."""
    if not args.hot_keys:
        items = writes(name, args.transactions)
        return report(level, *await run_sagas(client, items, level, progress, args.mode), args.mode), items
    hot = bench_contended.hot_transactions(name, args.transactions, args.hot_keys)
    items = [t.write for t in hot]
    if args.interactive:
        options = {
            "retries": args.retries,
            "isolation": args.isolation,
            "for_update": args.for_update,
            "read_for_update": args.read_for_update,
            "lock_at": args.lock_at,
            "consistency": "STRONG" if args.mode == "2pc" else "EVENTUAL",  # 2pc: run by two-phase commit
        }
        latencies, results, elapsed, contention = await bench_contended.run_interactive(
            client, hot, level, progress, options
        )
        point = report(level, latencies, results, elapsed, args.mode)
    else:
        latencies, results, elapsed = await run_sagas(client, items, level, progress, args.mode)
        point = report(level, latencies, results, elapsed, args.mode)
        contention = bench_contended.Contention(
            [r.error_class or "" if isinstance(r, TransactionResult) else type(r).__name__ for r in results]
        )
    point.update(bench_contended.contention_summary(contention))
    point.update(
        hot_keys=args.hot_keys,
        interactive=args.interactive,
        isolation=args.isolation,
        for_update=args.for_update,
        read_for_update=args.read_for_update,
        lock_at=args.lock_at if args.interactive else None,
        reads_locked=args.interactive
        and bench_contended.reads_locked(args.isolation, args.for_update or args.read_for_update),
    )
    return point, items


async def _verify_hot(
    settings: Settings, args: argparse.Namespace, point: dict[str, Any], items: list[Write], backend: Any, driver: Any
) -> None:
    """Hot keys: the stores must agree on each written key's final value; increments must all be counted."""
    keys = sorted({w.key for w in items})
    found = await read_values(settings, keys, backend, driver)
    checked = bench_contended.agreement(keys, found)
    point["verified"], point["verified_of"] = checked.verified, len(keys)
    point["verified_stores"], point["unverified_by_store"] = list(checked.checked), checked.missing
    if args.interactive:
        point["lost_updates"] = bench_contended.lost_updates(keys, found["postgres"], point["ok"])


async def _check_and_compare(
    settings: Settings, args: argparse.Namespace, run: str, points: list[tuple[dict[str, Any], list[Write]]]
) -> None:
    """After the workers stopped: read every point's writes back, then the baselines beside each point."""
    # With --external the consumers still hold Qdrant Edge (one opener per storage): its writes are not
    # read back then, and it is not opened at all (opening it failed the whole read-back).
    edge_held = args.external and not settings.qdrant.url
    async with stores(settings, with_qdrant=not edge_held) as (qdrant, neo4j):
        backend = None if qdrant is None else qdrant.backend
        for point, items in points:
            if args.hot_keys:
                await _verify_hot(settings, args, point, items, backend, neo4j.driver)
                continue
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
    check_options(args)
    if args.fold:
        return await bench_fold.report(settings, args.transactions, levels[0], args.json, Console(stderr=True))
    if args.consumers > 1 and (args.in_process or args.external):
        raise SystemExit("polycommit bench: --consumers runs consumer processes; not with --in-process/--external")
    console = Console(stderr=True)
    # A consumer per partition: a store's extra consumers need its command topic split as many ways.
    await create_topics(settings, {f"commands.{store}": args.consumers for store in scalable_stores(settings)})
    if not args.external:
        await prepare(settings)
    points, run, stats = await _run_points(settings, args, levels, console)
    with console.status("reading the writes back; the same writes directly"):
        await _check_and_compare(settings, args, run, points)
    summaries = [point for point, _items in points]
    for point in summaries:
        point["workers_ran"] = "external" if args.external else ("in-process" if args.in_process else "subprocesses")
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
