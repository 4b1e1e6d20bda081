"""`polycommit check`: the consistency checker as an operator's command, judging a system by its log.

It folds the log of one topic prefix (intents, outcomes, decisions, results, dead letters) into what
each transaction was decided to be, reads the three stores over its own connections, and prints every
violation (checker/report.py KINDS). Exit codes: 0 clean, 1 violations found, 2 bad usage or a server
that cannot be reached (one line on stderr, no traceback).

Qdrant Edge admits one opener per storage path: run it when no Qdrant consumer holds the storage, or
against a Qdrant server (`QDRANT_URL`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from polycommit.config import Settings
from polycommit.tooling.checker.judge import check
from polycommit.tooling.checker.log import read_log
from polycommit.tooling.checker.report import KINDS, CheckReport

SHOWN = 200  # violations listed in the human table and the JSON (the counts are always complete)


def to_json(report: CheckReport, dead_letters: int) -> dict[str, Any]:
    """`violations` is the total; every class is counted, zeros included."""
    body = report.to_json(limit=SHOWN)
    return {
        "violations": len(report.violations),
        "classes": report.classes(),
        "checked": report.checked,
        "statuses": body["statuses"],
        "pending_keys": report.pending,
        "dead_letters": dead_letters,
        "details": body["violations"],
        "elapsed_s": body["elapsed_s"],
    }


def print_report(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title=f"polycommit check: {summary['checked']} transactions, {summary['violations']} violations")
    table.add_column("class")
    table.add_column("count", justify="right")
    for kind in KINDS:
        count = summary["classes"][kind]
        table.add_row(kind, f"[{'red' if count else 'green'}]{count}[/]")
    console.print(table)
    console.print(
        f"statuses {json.dumps(summary['statuses'])}; keys pending {summary['pending_keys']}; "
        f"dead letters {summary['dead_letters']}"
    )
    if summary["details"]:
        details = Table(title=f"violations (first {SHOWN})")
        for column in ("class", "tx", "store", "step", "what"):
            details.add_column(column)
        for v in summary["details"]:
            step = "" if v["step"] is None else str(v["step"])
            details.add_row(v["kind"], v["tx_id"], v["store"] or "", step, v["what"])
        console.print(details)


async def _has_log(settings: Settings) -> bool:
    from polycommit.bus import make_reader, topic_partitions, topics_for

    reader = make_reader(settings, "polycommit-check")
    try:
        await reader.start()
        return bool(await topic_partitions(reader, topics_for(settings).intents))
    finally:
        await reader.stop()  # also after a failed start: its connections would leak


def _fail(message: str) -> int:
    """One line on stderr (never wrapped: scripts read it), exit code 2."""
    print(f"polycommit check: {message}", file=sys.stderr)
    return 2


async def run_check(base: Settings, args: argparse.Namespace) -> int:
    settings = base if args.prefix is None else dataclasses.replace(base, topic_prefix=args.prefix)
    err = Console(stderr=True)
    if not getattr(args, "verbose", False):
        # A broker that cannot be reached is reported in one line below, not by aiokafka's own log.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        with err.status("reading the log") as status:
            if not await _has_log(settings):
                return _fail(f"no topic {settings.topic_prefix}.intents: no log under this prefix")
            history, facts = await read_log(settings)
            status.update(f"judging {len(history.intents)} transactions")
            report = await check(settings, history, keys_owned=False, log=facts, progress=status.update)
    except Exception as exc:  # a server down or refusing: one line, exit 2 (the check itself never ran)
        return _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    summary = to_json(report, facts.dead_letters)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print_report(Console(), summary)
    return 1 if report.violations else 0
