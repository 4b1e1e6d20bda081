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

from polycommit.client import Transaction
from polycommit.tooling.checker.expectations import Expect, expectations, frozen
from polycommit.tooling.checker.history import IN_FLIGHT, History
from polycommit.tooling.checker.keys import COMPLETED, UNDONE, Applied, KeyState, StepRef
from polycommit.tooling.checker.report import (
    COMPENSATED_IN_COMPLETED,
    CONFLICTING,
    DUPLICATE,
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
    if final not in (*TERMINAL, "stuck", IN_FLIGHT):
        return Violation(tx_id, UNKNOWN, f"reported {final!r}")
    return None


def _marked(tx: Transaction) -> bool:
    """Sagas leave EXECUTE/COMPENSATE markers; two-phase commit's PREPARE/COMMIT/ABORT markers are not
    judged here (its decision and the data are)."""
    return tx.consistency != "STRONG"


def triage(history: History) -> Triage:
    """Judge the results of every invoked transaction; list the markers of those with one final status."""
    found = Triage()
    for tx_id, tx in history.intents.items():
        final = history.final(tx_id)
        if final is None and history.open_is_pending:
            final = IN_FLIGHT  # the log's view: no result yet means not finished, not lost
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
        if final == IN_FLIGHT or not _marked(tx):
            continue
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
    history: History, judged: Mapping[str, str], markers: Mapping[MarkerKey, SeenMarker]
) -> tuple[list[Violation], list[Expect]]:
    """The markers pass, step by step; also the effects of every judged transaction (pending ones too:
    their keys are then left unjudged by the data pass)."""
    violations: list[Violation] = []
    expects: list[Expect] = []
    for tx_id, final in judged.items():
        tx = history.intents[tx_id]
        for step in tx.steps:
            index, store = step["index"], step["operation"]["store"]
            if final != IN_FLIGHT and _marked(tx):
                execute = markers.get((tx_id, index, EXECUTE))
                compensate = markers.get((tx_id, index, COMPENSATE))
                for kind, what in _step_markers(final, execute, compensate):
                    violations.append(Violation(tx_id, kind, what, store, index))
            expects.extend(expectations(tx_id, index, step["operation"]))
    return violations, expects


def applied_steps(markers: Mapping[MarkerKey, SeenMarker]) -> dict[StepRef, Applied]:
    """When each step's EXECUTE was applied (PostgreSQL's marker time) and its before-image, from markers."""
    return {
        (tx_id, step): Applied(marker.at.timestamp() * 1000 if marker.at else math.inf, marker.before)
        for (tx_id, step, action), marker in markers.items()
        if action == EXECUTE
    }


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
    """What the data reads returned, keyed as `Stores.rows` / `points` / `nodes` key them (rows and nodes:
    every copy found under one key, so that a duplicate shows)."""

    rows: Mapping[tuple[Any, ...], list[dict[str, Any]]]
    points: Mapping[tuple[str, str], dict[str, Any]]
    nodes: Mapping[tuple[Any, ...], list[dict[str, Any]]]

    def point(self, e: Expect) -> dict[str, Any] | None:
        return self.points.get((e.where[0], e.key))

    def _copies(self, e: Expect) -> list[dict[str, Any]]:
        if e.store == "postgres":
            return self.rows.get((*e.where, frozen(e.key)), [])
        if e.store == "qdrant":
            point = self.point(e)
            return [] if point is None else [point["payload"]]
        return self.nodes.get((*e.where, frozen(e.key)), [])

    def copies(self, e: Expect) -> int:
        return len(self._copies(e))

    def actual(self, e: Expect) -> dict[str, Any] | None:
        """The row, point payload or node properties an expectation is about, None when absent."""
        copies = self._copies(e)
        return copies[0] if copies else None


def _mismatch(state: KeyState, actual: dict[str, Any] | None, point: dict[str, Any] | None) -> str | None:
    """How the key differs from the state it must hold (None: it holds it)."""
    e = state.expect
    if state.values is None:
        return None if actual is None else f"{e.describe()} exists"
    if actual is None:
        return f"{e.describe()} is missing"
    wrong = _differences(state.values, actual)
    if state.restored:
        # A before-image is the whole row, node or payload: a field it lacks must be gone again.
        wrong += [f"{name}={actual[name]!r} (absent before)" for name in actual if name not in state.values]
    vector = point["vector"] if point is not None else None
    if state.vector is not None and vector and not _similar(state.vector, vector):
        wrong.append("vector differs")
    return f"{e.describe()} holds {', '.join(wrong)}" if wrong else None


def judge_effects(states: Sequence[KeyState], judged: Mapping[str, str], found: Found) -> list[Violation]:
    """The data pass: each key holds the state its writers leave (keys.py), and holds it once."""
    violations: list[Violation] = []
    for state in states:
        e = state.expect
        actual = found.actual(e)
        if found.copies(e) > 1:
            what = f"{e.describe()} exists {found.copies(e)} times"
            violations.append(Violation(e.tx_id, DUPLICATE, what, e.store, e.step))
        wrong = _mismatch(state, actual, found.point(e) if e.store == "qdrant" else None)
        if wrong is None:
            continue
        if state.restored:
            # An undone write still visible: the key does not hold what it held before the transaction.
            what = f"{wrong} after the transaction ended {judged.get(e.tx_id)} (before-image not restored)"
            violations.append(Violation(e.tx_id, EFFECT_PRESENT, what, e.store, e.step))
        elif actual is None:
            violations.append(Violation(e.tx_id, EFFECT_MISSING, wrong, e.store, e.step))
        else:
            what = wrong if state.values is not None else f"{wrong} but was deleted"
            violations.append(Violation(e.tx_id, EFFECT_WRONG, what, e.store, e.step))
    return violations
