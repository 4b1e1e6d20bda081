"""What `polycommit chaos` kills, when, and how each victim comes back.

Targets: polycommit's own processes (`coordinator`, and the `postgres`, `qdrant`, `neo4j` consumers),
the servers (`kafka`, `postgres-server`, `neo4j-server`: SIGKILL of the broker, the postmaster or the
Neo4j JVM, then a restart by `polycommit.tooling.services`, as their supervisor would), and the workload's
`client` (dropped with its replies outstanding). Qdrant Edge is embedded in its consumer: killing that
consumer is killing Qdrant. With `--coordinators N`, the standby coordinator members (`coordinator#2`...)
are targets too; killing the active member waits for a standby to take over before starting it again.
With `--mode interactive` the deadlock detector (`detector`) runs, and is a target.

The schedule is seeded and pure: kill points spread over the middle of the run, and targets taken from
a shuffled round of every target before any repeats, so a run with as many kills as targets hits each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.members import ACTIVE_NOTE
from polycommit.config import Settings
from polycommit.tooling.chaos_workload import ClientSlot, Progressed
from polycommit.tooling.processes import PARTS, STOP_TIMEOUT_S, Cluster, PartProcess

SERVER_TARGETS: dict[str, str] = {"kafka": "kafka", "postgres-server": "postgres", "neo4j-server": "neo4j"}
CLIENT = "client"
TARGETS: tuple[str, ...] = (*PARTS, *SERVER_TARGETS, CLIENT)
SERVER_EXIT_S = 30.0
# A server restarted under load may take longer than one start deadline (Neo4j's recovery on a busy
# 2-core machine: ~110 s against a 90 s deadline); waiting again costs nothing while its process lives.
RESTART_ATTEMPTS = 3
FAILOVER_S = 60.0  # the group's session timeout (6 s), a rebalance and the standby's restore, with margin

Start = Callable[[Settings, Sequence[str]], Awaitable[object]]


class TargetLost(RuntimeError):
    """A killed target did not come back: the run cannot go on (its transactions would wait forever)."""


@dataclass
class Kill:
    target: str
    at_result: int
    killed_at_s: float
    restart_s: float = 0.0  # kill -> the target answers again (ready line, or server probe)
    recovery_s: float | None = None  # kill -> first result after the target was back

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def kill_schedule(rng: random.Random, transactions: int, kills: int, targets: Sequence[str]) -> list[tuple[int, str]]:
    """(result count to wait for, target) for each kill, spread over the middle of the run; every target
    is chosen once, in a seeded order, before any is chosen again."""
    low, high = max(1, transactions // 10), max(2, transactions * 85 // 100)
    points = sorted(rng.randrange(low, high) for _ in range(kills))
    chosen: list[str] = []
    while len(chosen) < kills:
        round_ = list(targets)
        rng.shuffle(round_)
        chosen.extend(round_)
    return list(zip(points, chosen[:kills], strict=True))


async def restart_server(settings: Settings, name: str, start: Start, attempts: int = RESTART_ATTEMPTS) -> float:
    """Start a server again, waiting up to `attempts` start deadlines; returns when it answers a real
    request, raises `TargetLost` when it never does."""
    from polycommit.tooling.services import ServerStartError

    for attempt in range(1, attempts + 1):
        try:
            await start(settings, [name])
            return time.monotonic()
        except ServerStartError as exc:
            if attempt == attempts:
                raise TargetLost(f"{name} not back after {attempts} start deadlines: {exc}") from exc
    raise AssertionError("unreachable")


async def kill_and_restart_server(settings: Settings, name: str, gone: Callable[[], None] | None = None) -> float:
    """SIGKILL a server (`kafka`, `postgres`, `neo4j`), wait until it is gone (then call `gone`), start it
    again; returns when it answers a real request."""
    from polycommit.tooling.services import await_pid_exit, kill_server, start_servers

    pid = kill_server(settings, name)
    if not await await_pid_exit(pid, SERVER_EXIT_S):
        raise TargetLost(f"{name} (pid {pid}) survived SIGKILL for {SERVER_EXIT_S:.0f} s")
    if gone is not None:
        gone()
    return await restart_server(settings, name, start_servers)


async def kill_broker(settings: Settings, gone: Callable[[], None] | None = None) -> float:
    """SIGKILL the Kafka broker, wait until it is gone (then call `gone`), start it again; returns when it
    is ready."""
    return await kill_and_restart_server(settings, "kafka", gone)


async def kill_cluster_broker(settings: Settings, victim: int) -> tuple[float, asyncio.Task[float]]:
    """In a cluster (`--kafka-brokers 3`), SIGKILL broker `victim` (modulo the size) only: the others serve
    on, so the run is back at once. Returns that moment and the task restarting the broker (its end time)."""
    from polycommit.tooling.servers.kafka import kill_node, start_node

    node = await kill_node(settings, victim)

    async def restart() -> float:
        await start_node(settings, node, 90.0)
        return time.monotonic()

    return time.monotonic(), asyncio.create_task(restart(), name=f"restart-{node.name}")


def coordinator_parts(count: int) -> list[str]:
    """The coordinator parts of a run with `count` members: `coordinator`, `coordinator#2`, ..."""
    return ["coordinator", *(f"coordinator#{i}" for i in range(2, max(1, count) + 1))]


async def kill_target(settings: Settings, cluster: Cluster, slot: ClientSlot, target: str) -> float:
    """Kill one target and bring it back; returns when it (or, for the active coordinator member, a standby
    that took over) serves again."""
    if target in SERVER_TARGETS:
        return await kill_and_restart_server(settings, SERVER_TARGETS[target])
    if target == CLIENT:
        return await slot.kill()
    part = cluster[target]
    standbys = [
        p for name, p in cluster.processes.items() if name.startswith("coordinator") and name != target and p.running
    ]
    if part.active_member and standbys:
        return await fail_over(cluster, target, standbys)
    part.kill()
    await part.exited(STOP_TIMEOUT_S)
    return await cluster.restart(target)


async def fail_over(cluster: Cluster, target: str, standbys: Sequence[PartProcess]) -> float:
    """SIGKILL the active coordinator member and wait for a standby to say it is active now (the group
    moves every partition to it after the session timeout); then start the killed member again, which
    joins as a standby. Returns when the standby took over."""
    took_over = [p.watch(ACTIVE_NOTE) for p in standbys]
    part = cluster[target]
    part.kill()
    await part.exited(STOP_TIMEOUT_S)
    done, pending = await asyncio.wait(took_over, timeout=FAILOVER_S, return_when=asyncio.FIRST_COMPLETED)
    for waiting in pending:
        waiting.cancel()
    if not done:
        raise TargetLost(f"no standby took over from {target} within {FAILOVER_S:.0f} s")
    back = min(f.result() for f in done)
    await cluster.restart(target)
    return back


@dataclass
class Killer:
    """The kills of one run, made as results arrive."""

    settings: Settings
    cluster: Cluster
    slot: ClientSlot
    progressed: Progressed
    total: int
    started: float
    kills: list[Kill]
    describe: Callable[[str], None]

    async def run(self, schedule: Sequence[tuple[int, str]]) -> None:
        for at_result, target in schedule:

            def reached(at: int = at_result) -> bool:
                return self.progressed.results >= at

            await self.progressed.wait_for(reached)
            if self.progressed.results >= self.total:
                return
            await self.kill(target)

    async def kill(self, target: str) -> None:
        kill = Kill(target, self.progressed.results, round(time.monotonic() - self.started, 3))
        self.kills.append(kill)
        self.describe(f"killing {target}")
        killed = time.monotonic()
        restarting: asyncio.Task[float] | None = None
        if target == "kafka" and self.settings.kafka.brokers > 1:
            back, restarting = await kill_cluster_broker(self.settings, victim=kill.at_result)
        else:
            back = await kill_target(self.settings, self.cluster, self.slot, target)
        kill.restart_s = back - killed
        self.describe(f"{target} restarted; waiting for results")

        def recovered() -> bool:
            return self.progressed.last_at > back or self.progressed.results >= self.total

        await self.progressed.wait_for(recovered)
        if self.progressed.last_at > back:
            kill.recovery_s = self.progressed.last_at - killed
        if restarting is not None:  # back in the cluster before the next kill: never two brokers down
            kill.restart_s = await restarting - killed
        self.describe(f"{target} recovered" if kill.recovery_s is not None else f"{target}: run ended first")
