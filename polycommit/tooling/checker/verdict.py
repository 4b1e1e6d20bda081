"""The checker's rules: results, markers and data in, violations out. Pure: the stores are read before.

Three passes, each over what the one before left to judge: the results each transaction reported
(lost, conflicting, unknown or stuck), then the applied-step markers of the transactions with one
final status, then the data their structured operations wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from polycommit.tooling.checker.expectations import Expect, expectations, frozen
from polycommit.tooling.checker.history import History
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
    Violation,
)
from polycommit.tooling.checker.stores import MarkerKey, SeenMarker
from projections.results import TERMINAL

EXECUTE, COMPENSATE = "EXECUTE", "COMPENSATE"
COMPLETED = ("completed", "committed")
UNDONE = ("compensated", "failed", "aborted")


@dataclass
class Triage:
    """The results pass: its violations, the count of final statuses, and what the stores must show."""

    violations: list[Violation] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    judged: dict[str, str] = field(default_factory=dict)  # tx_id -> final status, for the stores to confirm
    wanted: dict[str, list[MarkerKey]] = field(default_factory=lambda: {"postgres": [], "qdrant": [], "neo4j": []})


def _result_violation(tx_id: str, final: str | None, terminal: Sequence[str]) -> Violation | None:
    """The violation that ends a transaction's judging at its results, if any."""
    if final is None:
        return Violation(tx_id, LOST, "no result after recovery")
    if len(terminal) > 1:
        # No state of the stores can agree with both: that is the violation, the rest would be noise.
        return Violation(tx_id, CONFLICTING, f"reported {' then '.join(terminal)}")
    if final not in (*TERMINAL, "stuck"):
        return Violation(tx_id, UNKNOWN, f"reported {final!r}")
    return None


def triage(history: History) -> Triage:
    """Judge the results of every invoked transaction; list the markers of those with one final status."""
    found = Triage()
    for tx_id, tx in history.intents.items():
        final = history.final(tx_id)
        found.statuses[final or "none"] = found.statuses.get(final or "none", 0) + 1
        terminal = [s for s in dict.fromkeys(history.results.get(tx_id, [])) if s in TERMINAL]
        ended = _result_violation(tx_id, final, terminal)
        if ended is not None:
            found.violations.append(ended)
            continue
        assert final is not None
        if final == "stuck":
            found.violations.append(Violation(tx_id, STUCK, "a compensation never succeeded; the saga is still stuck"))
        found.judged[tx_id] = final
        for step in tx.steps:
            store = step["operation"]["store"]
            if store in found.wanted:
                for action in (EXECUTE, COMPENSATE):
                    found.wanted[store].append((tx_id, step["index"], action))
    return found


def _step_markers(final: str, execute: SeenMarker | None, compensate: SeenMarker | None) -> list[tuple[str, str]]:
    """(kind, what) of each way one step's markers disagree with its transaction's final status."""
    flagged: list[tuple[str, str]] = []
    if execute and compensate and execute.at and compensate.at and execute.at > compensate.at:
        # P4: EXECUTE after its COMPENSATE must be skipped; a later EXECUTE marker is a hanging step.
        flagged.append((HANGING, f"EXECUTE recorded at {execute.at}, after its COMPENSATE at {compensate.at}"))
    if final in COMPLETED:
        if execute is None:
            flagged.append((MISSING_EXECUTE, "no EXECUTE marker"))
        elif execute.pending:
            flagged.append((PENDING_MARKER, "the EXECUTE marker was never confirmed"))
        if compensate is not None:
            flagged.append((COMPENSATED_IN_COMPLETED, "a COMPENSATE marker in a completed transaction"))
    elif final in UNDONE:
        undone = compensate is not None and not compensate.pending
        if execute is not None and not undone:
            state = "an unconfirmed" if compensate is not None else "no"
            flagged.append((LEFT_APPLIED, f"EXECUTE marker with {state} COMPENSATE marker"))
    return flagged


