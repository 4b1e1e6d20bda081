"""What `polycommit recover` reports: the transactions the log had in flight, folded with the results since.

Recovery starts from the tx-state fold (which transactions are open, in which phase) and then hears the
results published from that moment on; this module is that fold. Reading Kafka and running the
coordinator stay in `polycommit.tooling.recovery`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from polycommit.events import SagaSnapshot


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
            "phases": count(self.in_flight.values()),
            "finished": count(self.finished.values()),
            "still_stuck": self.still_stuck,
            "unfinished": self.unfinished,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
        }


def count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def begin(state: Mapping[str, SagaSnapshot]) -> RecoveryReport:
    """The report before any result: every transaction in flight, with its phase."""
    return RecoveryReport(in_flight={tx_id: snapshot["phase"] for tx_id, snapshot in state.items()})


def stuck_at_start(report: RecoveryReport) -> set[str]:
    return {tx_id for tx_id, phase in report.in_flight.items() if phase == "stuck"}


def waiting(report: RecoveryReport) -> set[str]:
    """The transactions recovery still waits for. A stuck saga goes on retrying its compensation, but it
    already reported itself: waiting for it would only wait out the deadline. It is listed, and counts as
    finished if it resolves meanwhile."""
    return set(report.in_flight) - stuck_at_start(report) - set(report.finished)


def record(report: RecoveryReport, tx_id: str, status: str) -> RecoveryReport:
    """One result heard since recovery began; results of transactions that were not in flight are not ours."""
    if tx_id in report.in_flight:
        report.finished[tx_id] = status.lower()
    return report


def finish(report: RecoveryReport, seconds: float) -> RecoveryReport:
    """Close the report: what is still stuck, what never reported, and how long it took."""
    stuck_now = {tx_id for tx_id, status in report.finished.items() if status == "stuck"}
    report.still_stuck = sorted(stuck_now | (stuck_at_start(report) - set(report.finished)))
    report.unfinished = sorted(waiting(report))
    report.seconds = seconds
    return report
