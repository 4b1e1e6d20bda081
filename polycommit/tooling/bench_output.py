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
    for point in points:
        if "budget" in point:
            print_budget(console, point["concurrency"], point["budget"])


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
