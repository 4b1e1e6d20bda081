"""`polycommit bench`: throughput and latency of sagas, against the same writes made directly.

Each transaction makes three writes: a PostgreSQL upsert, a Qdrant upsert and a Neo4j MERGE, on keys of
its own. `concurrency` clients' worth of transactions are kept in flight. In the same run, the same
writes are made straight to the three stores with no coordination, batched the way the consumers batch
them (one PostgreSQL transaction, one Qdrant upsert call and one Neo4j UNWIND per batch): the physical
limit of this machine. The ratio between the two is the price of coordination.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from polycommit import operations as ops
from polycommit.bus import create_topics
from polycommit.client import Coordinator, Saga, TransactionResult
from polycommit.config import Settings
from polycommit.errors import PolycommitError
from polycommit.tooling.processes import Cluster
from polycommit.tooling.runtime import Runtime, participant_for
from polycommit.tooling.workload import embed

TABLE = "bench_rows"
COLLECTION = "bench"
LABEL = "BenchNode"
DIMENSIONS = 16
BATCH = 500

T = TypeVar("T")


@dataclass(frozen=True)
class Write:
    """The three writes of one benchmark transaction."""

    key: str
    value: int
    vector: list[float]


def writes(run: str, count: int) -> list[Write]:
    return [Write(f"{run}-{i}", i, embed(f"{run}-{i}", DIMENSIONS)) for i in range(count)]


def saga_of(write: Write, *, name: str = "bench", retries: int = 0, timeout: float = 0.0, mode: str = "saga") -> Saga:
    """The three writes as one saga (or, `mode="2pc"`, one two-phase commit: consistency=STRONG);
    `retries` and `timeout` apply to each step (0: the client's defaults)."""
    saga = Saga(name)
    if mode == "2pc":
        saga.consistency = "STRONG"
    for operation in (
        ops.upsert_row(TABLE, {"id": write.key}, {"v": write.value}),
        ops.upsert_points(COLLECTION, [ops.point(write.key, write.vector, {"v": write.value})]),
        ops.merge_node(LABEL, {"id": write.key}, {"v": write.value}),
    ):
        saga.step(operation, retries=retries, timeout=timeout)
    return saga


async def keep_in_flight(items: Iterable[T], concurrency: int, run: Callable[[T], Awaitable[None]]) -> None:
    """`run` each item, `concurrency` at a time: each of that many lanes takes the next item when it is free."""
    queue = iter(items)

    async def lane() -> None:
        for item in queue:
            await run(item)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def prepare(settings: Settings) -> None:
    """Table, collection and node key of the workload; run before any consumer holds the Edge storage."""
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer NOT NULL)")
    finally:
        await conn.close()
    async with _stores(settings) as (qdrant, neo4j):
        await qdrant.ensure_collection(COLLECTION, DIMENSIONS)
        await neo4j.ensure_node_key(LABEL, ["id"])


@contextlib.asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    qdrant, neo4j = participant_for("qdrant", settings), participant_for("neo4j", settings)
    await qdrant.start()
    await neo4j.start()
    try:
        yield qdrant, neo4j
    finally:
        await qdrant.close()
        await neo4j.close()


async def run_sagas(
    client: Coordinator, items: Sequence[Write], concurrency: int, progress: Progress | None, mode: str = "saga"
) -> tuple[list[float], list[TransactionResult | Exception], float]:
    """Keep `concurrency` transactions in flight; return latencies (ms), results and elapsed seconds."""
    latencies: list[float] = []
    results: list[TransactionResult | Exception] = []
    task = progress.add_task("sagas", total=len(items)) if progress else None

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


async def run_direct(settings: Settings, items: Sequence[Write]) -> float:
    """The same writes with no coordination, batched like the consumers; returns elapsed seconds.
    Runs when no consumer is up (Qdrant Edge allows one opener)."""
    async with _stores(settings) as (qdrant_participant, neo4j_participant):
        return await _direct(settings, qdrant_participant.backend, neo4j_participant.driver, items)


