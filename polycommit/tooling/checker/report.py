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

    @property
    def ok(self) -> bool:
        return not self.violations

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in self.violations:
            counts[v.kind] = counts.get(v.kind, 0) + 1
        return counts

    def to_json(self, limit: int | None = 100) -> dict[str, Any]:
        shown = self.violations if limit is None else self.violations[:limit]
        return {
            "checked": self.checked,
            "statuses": dict(sorted(self.statuses.items())),
            "violation_count": len(self.violations),
            "violation_kinds": self.kinds(),
            "violations": [v.to_json() for v in shown],
            "elapsed_s": round(self.elapsed_s, 3),
        }
