"""`polycommit chaos`: run the system as separate processes, kill its parts and servers under load, judge.

The coordinator and the three store consumers run as subprocesses (`polycommit run coordinator`,
`polycommit consumer <store>`), ready once they print their "polycommit running" line. This process
sends bench-style transactions (a PostgreSQL row, a Qdrant point and a Neo4j node on keys of their own;
a seeded fraction fail at a last step and are compensated, another runs with a short step timeout —
chaos_workload.py) keeping `--concurrency` in flight, and meanwhile, `--kills` times, SIGKILLs one
seeded target — a subprocess, the Kafka broker, PostgreSQL, Neo4j or the client itself
(chaos_kills.py) — and restarts it. Each kill's *recovery time* runs from the kill to the first result
received after the restarted target was ready again (for the coordinator and the broker every result
needs them, so this is the true stall; for a store consumer, results of transactions already past that
store may arrive sooner, and are not counted).

`--mode 2pc` sends two-phase commits instead (consistency=STRONG; a seeded fraction abort because a
participant votes no), and the verdict also requires that no prepared PostgreSQL transaction of the run
is left open (`prepared_left`, 0); `--mode mixed` sends both, a seeded half each. `--hot-keys K` draws
every transaction's key among K, so sagas and two-phase commits wait for one another's locks (one lock
table for both) and the checker judges each key by its writers in lock-grant order. `--mode interactive`
runs interactive increments on the hot keys (default 10), locking as each access is made so deadlocks
happen, with the deadlock detector running and among the targets (chaos_interactive.py).

The servers killed are those of the settings' home: run it against
servers of its own (a POLYCOMMIT_HOME and ports of its own), never against servers others are using.

A subprocess that exits on its own (say, when the broker vanishes under it) is restarted, as a supervisor
would, and listed in the report. At the end every subprocess is stopped cleanly, results the clients
missed are read back from the `results` topic, and `polycommit.tooling.checker` judges the stores. The exit code
is 0 only when there is no violation and every transaction has a result.

Each run has its own topic prefix (`chaos-<id>`) and its own Qdrant Edge storage under the data folder,
so it never fights a running demo. The subprocesses are a `polycommit.tooling.processes.Cluster`, as in the
fault tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polycommit.client import Saga
from polycommit.config import Settings
from polycommit.tooling import bench_contended
from polycommit.tooling.bench import prepare, writes
from polycommit.tooling.chaos_interactive import IncrementMode, Increments, judge_counts, run_increments
from polycommit.tooling.chaos_kills import (
    TARGETS,
    Kill,
    Killer,
    TargetLost,
    coordinator_parts,
    kill_broker,
    kill_schedule,
)
from polycommit.tooling.chaos_summary import print_summary, summarize
from polycommit.tooling.chaos_workload import (
    ClientSlot,
    Mix,
    Progressed,
    hot_writes,
    mixed,
    recover_results,
    run_workload,
    saga_of,
)
from polycommit.tooling.checker import History, check
from polycommit.tooling.checker.log import read_log
from polycommit.tooling.processes import PARTS, Cluster, lock_manager_parts

INTERACTIVE_HOT_KEYS = 10  # --mode interactive without --hot-keys

__all__ = ["TARGETS", "ChaosRun", "kill_broker", "kill_schedule", "run_chaos", "run_settings", "saga_of"]


# -- settings and data of one run -------------------------------------------------------------------


def run_settings(base: Settings, run_id: str, *, prefix: str = "chaos", edge_path: Path | None = None) -> Settings:
    """The settings of a run: its own topic prefix and Qdrant Edge folder."""
    edge = edge_path if edge_path is not None else base.data_dir / "chaos" / run_id / "qdrant-edge"
    return dataclasses.replace(
        base, topic_prefix=f"{prefix}-{run_id}", qdrant=dataclasses.replace(base.qdrant, edge_path=edge)
    )


async def prepared_left(settings: Settings) -> list[str]:
    """This run's prepared PostgreSQL transactions (gids `pc_<space>_...`) still open."""
    import asyncpg

    from consumers.postgres import twophase

    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        space = twophase.space_of(settings.topic_prefix)
        return sorted(r[0] for r in await conn.fetch(twophase.PREPARED_GIDS, f"{twophase.GID_PREFIX}{space}_"))
    finally:
        await conn.close()


# -- the command ------------------------------------------------------------------------------------


@dataclass
class ChaosRun:
    """One run's identity and what it gathers: the history, progress, kills and client errors."""

    run_id: str
    settings: Settings
    log_dir: Path
    schedule: list[tuple[int, str]]
    cluster: Cluster
    history: History = field(default_factory=History)
    progressed: Progressed = field(default_factory=Progressed)
    kills: list[Kill] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    reruns: list[str] = field(default_factory=list)  # sagas sent again after a lock wait or a deadlock
    mix: dict[str, int] = field(default_factory=dict)  # sagas sent of each kind (chaos_workload.mixed)
    increments: Increments = field(default_factory=Increments)  # --mode interactive


