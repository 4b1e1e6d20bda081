"""`check()`: read what the stores hold for a history's transactions, then apply the checker's rules."""

from __future__ import annotations

import time
from collections.abc import Callable

from consumers.qdrant import QdrantParticipant
from polycommit.config import Settings
from polycommit.tooling.checker.expectations import Expect, expectations
from polycommit.tooling.checker.history import History
from polycommit.tooling.checker.keys import key_states
from polycommit.tooling.checker.leftovers import orphans, prepared_left, scopes
from polycommit.tooling.checker.log import LogFacts, log_violations
from polycommit.tooling.checker.report import CheckReport, Violation
from polycommit.tooling.checker.stores import MarkerKey, SeenMarker, Stores
from polycommit.tooling.checker.verdict import Found, applied_steps, judge_effects, judge_markers, triage

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


async def check(
    settings: Settings,
    history: History,
    *,
    qdrant: QdrantParticipant | None = None,
    keys_owned: bool = True,
    log: LogFacts | None = None,
    progress: Progress = _quiet,
) -> CheckReport:
    """Judge every invoked transaction of `history` against what the three stores hold now.

    `keys_owned`: the workload's keys were fresh, so a key whose every writer was undone before any
    before-image was recorded must be absent. `log`: the facts of the log (`polycommit check`), which
    add the log's own rules, orphan scans and prepared transactions left in PostgreSQL."""
    started = time.perf_counter()
    own_qdrant = qdrant is None
    participant = qdrant if qdrant is not None else QdrantParticipant(settings)
    try:
        stores = Stores(settings, participant)
        report = await _check(history, stores, keys_owned, log, progress)
    finally:
        if own_qdrant:
            await participant.close()
    report.elapsed_s = time.perf_counter() - started
    return report


async def _check(
    history: History, stores: Stores, keys_owned: bool, log: LogFacts | None, progress: Progress
) -> CheckReport:
    found = triage(history)
    progress(f"reading the markers of {len(found.judged)} transactions")
    markers: dict[MarkerKey, SeenMarker] = {}
    markers.update(await stores.postgres_markers(sorted({k[0] for k in found.wanted["postgres"]})))
    markers.update(await stores.neo4j_markers(found.wanted["neo4j"]))
    markers.update(await stores.qdrant_markers(found.wanted["qdrant"]))
    marker_violations, expects = judge_markers(history, found.judged, markers)
    applied = applied_steps(markers)
    if log is not None:
        applied.update(log.applied)  # the log's outcome time orders writers across stores and transactions
    grants = log.grants if log is not None else None  # the lock table's order of writers, key by key
    states, pending = key_states(expects, found.judged, applied, fresh_keys=keys_owned, grants=grants)
    progress(f"reading {len(states)} keys from the stores")
    judged = [s.expect for s in states]
    data = Found(
        rows=await stores.rows([e for e in judged if e.store == "postgres"]),
        points=await stores.points([e for e in judged if e.store == "qdrant"]),
        nodes=await stores.nodes([e for e in judged if e.store == "neo4j"]),
    )
    violations = [*found.violations, *marker_violations, *judge_effects(states, found.judged, data)]
    if log is not None:
        extra, more_pending = await _log_checks(history, stores, log, progress)
        violations.extend(extra)
        pending += more_pending
    violations.sort(key=lambda v: (v.kind, v.tx_id, v.step or 0))
    return CheckReport(len(history.intents), violations, found.statuses, pending=pending)


def _every_effect(history: History) -> list[Expect]:
    """The effects every transaction of the log names, judged or not: what makes a key not an orphan."""
    named: list[Expect] = []
    for tx_id, tx in history.intents.items():
        for step in tx.steps:
            named.extend(expectations(tx_id, step["index"], step["operation"]))
    return named


async def _log_checks(
    history: History, stores: Stores, log: LogFacts, progress: Progress
) -> tuple[list[Violation], int]:
    violations = log_violations(history, log)
    for scope in scopes(_every_effect(history)):
        progress(f"scanning {scope.target} for keys {scope.prefix}* no transaction wrote")
        violations.extend(orphans(scope, await stores.scan_keys(scope)))
    progress("listing prepared transactions in PostgreSQL")
    left, pending = prepared_left(await stores.prepared_gids(), history)
    return [*violations, *left], pending
