"""`polycommit bench`'s tables: the curve, one row per concurrency, and the hop budgets of `--trace`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = ("concurrency", "tps", "p50_ms", "p95_ms", "p99_ms", "success_rate", "verified", "direct_batched_tps")


def print_curve(console: Console, points: Sequence[dict[str, Any]], transactions: int) -> None:
    table = Table(title=f"polycommit bench: {transactions} sagas per point")
    for column in (*COLUMNS, "per-call tps", "per-call p50/p99", "statuses"):
        table.add_column(column, justify="right")
    for point in points:
        per_call = point.get("direct_per_call") or {}
        table.add_row(
            *(str(point.get(column)) for column in COLUMNS),
            str(per_call.get("tps", "")),
            f"{per_call['p50_ms']}/{per_call['p99_ms']}" if per_call else "",
            json.dumps(point["statuses"]),
        )
    console.print(table)
    if any("hot_keys" in point for point in points):
        print_contention(console, points)
    print_cpu(console, points)
    for point in points:
        if "budget" in point:
            print_budget(console, point["concurrency"], point["budget"])


def print_cpu(console: Console, points: Sequence[dict[str, Any]]) -> None:
    """Each part's CPU per transaction (polycommit/tooling/cpu_meter.py) and the rate it caps the machine at."""
    measured = [point for point in points if point.get("cpu")]
    if not measured:
        return
    parts = sorted({name for point in measured for name in point["cpu"]["ms_per_tx"]})
    table = Table(title="CPU per transaction, ms")
    table.add_column("part")
    for point in measured:
        table.add_column(f"c={point['concurrency']}", justify="right")
    for name in parts:
        table.add_row(name, *(str(point["cpu"]["ms_per_tx"].get(name, "")) for point in measured))
    table.add_row("total", *(str(point["cpu"]["total_ms_per_tx"]) for point in measured))
    table.add_row("busy cores", *(f"{p['cpu']['machine_busy_cores']} of {p['cpu']['cores']}" for p in measured))
    table.add_row("ceiling tx/s", *(str(point["cpu"]["ceiling_tps"]) for point in measured))
    console.print(table)
    console.print("ceiling: the rate at which this CPU per transaction would keep every core busy")


def print_contention(console: Console, points: Sequence[dict[str, Any]]) -> None:
    """`--hot-keys`: attempts, deadlock and conflict rates, lock waits and the hot keys' verdict per point."""
    table = Table(title="contention on hot keys")
    for column in ("concurrency", "attempts", "deadlock_rate", "conflict_rate", "lock wait p50/p99/max ms"):
        table.add_column(column, justify="right")
    table.add_column("hot keys agreeing")
    table.add_column("lost updates", justify="right")
    for point in points:
        waits = point.get("lock_wait_ms") or {}
        table.add_row(
            str(point["concurrency"]),
            str(point.get("attempts")),
            str(point.get("deadlock_rate")),
            str(point.get("conflict_rate")),
            f"{waits.get('p50')}/{waits.get('p99')}/{waits.get('max')}",
            f"{point.get('verified')}/{point.get('verified_of')}",
            str(point.get("lost_updates", "")),
        )
    console.print(table)


def print_budget(console: Console, concurrency: int, budget: dict[str, Any]) -> None:
    if not budget.get("transactions"):
        console.print(f"concurrency {concurrency}: no complete trace")
        return
    for which in ("median", "p99"):
        one = budget[which]
        table = Table(title=f"concurrency {concurrency}: the {which} transaction, {one['total_ms']} ms")
        for column in ("hop", "starts at ms", "takes ms"):
            table.add_column(column, justify="right" if column != "hop" else "left")
        for hop in one["hops"]:
            table.add_row(hop["hop"], str(hop["at_ms"]), str(hop["ms"]))
        console.print(table)
    medians = Table(title=f"concurrency {concurrency}: median of each hop over {budget['transactions']} transactions")
    medians.add_column("hop")
    medians.add_column("median ms", justify="right")
    for hop, ms in budget["hop_median_ms"].items():
        medians.add_row(hop, str(ms))
    console.print(medians)