async def run_chaos(base: Settings, args: argparse.Namespace) -> int:
    from polycommit.bus import create_topics

    console = Console(stderr=True)
    if not getattr(args, "verbose", False):
        # The broker going away is the point of the run: the client's retry warnings would drown the progress.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    run_id = uuid.uuid4().hex[:8]
    settings = run_settings(base, run_id)
    log_dir = base.log_dir / f"chaos-{run_id}"
    members = coordinator_parts(getattr(args, "coordinators", 1))
    detector = ["detector"] if interactive(args) else []
    locker = lock_manager_parts(base)
    if locker and args.mode != "saga":
        console.print(f"[red]--mode {args.mode}: the partitioned lock manager serves sagas only[/red]")
        return 2
    every = [*TARGETS, *members[1:], *detector, *locker]
    targets = [t for t in args.targets.split(",") if t] if args.targets else every
    unknown = sorted(set(targets) - set(every))
    if unknown:
        console.print(f"[red]unknown targets {unknown}; choose from {', '.join(every)}[/red]")
        return 2
    failing, short = getattr(args, "failing", 0.1), getattr(args, "short_timeout", 0.1)
    if min(failing, short) < 0 or failing + short > 1:
        console.print("[red]--failing and --short-timeout are fractions of the sagas: each >= 0, together <= 1[/red]")
        return 2
    brokers = getattr(args, "kafka_brokers", None)
    if brokers is not None and brokers != base.kafka.brokers:
        console.print(
            f"[red]the local Kafka runs {base.kafka.brokers} broker(s), not {brokers}: "
            f"scripts/services start --kafka-brokers {brokers} first[/red]"
        )
        return 2
    rng = random.Random(args.seed)
    schedule = kill_schedule(rng, args.transactions, args.kills, targets)
    console.print(f"chaos run {run_id}: topics {settings.topic_prefix}.*, logs {log_dir}, seed {args.seed}")
    split = base.coordinator_members == "partitioned"  # each member owns a partition of the transactions
    await create_topics(settings, {"intents": len(members)} if split else None)
    await prepare(settings)
    parts = [*members, *(p for p in PARTS if p != "coordinator"), *detector, *locker]
    run = ChaosRun(run_id, settings, log_dir, schedule, Cluster(settings, log_dir, names=parts))
    started = time.monotonic()
    try:
        await _drive(run, args, console, started)
    except TargetLost as exc:
        console.print(f"[red]chaos run {run_id} stopped: {exc}[/red]")
        console.print(
            f"kept: topics {settings.topic_prefix}.*, Qdrant Edge {settings.qdrant.edge_path}, logs {log_dir}"
        )
        return 1
    finally:
        codes = await run.cluster.stop()
    return await _judge(run, args, console, codes, time.monotonic() - started)


async def _drive(run: ChaosRun, args: argparse.Namespace, console: Console, started: float) -> None:
    """Start the parts, run the workload while the kills happen, then read the results the clients missed."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=args.json) as progress:
        bar = progress.add_task("starting processes", total=args.transactions)
        chaos = progress.add_task("chaos: waiting", total=len(run.schedule))
        run.cluster.on_exit = lambda e: progress.console.print(f"[yellow]{e.name} exited alone ({e.code}); restarting")
        await run.cluster.start()
        progress.update(bar, description="transactions")
        if interactive(args):
            await _drive_increments(run, args, progress, bar, chaos, started)
            return
        hot, name = getattr(args, "hot_keys", 0), f"x{run.run_id}"
        keys = random.Random(f"{args.seed}/keys")
        items = hot_writes(name, args.transactions, hot, keys) if hot else writes(name, args.transactions)
        mix = Mix(failing=getattr(args, "failing", 0.1), short_timeout=getattr(args, "short_timeout", 0.1))

        def sagas() -> Iterator[Saga]:
            rng = random.Random(f"{args.seed}/mix")
            for kind, saga in mixed(items, mix, rng, args.step_timeout, getattr(args, "mode", "saga")):
                run.mix[kind] = run.mix.get(kind, 0) + 1
                yield saga

        def advance() -> None:
            progress.advance(bar)

        async def workload(slot: ClientSlot) -> None:
            await run_workload(
                slot,
                run.history,
                sagas(),
                args.concurrency,
                run.progressed,
                run.errors,
                advance,
                run.retried,
                run.reruns,
            )

        await _under_kills(run, args, progress, chaos, started, workload)
        progress.update(bar, description="recovering missed results from the log")
        await recover_results(run.settings, run.history, 60.0)
        progress.update(bar, description="stopping processes")


async def _drive_increments(
    run: ChaosRun, args: argparse.Namespace, progress: Progress, bar: Any, chaos: Any, started: float
) -> None:
    """--mode interactive: the increments while the kills happen, then the results the client missed."""
    items = bench_contended.hot_transactions(f"x{run.run_id}", args.transactions, hot_keys_of(args), args.seed)
    mode = IncrementMode.of(args)

    async def workload(slot: ClientSlot) -> None:
        await run_increments(
            slot, items, args.concurrency, run.progressed, run.increments, lambda: progress.advance(bar), mode
        )

    await _under_kills(run, args, progress, chaos, started, workload)
    progress.update(bar, description="recovering missed results from the log")
    run.increments.unsent(await recover_results(run.settings, run.increments.history, 60.0))
    progress.update(bar, description="stopping processes")


async def _under_kills(
    run: ChaosRun,
    args: argparse.Namespace,
    progress: Progress,
    chaos: Any,
    started: float,
    work: Callable[[ClientSlot], Awaitable[None]],
) -> None:
    """Run `work` with the run's client while the killer makes the scheduled kills, both to their end."""

    def describe(text: str) -> None:
        progress.update(chaos, description=f"chaos: {text}", completed=len(run.kills))

    slot = ClientSlot(run.settings, args.timeout)
    await slot.start()
    killer = Killer(run.settings, run.cluster, slot, run.progressed, args.transactions, started, run.kills, describe)
    kills = asyncio.create_task(killer.run(run.schedule))

    async def workload() -> None:
        try:
            await work(slot)
        finally:
            await run.progressed.wake()  # the killer may be waiting for results that will not come

    try:
        await _together(asyncio.create_task(workload()), kills)
    finally:
        await slot.close()
    describe("done")


