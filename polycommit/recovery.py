"""`polycommit recover`: finish every incomplete transaction now, and report what was done (P6).

Recovery needs no operator: a coordinator that starts folds its changelog and picks up every transaction
in flight. This command does the same on demand, watching: it reads which transactions the log says are
in flight, runs the coordinator and the store consumers (unless they already run elsewhere), and waits
until each of those transactions has reported a result, or is stuck and said so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer

from polycommit.bus import create_topics, make_reader, topic_partitions, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.inspect import transactions_in_flight
from polycommit.runtime import Runtime


@dataclass
class RecoveryReport:
    in_flight: dict[str, str] = field(default_factory=dict)  # tx id -> phase found in the log
    finished: dict[str, str] = field(default_factory=dict)  # tx id -> status reported after recovery
    still_stuck: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unfinished and not self.still_stuck

    def to_json(self) -> dict[str, Any]:
        return {
            "in_flight": len(self.in_flight),
            "phases": _count(self.in_flight.values()),
            "finished": _count(self.finished.values()),
            "still_stuck": self.still_stuck,
            "unfinished": self.unfinished,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
        }


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


async def _results_from_now(settings: Settings) -> AIOKafkaConsumer:
    """A reader of `polycommit.results` positioned at its current end, before anything runs."""
    reader = make_reader(settings, "polycommit-recover")
    await reader.start()
    tps = await topic_partitions(reader, topics_for(settings).results)
    reader.assign(tps)
    await reader.seek_to_end(*tps)
    for tp in tps:
        await reader.position(tp)  # fix the start now: results from here on are the recovery's
    return reader


async def recover(settings: Settings, *, external: bool = False, wait: float = 300.0) -> RecoveryReport:
    await create_topics(settings)
    started = time.monotonic()
    report = RecoveryReport()
    state = await transactions_in_flight(settings)
    report.in_flight = {tx_id: snapshot["phase"] for tx_id, snapshot in state.items()}
    # A stuck saga goes on retrying its compensation, but it already reported itself: waiting for it
    # would only wait out the deadline. It is listed, and counts as finished if it resolves meanwhile.
    stuck = {tx_id for tx_id, phase in report.in_flight.items() if phase == "stuck"}
    waiting = set(report.in_flight) - stuck
    reader = await _results_from_now(settings)
    runtime = None if external or not waiting else await Runtime(settings).start()
    codec = default_codec()
    try:
        deadline = time.monotonic() + wait
        while waiting and time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    result = codec.decode_as(record.value, "TransactionResult")
                    tx_id, status = result["tx_id"], str(result["status"]).lower()
                    if tx_id in report.in_flight:
                        report.finished[tx_id] = status
                        waiting.discard(tx_id)
    finally:
        await reader.stop()
        if runtime is not None:
            await runtime.stop()
    report.still_stuck = sorted(
        {t for t, s in report.finished.items() if s == "stuck"} | (stuck - set(report.finished))
    )
    report.unfinished = sorted(waiting)
    report.seconds = time.monotonic() - started
    return report


def print_report(report: RecoveryReport) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"in flight in the log: {len(report.in_flight)} {_count(report.in_flight.values())}")
    console.print(f"finished by recovery: {_count(report.finished.values())} in {report.seconds:.1f} s")
    if report.still_stuck:
        console.print(f"[red]stuck (compensation keeps failing; see `polycommit status`): {report.still_stuck}[/]")
    if report.unfinished:
        console.print(f"[red]no result yet: {report.unfinished}[/]")


async def run_recover(settings: Settings, *, external: bool, wait: float, as_json: bool) -> int:
    report = await recover(settings, external=external, wait=wait)
    if as_json:
        import json

        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 1
