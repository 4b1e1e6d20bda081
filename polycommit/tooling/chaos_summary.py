"""The summary of a chaos run: what happened to its transactions, its kills and the checker's verdict."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from polycommit.tooling.checker import CheckReport, History
from polycommit.tooling.processes import Exit

if TYPE_CHECKING:
    from polycommit.tooling.chaos_kills import Kill


def summarize(
    run_id: str,
    history: History,
    kills: Sequence[Kill],
    exits: Sequence[Exit],
    report: CheckReport,
    elapsed_s: float,
    errors: Sequence[str],
) -> dict[str, Any]:
    recoveries = [k.recovery_s for k in kills if k.recovery_s is not None]
    return {
        "run": run_id,
        "transactions": len(history.intents),
        "statuses": history.statuses(),
        "missing_results": len(history.missing()),
        "elapsed_s": round(elapsed_s, 3),
        "kills": [k.to_json() for k in kills],
        "recovery_s": [round(r, 3) for r in recoveries],
        "recovery_max_s": round(max(recoveries), 3) if recoveries else None,
        "unexpected_exits": [dataclasses.asdict(e) for e in exits],
        "publish_errors": len(errors),
        "violations": len(report.violations),
        "check": report.to_json(limit=50),
    }


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    names = {"2pc": "two-phase commits", "mixed": "sagas and two-phase commits", "interactive": "increments"}
    mode = names.get(summary.get("mode", ""), "transactions")
    table = Table(title=f"polycommit chaos {summary['run']}: {summary['transactions']} {mode}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("statuses (every attempt)", json.dumps(summary["statuses"]))
    table.add_row("sagas sent (kind)", json.dumps(summary.get("mix", {})))
    table.add_row("missing results", str(summary["missing_results"]))
    table.add_row("kills", str(len(summary["kills"])))
    table.add_row("recovery (s)", ", ".join(f"{r:.2f}" for r in summary["recovery_s"]) or "-")
    table.add_row("max recovery (s)", str(summary["recovery_max_s"] or "-"))
    table.add_row("processes that exited alone", str(len(summary["unexpected_exits"])))
    table.add_row("intent re-publishes", str(summary["publish_errors"]))
    table.add_row("transactions with a step retried", str(summary.get("retried_after_timeout", 0)))
    table.add_row("sagas run again (lock wait, deadlock)", str(summary.get("run_again", 0)))
    if summary.get("mode") == "interactive":
        table.add_row("increments lock at / commit", f"{summary['lock_at']} / {summary['consistency']}")
    if summary.get("mode") in ("2pc", "mixed") or summary.get("consistency") == "STRONG":
        left = summary.get("prepared_left", 0)
        table.add_row("prepared transactions left", f"[{'green' if not left else 'red'}]{left}[/]")
    counts = summary.get("increments")
    if counts is not None:
        good = counts["counts_ok"] and counts["stores_agree"]
        table.add_row(
            "increments: applied / counted / no result",
            f"[{'green' if good else 'red'}]{counts['completed']} / {counts['counted']} / {counts['unknown']}[/]",
        )
        table.add_row("attempts that never reached the coordinator", str(counts.get("never_sent", 0)))
    ok = summary["violations"] == 0
    table.add_row("violations", f"[{'green' if ok else 'red'}]{summary['violations']}[/]")
    table.add_row("elapsed (s)", str(summary["elapsed_s"]))
    console.print(table)
    if summary["kills"]:
        kills = Table(title="kills")
        for column in ("target", "at result", "at (s)", "restart (s)", "recovery (s)"):
            kills.add_column(column)
        for k in summary["kills"]:
            recovery = "-" if k["recovery_s"] is None else f"{k['recovery_s']:.2f}"
            kills.add_row(k["target"], str(k["at_result"]), str(k["killed_at_s"]), f"{k['restart_s']:.2f}", recovery)
        console.print(kills)
    if summary["check"]["violations"]:
        table = Table(title="violations (first 50)")
        for column in ("tx", "kind", "store", "step", "what"):
            table.add_column(column)
        for v in summary["check"]["violations"]:
            table.add_row(
                v["tx_id"], v["kind"], v["store"] or "", "" if v["step"] is None else str(v["step"]), v["what"]
            )
        console.print(table)