def interactive(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "mode", "saga") == "interactive")


def hot_keys_of(args: argparse.Namespace) -> int:
    return getattr(args, "hot_keys", 0) or INTERACTIVE_HOT_KEYS


async def _together(work: asyncio.Task[None], kills: asyncio.Task[None]) -> None:
    """Run the workload and the kills to their end; a target that never comes back (TargetLost) ends the
    run at once, since the transactions that need it could never finish."""
    try:
        await asyncio.wait({work, kills}, return_when=asyncio.FIRST_EXCEPTION)
        if kills.done():
            await kills  # raises what the killer raised
        await work
        await kills
    finally:
        for task in (work, kills):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _judge(run: ChaosRun, args: argparse.Namespace, console: Console, codes: Any, elapsed: float) -> int:
    """Check the stores, print the summary, and clean up after a clean run (keep everything otherwise)."""
    from polycommit.bus import delete_topics

    increments = interactive(args)
    # Interactive attempts are judged by the checker too: each written hot key against its last writer in
    # lock-grant order, the markers, the log's own rules.
    settings, history = run.settings, (run.increments.history if increments else run.history)
    with console.status("checking the stores"):
        # With the log's facts, as `polycommit check` judges: a shared (hot) key's expected value is its
        # last writer's in lock-grant order (applied times do not order a saga's write and a two-phase
        # commit's across stores), and the log's own classes (applied twice, undecided, orphans) count.
        _, facts = await read_log(settings)
        shared = increments or bool(getattr(args, "hot_keys", 0))
        report = await check(settings, history, keys_owned=not shared, log=facts)
        keys = bench_contended.hot_keys(f"x{run.run_id}", hot_keys_of(args)) if increments else []
        counts = await judge_counts(settings, keys, run.increments) if increments else None
    summary = summarize(run.run_id, history, run.kills, run.cluster.unexpected_exits, report, elapsed, run.errors)
    if counts is not None:
        summary["increments"] = counts
        summary["statuses"] = run.increments.statuses()  # of every attempt
        summary["transactions"] = args.transactions
        mode = IncrementMode.of(args)
        summary["lock_at"], summary["consistency"] = mode.lock_at, mode.consistency
    summary["retried_after_timeout"] = len(run.retried)
    summary["run_again"] = len(run.reruns)
    summary["exit_codes"] = codes
    summary["mix"] = dict(sorted(run.mix.items()))
    summary["mode"] = getattr(args, "mode", "saga")
    # Two-phase commit's prepared transactions of this run still open in PostgreSQL: must be none.
    left = await prepared_left(settings)
    summary["prepared_left"], summary["prepared_left_gids"] = len(left), left[:20]
    # A process that exited without being killed crashed: the run fails, even if the stores came out right
    # (the supervisor restarted it), since no fault chaos makes may end a coordinator or a consumer.
    ok = report.ok and not history.missing() and not left and not run.cluster.unexpected_exits
    ok = ok and (counts is None or (counts["counts_ok"] and counts["stores_agree"]))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(console, summary)
    if ok and not args.keep:
        await delete_topics(settings)
        shutil.rmtree(settings.data_dir / "chaos" / run.run_id, ignore_errors=True)
        shutil.rmtree(run.log_dir, ignore_errors=True)
    else:
        console.print(
            f"kept: topics {settings.topic_prefix}.*, Qdrant Edge {settings.qdrant.edge_path}, logs {run.log_dir}"
        )
        # The run's points are in its own Edge storage: judged against the default one, every point of
        # the run would look missing.
        where = "" if settings.qdrant.url else f"POLYCOMMIT_QDRANT_EDGE_PATH={settings.qdrant.edge_path} "
        console.print(f"check it again with: {where}polycommit check --prefix {settings.topic_prefix}")
    return 0 if ok else 1
