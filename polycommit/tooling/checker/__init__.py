"""The consistency checker: given what a workload sent and what it was told, read the stores and judge.

As in Jepsen, the checker, not the system, decides what correct means. A `History` records every
transaction a workload invoked (its intent: the steps and their operations) and every result it heard
(from its client, and from the `polycommit.results` topic after recovery). `check()` then reads, from
the three stores themselves, the applied-step markers of every step and the data the structured
operations wrote, and reports each way in which they disagree with the results:

- **no result** after recovery: the transaction was *lost* (P2/P6);
- **two different final results** (e.g. completed, then compensated): *conflicting results*;
- **completed**: every step has its EXECUTE marker in its store (confirmed, for Qdrant's two-phase
  markers) and no COMPENSATE marker, and the effect is visible: the row, points and node exist with the
  values written (P2, P3);
- **compensated** (or **failed**, where nothing may run): no step is left applied, i.e. each step has no
  EXECUTE marker or has a confirmed COMPENSATE marker (P2), and, checked directly because markers alone
  cannot show a step that landed after its undo, the data the steps wrote is absent (P4); PostgreSQL's
  marker timestamps also expose an EXECUTE recorded after its step's COMPENSATE;
- **stuck** as the last word: reported, since a compensation that never succeeded left a step applied.

The data checks assume the workload's transactions own their keys (no two write the same row, point or
node, and nothing else writes them), which the benchmark and chaos workloads guarantee by construction:
so "compensated" means "absent" and "completed" means "holds exactly these values". Pass
`keys_owned=False` to check markers only. Effects of raw SQL/Cypher steps and of relationships are
judged by their markers alone.

Qdrant Edge admits one opener per storage path: run the checker once the Qdrant consumer process has
stopped, or hand it the participant of a runtime that runs in this process.
"""

from polycommit.tooling.checker.history import History
from polycommit.tooling.checker.judge import check
from polycommit.tooling.checker.report import (
    COMPENSATED_IN_COMPLETED,
    CONFLICTING,
    EFFECT_MISSING,
    EFFECT_PRESENT,
    EFFECT_WRONG,
    HANGING,
    LEFT_APPLIED,
    LOST,
    MISSING_EXECUTE,
    PENDING_MARKER,
    STUCK,
    UNKNOWN,
    CheckReport,
    Violation,
)
from polycommit.tooling.checker.verdict import COMPENSATE, EXECUTE
from projections.results import TERMINAL

__all__ = [
    "COMPENSATE",
    "COMPENSATED_IN_COMPLETED",
    "CONFLICTING",
    "EFFECT_MISSING",
    "EFFECT_PRESENT",
    "EFFECT_WRONG",
    "EXECUTE",
    "HANGING",
    "LEFT_APPLIED",
    "LOST",
    "MISSING_EXECUTE",
    "PENDING_MARKER",
    "STUCK",
    "TERMINAL",
    "UNKNOWN",
    "CheckReport",
    "History",
    "Violation",
    "check",
]