def judge_markers(
    history: History, judged: Mapping[str, str], markers: Mapping[MarkerKey, SeenMarker], keys_owned: bool
) -> tuple[list[Violation], list[Expect]]:
    """The markers pass, step by step; also the effects the data pass must look for."""
    violations: list[Violation] = []
    expects: list[Expect] = []
    for tx_id, final in judged.items():
        for step in history.intents[tx_id].steps:
            index, store = step["index"], step["operation"]["store"]
            execute = markers.get((tx_id, index, EXECUTE))
            compensate = markers.get((tx_id, index, COMPENSATE))
            for kind, what in _step_markers(final, execute, compensate):
                violations.append(Violation(tx_id, kind, what, store, index))
            if keys_owned and final != "stuck":
                expects.extend(expectations(tx_id, index, step["operation"]))
    return violations, expects


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, float) or isinstance(actual, float):
        try:
            return math.isclose(float(expected), float(actual), rel_tol=1e-9, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return bool(expected == actual)


def _similar(expected: Sequence[float], actual: Sequence[float]) -> bool:
    """Same direction (Cosine collections store the normalised vector)."""
    if len(expected) != len(actual):
        return False
    dot = sum(a * b for a, b in zip(expected, actual, strict=True))
    norms = math.sqrt(sum(a * a for a in expected)) * math.sqrt(sum(b * b for b in actual))
    return norms == 0 or dot / norms > 0.999


def _differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    return [
        f"{name}={actual.get(name)!r} (wrote {value!r})"
        for name, value in expected.items()
        if name not in actual or not _same(value, actual[name])
    ]


@dataclass(frozen=True)
class Found:
    """What the data reads returned, keyed as `Stores.rows` / `points` / `nodes` key them."""

    rows: Mapping[tuple[Any, ...], dict[str, Any]]
    points: Mapping[tuple[str, str], dict[str, Any]]
    nodes: Mapping[tuple[Any, ...], dict[str, Any]]

    def point(self, e: Expect) -> dict[str, Any] | None:
        return self.points.get((e.where[0], e.key))

    def actual(self, e: Expect) -> dict[str, Any] | None:
        """The row, point payload or node properties an expectation is about, None when absent."""
        if e.store == "postgres":
            return self.rows.get((*e.where, frozen(e.key)))
        if e.store == "qdrant":
            point = self.point(e)
            return None if point is None else point["payload"]
        return self.nodes.get((*e.where, frozen(e.key)))


def _completed_effect(e: Expect, actual: dict[str, Any] | None, found: Found) -> Violation | None:
    if e.values is None:
        if actual is not None:
            return Violation(e.tx_id, EFFECT_WRONG, f"{e.describe()} was deleted but exists", e.store, e.step)
        return None
    if actual is None:
        return Violation(e.tx_id, EFFECT_MISSING, f"{e.describe()} is missing", e.store, e.step)
    wrong = _differences(e.values, actual)
    point = found.point(e) if e.store == "qdrant" else None
    if e.vector is not None and point is not None and point["vector"] and not _similar(e.vector, point["vector"]):
        wrong.append("vector differs")
    if wrong:
        return Violation(e.tx_id, EFFECT_WRONG, f"{e.describe()} holds {', '.join(wrong)}", e.store, e.step)
    return None


def judge_effects(expects: Sequence[Expect], judged: Mapping[str, str], found: Found) -> list[Violation]:
    """The data pass: a completed transaction's effects hold exactly what it wrote; an undone one's are gone."""
    violations: list[Violation] = []
    for e in expects:
        final = judged[e.tx_id]
        actual = found.actual(e)
        if final in COMPLETED:
            violation = _completed_effect(e, actual, found)
            if violation is not None:
                violations.append(violation)
        elif actual is not None and e.values is not None:
            # P4 directly: the keys were fresh, so an undone (or never run) upsert leaves nothing behind.
            what = f"{e.describe()} exists after the transaction ended {final}"
            violations.append(Violation(e.tx_id, EFFECT_PRESENT, what, e.store, e.step))
    return violations
