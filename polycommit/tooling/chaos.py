"""`polycommit chaos`: run the system as separate processes, kill them (and the broker) under load, judge.

The coordinator and the three store consumers run as subprocesses (`polycommit run coordinator`,
`polycommit consumer <store>`), ready once they print their "polycommit running" line. This process
sends bench-style transactions (a PostgreSQL row, a Qdrant point and a Neo4j node on keys of their own)
keeping `--concurrency` in flight, and meanwhile, `--kills` times, SIGKILLs one seeded-random target, a
subprocess or the Kafka broker, and restarts it. Each kill's *recovery time* runs from the kill to the
first result received after the restarted target was ready again (for the coordinator and the broker
every result needs them, so this is the true stall; for a store consumer, results of transactions already
past that store may arrive sooner, and are not counted).

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from polycommit.client import Coordinator, Saga, TransactionResult
from polycommit.config import Settings
from polycommit.errors import TransactionTimeoutError
from polycommit.tooling import bench
from polycommit.tooling.bench import Write, keep_in_flight, prepare, writes
from polycommit.tooling.chaos_summary import print_summary, summarize
from polycommit.tooling.checker import History, check
from polycommit.tooling.processes import PARTS, STOP_TIMEOUT_S, Cluster

TARGETS: tuple[str, ...] = (*PARTS, "kafka")
STEP_RETRIES = 3
STEP_TIMEOUT_S = 30.0


# -- settings and data of one run -------------------------------------------------------------------


def run_settings(base: Settings, run_id: str, *, prefix: str = "chaos", edge_path: Path | None = None) -> Settings:
    """The settings of a run: its own topic prefix and Qdrant Edge folder."""
    edge = edge_path if edge_path is not None else base.data_dir / "chaos" / run_id / "qdrant-edge"
    return dataclasses.replace(
        base, topic_prefix=f"{prefix}-{run_id}", qdrant=dataclasses.replace(base.qdrant, edge_path=edge)
    )


def saga_of(write: Write, *, timeout: float = STEP_TIMEOUT_S) -> Saga:
    """The benchmark's three writes, with retries and a timeout generous enough to ride out a restart:
    a step that times out is retried (its redelivery is a no-op), not compensated at the first stall."""
    return bench.saga_of(write, name="chaos", retries=STEP_RETRIES, timeout=timeout)


# -- the broker -------------------------------------------------------------------------------------


async def kill_cluster_broker(settings: Settings, victim: int) -> tuple[float, asyncio.Task[float]]:
    """In a cluster (`--kafka-brokers 3`), SIGKILL broker `victim` (modulo the size) only: the others serve
    on, so the run is back at once. Returns that moment and the task restarting the broker (its end time)."""
    from polycommit.tooling.servers.kafka import kill_node, start_node

    node = await kill_node(settings, victim)

    async def restart() -> float:
        await start_node(settings, node, 90.0)
        return time.monotonic()

    return time.monotonic(), asyncio.create_task(restart(), name=f"restart-{node.name}")


async def kill_broker(settings: Settings) -> float:
    """SIGKILL the Kafka broker, wait until it is gone, start it again; returns when it is ready."""
    from polycommit.tooling.services import await_pid_exit, kill_server, start_servers

    pid = kill_server(settings, "kafka")
    if not await await_pid_exit(pid, 30):
        raise RuntimeError(f"the Kafka broker (pid {pid}) survived SIGKILL for 30 s")
    await start_servers(settings, ["kafka"])
    return time.monotonic()


# -- the workload and its progress ------------------------------------------------------------------


@dataclass
class Progressed:
    """Results as they arrive, for kill schedules and recovery times (no sleeping: waiters are woken)."""

    results: int = 0
    last_at: float = 0.0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def arrived(self) -> None:
        async with self._changed:
            self.results += 1
            self.last_at = time.monotonic()
            self._changed.notify_all()

    async def wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)


async def execute(client: Coordinator, saga: Saga, errors: list[str]) -> TransactionResult | None:
    """Run one transaction; None when the client gave up waiting (its result is read from the log later).

    Publishing the intent may fail while the broker is down: it is published again (the coordinator
    ignores a duplicate of an intent in flight, and a replay of a finished one changes nothing).
    """
    for _ in range(20):
        try:
            return await client.execute(saga)
        except TransactionTimeoutError:
            return None
        except Exception as exc:  # the broker refused or timed out the intent: publish it again
            errors.append(f"{saga.tx_id}: {type(exc).__name__}: {exc}")
    return None


async def run_workload(
    client: Coordinator,
    history: History,
    sagas: Iterable[Saga],
    concurrency: int,
    progressed: Progressed,
    errors: list[str],
    on_result: Callable[[], None] | None = None,
    retried: list[str] | None = None,
) -> None:
    """Keep `concurrency` transactions in flight; `retried` collects those with a step run more than once
    (after a step timeout: an outcome was lost or late)."""
    retried = retried if retried is not None else []

    async def one(saga: Saga) -> None:
        history.invoke(saga)
        result = await execute(client, saga, errors)
        if result is not None:
            history.record_result(result)
            if any(step.attempts > 1 for step in result.steps):
                retried.append(saga.tx_id)
        await progressed.arrived()
        if on_result is not None:
            on_result()

    await keep_in_flight(sagas, concurrency, one)


async def recover_results(settings: Settings, history: History, deadline_s: float) -> int:
    """Read results the clients missed from the `results` topic until none is missing or the deadline."""
    deadline = time.monotonic() + deadline_s
    recovered = await history.recover_from_log(settings)
    while history.missing() and time.monotonic() < deadline:
        recovered += await history.recover_from_log(settings)
    return recovered


# -- kills ------------------------------------------------------------------------------------------


@dataclass
class Kill:
    target: str
    at_result: int
    killed_at_s: float
    restart_s: float = 0.0  # kill -> the target answers again (ready line, or broker probe)
    recovery_s: float | None = None  # kill -> first result after the target was back

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def kill_schedule(rng: random.Random, transactions: int, kills: int, targets: Sequence[str]) -> list[tuple[int, str]]:
    """(result count to wait for, target) for each kill, spread over the middle of the run."""
    low, high = max(1, transactions // 10), max(2, transactions * 85 // 100)
    points = sorted(rng.randrange(low, high) for _ in range(kills))
    return [(point, rng.choice(list(targets))) for point in points]


async def run_kills(
    settings: Settings,
    cluster: Cluster,
    schedule: Sequence[tuple[int, str]],
    progressed: Progressed,
    total: int,
    started: float,
    kills: list[Kill],
    describe: Callable[[str], None],
) -> None:
    for at_result, target in schedule:

        def reached(at: int = at_result) -> bool:
            return progressed.results >= at

        await progressed.wait_for(reached)
        if progressed.results >= total:
            return
        kill = Kill(target, progressed.results, round(time.monotonic() - started, 3))
        kills.append(kill)
        describe(f"killing {target}")
        killed = time.monotonic()
        restarting: asyncio.Task[float] | None = None
        if target == "kafka" and settings.kafka.brokers > 1:
            back, restarting = await kill_cluster_broker(settings, victim=at_result)
        elif target == "kafka":
            back = await kill_broker(settings)
        else:
            part = cluster[target]
            part.kill()
            await part.exited(STOP_TIMEOUT_S)
            back = await cluster.restart(target)
        kill.restart_s = back - killed
        describe(f"{target} restarted; waiting for results")

        def recovered(back: float = back) -> bool:
            return progressed.last_at > back or progressed.results >= total

        await progressed.wait_for(recovered)
        if progressed.last_at > back:
            kill.recovery_s = progressed.last_at - killed
        if restarting is not None:  # back in the cluster before the next kill: never two brokers down
            kill.restart_s = await restarting - killed
        describe(f"{target} recovered" if kill.recovery_s is not None else f"{target}: run ended first")


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


async def run_chaos(base: Settings, args: argparse.Namespace) -> int:
    from polycommit.bus import create_topics

    console = Console(stderr=True)
    if not getattr(args, "verbose", False):
        # The broker going away is the point of the run: the client's retry warnings would drown the progress.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    run_id = uuid.uuid4().hex[:8]
    settings = run_settings(base, run_id)
    log_dir = base.log_dir / f"chaos-{run_id}"
    targets = [t for t in args.targets.split(",") if t] if args.targets else list(TARGETS)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        console.print(f"[red]unknown targets {unknown}; choose from {', '.join(TARGETS)}[/red]")
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
    await create_topics(settings)
    await prepare(settings)
    run = ChaosRun(run_id, settings, log_dir, schedule, Cluster(settings, log_dir))
    started = time.monotonic()
    try:
        await _drive(run, args, console, started)
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
        items = writes(f"x{run.run_id}", args.transactions)
        sagas = (saga_of(w, timeout=args.step_timeout) for w in items)

        def describe(text: str) -> None:
            progress.update(chaos, description=f"chaos: {text}", completed=len(run.kills))

        async with Coordinator(run.settings, timeout=args.timeout) as client:
            killer = asyncio.create_task(
                run_kills(
                    run.settings,
                    run.cluster,
                    run.schedule,
                    run.progressed,
                    args.transactions,
                    started,
                    run.kills,
                    describe,
                )
            )
            try:
                await run_workload(
                    client,
                    run.history,
                    sagas,
                    args.concurrency,
                    run.progressed,
                    run.errors,
                    lambda: progress.advance(bar),
                    run.retried,
                )
                await run.progressed.wake()
                await killer
            finally:
                killer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await killer
        describe("done")
        progress.update(bar, description="recovering missed results from the log")
        await recover_results(run.settings, run.history, 60.0)
        progress.update(bar, description="stopping processes")


async def _judge(run: ChaosRun, args: argparse.Namespace, console: Console, codes: Any, elapsed: float) -> int:
    """Check the stores, print the summary, and clean up after a clean run (keep everything otherwise)."""
    from polycommit.bus import delete_topics

    settings, history = run.settings, run.history
    with console.status("checking the stores"):
        report = await check(settings, history)
    summary = summarize(run.run_id, history, run.kills, run.cluster.unexpected_exits, report, elapsed, run.errors)
    summary["retried_after_timeout"] = len(run.retried)
    summary["exit_codes"] = codes
    ok = report.ok and not history.missing()
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
    return 0 if ok else 1
