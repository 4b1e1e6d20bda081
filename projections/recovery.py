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
    decided: dict[str, str] = field(default_factory=dict)  # tx id -> COMMIT / ABORT decided during recovery
    settled: list[dict[str, str]] = field(default_factory=list)  # prepared gids settled by participants
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unfinished and not self.still_stuck

    def settled_gids_of(self, tx_id: str) -> list[str]:
        """The prepared PostgreSQL transactions holding `tx_id`'s steps that were settled, with their verb."""
        return [f"{e['gid']}: {e['action']}" for e in self.settled if tx_id in _members(e)]

    def to_json(self) -> dict[str, Any]:
        return {
            "in_flight": len(self.in_flight),
            "phases": count(self.in_flight.values()),
            "finished": count(self.finished.values()),
            "still_stuck": self.still_stuck,
            "unfinished": self.unfinished,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "decided": count(self.decided.values()),
            "settled_gids": self.settled,
            "transactions": {
                tx_id: {
                    "phase": phase,
                    "decided": self.decided.get(tx_id),
                    "result": self.finished.get(tx_id),
                    "settled_gids": self.settled_gids_of(tx_id),
                }
                for tx_id, phase in sorted(self.in_flight.items())
            },
        }


def _members(entry: Mapping[str, str]) -> list[str]:
    return [tx for tx in entry.get("transactions", "").split(",") if tx]


def count(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def begin(state: Mapping[str, SagaSnapshot]) -> RecoveryReport:
    """The report before any result: every transaction in flight, with its phase."""
    return RecoveryReport(in_flight={tx_id: snapshot["phase"] for tx_id, snapshot in state.items()})


def stuck_at_start(report: RecoveryReport) -> set[str]:
    """Stuck sagas, and two-phase commits whose phase 2 keeps failing (a reported heuristic hazard)."""
    return {tx_id for tx_id, phase in report.in_flight.items() if phase == "stuck" or phase.endswith("(hazard)")}


def decided(report: RecoveryReport, tx_id: str, outcome: str) -> RecoveryReport:
    """A two-phase commit decision taken since recovery began."""
    if tx_id in report.in_flight:
        report.decided[tx_id] = outcome
    return report


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
    stuck_now |= {t for t in stuck_at_start(report) if report.in_flight[t].endswith("(hazard)")} - set(report.finished)
    report.still_stuck = sorted(stuck_now | (stuck_at_start(report) - set(report.finished)))
    report.unfinished = sorted(waiting(report))
    report.seconds = seconds
    return report