async def _direct(settings: Settings, qdrant: Any, neo4j: Any, items: Sequence[Write]) -> float:
    batches = [items[i : i + BATCH] for i in range(0, len(items), BATCH)]
    conn = await asyncpg.connect(settings.postgres.dsn)

    async def postgres() -> None:
        for batch in batches:
            async with conn.transaction():
                await conn.executemany(
                    f"INSERT INTO {TABLE} (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                    [(w.key, w.value) for w in batch],
                )

    async def vectors() -> None:
        for batch in batches:
            points = {ops.point_id(w.key): {"vector": w.vector, "payload": {"v": w.value}} for w in batch}
            await qdrant.upsert(COLLECTION, points)

    async def graph() -> None:
        for batch in batches:
            async with neo4j.session() as session:
                await session.execute_write(
                    lambda tx, rows: tx.run(
                        f"UNWIND $rows AS r MERGE (n:{LABEL} {{id: r.id}}) SET n.v = r.v", rows=rows
                    ),
                    [{"id": w.key, "v": w.value} for w in batch],
                )

    started = time.perf_counter()
    try:
        await asyncio.gather(postgres(), vectors(), graph())
    finally:
        await conn.close()
    return time.perf_counter() - started


def report(
    items: int,
    concurrency: int,
    latencies: list[float],
    results: list[Any],
    elapsed: float,
    direct_s: float | None,
    mode: str = "saga",
) -> dict[str, Any]:
    ok = sum(1 for r in results if isinstance(r, TransactionResult) and r.ok)
    statuses: dict[str, int] = {}
    for r in results:
        key = r.status if isinstance(r, TransactionResult) else type(r).__name__
        statuses[key] = statuses.get(key, 0) + 1
    tps = items / elapsed if elapsed else 0.0
    direct_tps = items / direct_s if direct_s else None
    return {
        "mode": mode,
        "transactions": items,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "tps": round(tps, 1),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else 0.0,
        "success_rate": round(ok / items, 5) if items else 0.0,
        "statuses": statuses,
        "direct_tps": round(direct_tps, 1) if direct_tps else None,
        "ratio": round(tps / direct_tps, 3) if direct_tps else None,
    }


async def _start_workers(settings: Settings, args: argparse.Namespace) -> Runtime | Cluster | None:
    if args.external:
        return None
    if args.in_process:
        return await Runtime(settings).start()
    return await Cluster(settings, supervise=False, own_session=False).start()


async def _stop_workers(workers: Runtime | Cluster | None) -> None:
    if workers is not None:
        await workers.stop()


async def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    await create_topics(settings)
    if not args.external:
        await prepare(settings)
    workers = await _start_workers(settings, args)
    try:
        run = f"b{uuid.uuid4().hex[:6]}"
        async with Coordinator(settings, timeout=300) as client:
            await run_sagas(client, writes(f"{run}w", min(200, args.transactions)), 32, None, args.mode)  # warm up
            items = writes(run, args.transactions)
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            with Progress(*columns, console=console, transient=args.json) as progress:
                latencies, results, elapsed = await run_sagas(client, items, args.concurrency, progress, args.mode)
        stats = workers.stats() if isinstance(workers, Runtime) else {}
    finally:
        await _stop_workers(workers)
    direct_s = None
    if not args.external and not args.no_direct:
        with console.status("the same writes directly, batched like the consumers"):
            direct_s = await run_direct(settings, writes(f"{run}d", args.transactions))
    summary = report(args.transactions, args.concurrency, latencies, results, elapsed, direct_s, args.mode)
    summary["workers_ran"] = "external" if args.external else ("in-process" if args.in_process else "subprocesses")
    if stats:
        summary["workers"] = stats
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        table = Table(
            title=f"polycommit bench: {args.transactions} transactions ({args.mode}), concurrency {args.concurrency}"
        )
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("tps", "p50_ms", "p95_ms", "p99_ms", "success_rate", "direct_tps", "ratio", "elapsed_s"):
            table.add_row(key, str(summary[key]))
        table.add_row("statuses", json.dumps(summary["statuses"]))
        console.print(table)
    return 0 if summary["success_rate"] >= 0.999 else 1
