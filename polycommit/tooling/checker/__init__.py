"""The consistency checker: given what a workload sent and what it was told, read the stores and judge.

As in Jepsen, the checker, not the system, decides what correct means. A `History` records every
transaction invoked (its intent: the steps and their operations) and every result heard — from a
workload's client and the `results` topic (`History.recover_from_log`), or folded from the whole log by
`polycommit check` (checker/log.py: intents, outcomes, decisions, results, dead letters). `check()` then
reads, from the three stores themselves, the applied-step markers of every step and the data the
structured operations wrote, and reports each way in which they disagree (report.py KINDS):

- results: no result after recovery (*lost*; for the log's view, no result is *in flight*), two
  different final results or decisions (*conflicting*), an unknown status, *stuck* (its own class; the
  keys it wrote are pending, not judged);
- saga markers: a completed step without its EXECUTE marker (or with an unconfirmed Qdrant one, or with
  a COMPENSATE marker), an undone step left applied, an EXECUTE recorded after its COMPENSATE (*hanging*);
- data, key by key (keys.py): a key's expected state is the value of its last completed writer in
  applied order, else the before-image of its first undone writer (a compensation or an abort brings the
  old row back; a compensated delete restores it), else — for a workload that owns fresh keys
  (`keys_owned`) — absent. A missing value is *effect-missing* (a lost commit), a different one
  *effect-wrong*, an undone write still visible *effect-present-after-compensation*; two rows or nodes
  under one key are a *duplicate*;
- the log and what nothing explains (log mode): a step APPLIED twice, 2PC votes with no decision
  (*undecided*), rows and nodes in the log's key space that no transaction wrote (*orphan*,
  leftovers.py), `pc_` prepared transactions of decided transactions left in PostgreSQL
  (*prepared-left*).

Effects of raw SQL/Cypher steps and of relationships are judged by their markers alone. Qdrant Edge
admits one opener per storage path: run the checker once the Qdrant consumer process has stopped, or
hand it the participant of a runtime that runs in this process.
"""

from polycommit.tooling.checker.history import History
from polycommit.tooling.checker.judge import check
from polycommit.tooling.checker.report import (
    APPLIED_TWICE,
    COMPENSATED_IN_COMPLETED,
    CONFLICTING,
    DUPLICATE,
    EFFECT_MISSING,
    EFFECT_PRESENT,
    EFFECT_WRONG,
    HANGING,
    KINDS,
    LEFT_APPLIED,
    LOST,
    MISSING_EXECUTE,
    ORPHAN,
    PENDING_MARKER,
    PREPARED_LEFT,
    STUCK,
    UNDECIDED,
    UNKNOWN,
    CheckReport,
    Violation,
)
from polycommit.tooling.checker.verdict import COMPENSATE, EXECUTE
from projections.results import TERMINAL

__all__ = [
    "APPLIED_TWICE",
    "COMPENSATE",
    "COMPENSATED_IN_COMPLETED",
    "CONFLICTING",
    "DUPLICATE",
    "EFFECT_MISSING",
    "EFFECT_PRESENT",
    "EFFECT_WRONG",
    "EXECUTE",
    "HANGING",
    "KINDS",
    "LEFT_APPLIED",
    "LOST",
    "MISSING_EXECUTE",
    "ORPHAN",
    "PENDING_MARKER",
    "PREPARED_LEFT",
    "STUCK",
    "TERMINAL",
    "UNDECIDED",
    "UNKNOWN",
    "CheckReport",
    "History",
    "Violation",
    "check",
]
