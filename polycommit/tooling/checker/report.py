"""The checker's verdict: the kinds of violation it reports, one violation, and the report of a check."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Violation kinds: what the report counts by.
LOST = "lost"
CONFLICTING = "conflicting-results"
STUCK = "stuck"
MISSING_EXECUTE = "missing-execute-marker"
PENDING_MARKER = "pending-marker"
COMPENSATED_IN_COMPLETED = "compensate-marker-in-completed"
EFFECT_MISSING = "effect-missing"
EFFECT_WRONG = "effect-wrong"
LEFT_APPLIED = "step-left-applied"
EFFECT_PRESENT = "effect-present-after-compensation"
HANGING = "execute-after-compensate"
UNKNOWN = "unknown-status"
ORPHAN = "orphan"
DUPLICATE = "duplicate"
APPLIED_TWICE = "applied-twice"
UNDECIDED = "undecided"
PREPARED_LEFT = "prepared-left"

# Every class a report counts, zeros included: `polycommit check --json` lists them all, so a consumer of
# the JSON tells "none found" from "not checked".
KINDS: tuple[str, ...] = (
    LOST,
    CONFLICTING,
    UNKNOWN,
    STUCK,
    MISSING_EXECUTE,
    PENDING_MARKER,
    COMPENSATED_IN_COMPLETED,
    LEFT_APPLIED,
    HANGING,
    EFFECT_MISSING,
    EFFECT_WRONG,
    EFFECT_PRESENT,
    ORPHAN,
    DUPLICATE,
    APPLIED_TWICE,
    UNDECIDED,
    PREPARED_LEFT,
)


@dataclass(frozen=True)
class Violation:
    tx_id: str
    kind: str
    what: str
    store: str | None = None
    step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CheckReport:
    checked: int
    violations: list[Violation]
    statuses: dict[str, int]
    elapsed_s: float = 0.0
    pending: int = 0  # keys left unjudged: a transaction still in flight (or stuck) writes them

    @property
    def ok(self) -> bool:
        return not self.violations

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in self.violations:
            counts[v.kind] = counts.get(v.kind, 0) + 1
        return counts

    def classes(self) -> dict[str, int]:
        """The count of every class, zeros included."""
        return {kind: 0 for kind in KINDS} | self.kinds()

    def to_json(self, limit: int | None = 100) -> dict[str, Any]:
        shown = self.violations if limit is None else self.violations[:limit]
        return {
            "checked": self.checked,
            "statuses": dict(sorted(self.statuses.items())),
            "pending_keys": self.pending,
            "violation_count": len(self.violations),
            "violation_kinds": self.kinds(),
            "violations": [v.to_json() for v in shown],
            "elapsed_s": round(self.elapsed_s, 3),
        }
