"""`check()`: read what the stores hold for a history's transactions, then apply the checker's rules."""

from __future__ import annotations

import time

from consumers.qdrant import QdrantParticipant
from polycommit.config import Settings
from polycommit.tooling.checker.history import History
from polycommit.tooling.checker.report import CheckReport
from polycommit.tooling.checker.stores import MarkerKey, SeenMarker, Stores
from polycommit.tooling.checker.verdict import Found, judge_effects, judge_markers, triage


async def check(
    settings: Settings,
    history: History,
    *,
    qdrant: QdrantParticipant | None = None,
    keys_owned: bool = True,
) -> CheckReport:
    """Judge every invoked transaction of `history` against what the three stores hold now."""
    started = time.perf_counter()
    own_qdrant = qdrant is None
    participant = qdrant if qdrant is not None else QdrantParticipant(settings)
    try:
        return await _check(history, Stores(settings, participant), keys_owned, started)
    finally:
        if own_qdrant:
            await participant.close()


async def _check(history: History, stores: Stores, keys_owned: bool, started: float) -> CheckReport:
    found = triage(history)
    markers: dict[MarkerKey, SeenMarker] = {}
    markers.update(await stores.postgres_markers(sorted({k[0] for k in found.wanted["postgres"]})))
    markers.update(await stores.neo4j_markers(found.wanted["neo4j"]))
    markers.update(await stores.qdrant_markers(found.wanted["qdrant"]))
    marker_violations, expects = judge_markers(history, found.judged, markers, keys_owned)
    data = Found(
        rows=await stores.rows([e for e in expects if e.store == "postgres"]),
        points=await stores.points([e for e in expects if e.store == "qdrant"]),
        nodes=await stores.nodes([e for e in expects if e.store == "neo4j"]),
    )
    violations = [*found.violations, *marker_violations, *judge_effects(expects, found.judged, data)]
    violations.sort(key=lambda v: (v.kind, v.tx_id, v.step or 0))
    return CheckReport(len(history.intents), violations, found.statuses, time.perf_counter() - started)
