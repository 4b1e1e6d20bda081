"""Where a benchmark point's CPU goes: each part's CPU time per transaction, read from /proc.

Throughput on a small machine ends where the cores do. Latency and TPS change ±10 % between identical runs
here, so a change is judged better by the CPU each transaction costs every process on its path: the
client, the coordinator, each store consumer, and the servers (the Kafka broker, Neo4j, PostgreSQL with
its backends). From that total follows the ceiling: the rate at which this cost per transaction fills
every core of the machine, which no amount of concurrency can pass.

Linux only (/proc); elsewhere a point simply has no `cpu` entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polycommit.config import Settings
from polycommit.tooling.processes import Cluster, PartProcess
from polycommit.tooling.servers import kafka, neo4j, postgres
from polycommit.tooling.servers.kafka_config import cluster_nodes

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Pids = Callable[[], Iterable[int]]  # asked at every sample: backends and restarted parts come and go


def process_ticks(stat_line: str) -> tuple[int, int]:
    """(parent pid, user + system ticks) from a /proc/<pid>/stat line. The command name may hold spaces
    and parentheses, so the fields are counted from its last ')'."""
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def machine_ticks(stat_text: str) -> tuple[int, int]:
    """(busy, total) ticks of every core from /proc/stat's first line (idle and iowait are not busy)."""
    values = [int(v) for v in stat_text.split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # guest time is counted inside user time already
    return total - values[3] - values[4], total


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # the process ended between listing and reading
        return None


def ticks_of(pid: int) -> int:
    text = _read(PROC / str(pid) / "stat")
    return process_ticks(text)[1] if text is not None else 0


def with_children(pid: int | None) -> list[int]:
    """`pid` and its direct children: a PostgreSQL postmaster and its backends, walwriter and the rest."""
    if pid is None:
        return []
    found = [pid]
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            text = _read(entry / "stat")
            if text is not None and process_ticks(text)[0] == pid:
                found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class Sample:
    ticks: dict[tuple[str, int], int]  # (part, pid) -> CPU ticks so far
    busy: int
    total: int


class CpuMeter:
    """Samples the CPU of named parts; `per_transaction` turns two samples into milliseconds per transaction."""

    def __init__(self, parts: Mapping[str, Pids]) -> None:
        self.parts = dict(parts)

    def sample(self) -> Sample:
        ticks = {(name, pid): ticks_of(pid) for name, pids in self.parts.items() for pid in set(pids())}
        busy, total = machine_ticks(_read(PROC / "stat") or "cpu 0 0 0 0 0 0 0 0")
        return Sample(ticks, busy, total)

    def per_transaction(self, before: Sample, after: Sample, transactions: int) -> dict[str, Any]:
        return cpu_report(before, after, transactions, os.cpu_count() or 1)


def cpu_report(before: Sample, after: Sample, transactions: int, cores: int) -> dict[str, Any]:
    """Each part's CPU per transaction (ms), their total, the share of the machine they and everything else
    kept busy, and the rate at which that total would fill every core. A process that started after
    `before` counts from zero; one that ended before `after` counts nothing (its ticks are gone)."""
    used: dict[str, int] = {}
    for (name, pid), ticks in after.ticks.items():
        used[name] = used.get(name, 0) + max(0, ticks - before.ticks.get((name, pid), 0))
    per_tx = {name: ticks * 1000 / TICKS_PER_S / max(transactions, 1) for name, ticks in sorted(used.items())}
    total_ms = round(sum(per_tx.values()), 3)
    elapsed = after.total - before.total  # ticks of all cores together
    return {
        "ms_per_tx": {name: round(ms, 3) for name, ms in per_tx.items()},
        "total_ms_per_tx": total_ms,
        "cores": cores,
        # Of the machine's cores, how many were busy on average: the parts above, and everything (any process).
        "parts_busy_cores": round(sum(used.values()) * cores / elapsed, 2) if elapsed else None,
        "machine_busy_cores": round((after.busy - before.busy) * cores / elapsed, 2) if elapsed else None,
        "ceiling_tps": round(cores * 1000 / total_ms) if total_ms else None,
    }


def bench_parts(settings: Settings, workers: object) -> dict[str, Pids]:
    """The parts of a benchmark on this machine: this process, the worker subprocesses of a `Cluster` (none
    for in-process or external workers), and the local servers that are running."""
    parts: dict[str, Pids] = {"bench": lambda: [os.getpid()]}
    if isinstance(workers, Cluster):
        for name, part in workers.processes.items():
            label = name if name in ("coordinator", "detector") else f"{name} consumer"
            parts[label] = _part_pids(part)
    parts["kafka"] = lambda: [p for n in cluster_nodes(settings) if (p := kafka.node_pid(settings, n))]
    parts["neo4j server"] = lambda: [p for p in [neo4j.server_pid(settings)] if p]
    parts["postgres server"] = lambda: with_children(postgres.server_pid(settings))
    return parts


def _part_pids(part: PartProcess) -> Pids:
    return lambda: [part.pid] if part.running else []
