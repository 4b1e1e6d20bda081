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

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from neo4j import AsyncGraphDatabase

from consumers.neo4j import MARKER_LABEL
from consumers.postgres import MARKER_TABLE
from consumers.qdrant import MARKERS, QdrantParticipant, marker_point_id
from consumers.qdrant_backends import canonical_id
from polycommit.client import Transaction, TransactionResult
from polycommit.config import Settings
from polycommit.events import Operation

TERMINAL = ("completed", "compensated", "failed", "committed", "aborted")
EXECUTE, COMPENSATE = "EXECUTE", "COMPENSATE"
CHUNK = 2000

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


# -- the history: what the workload sent and heard ----------------------------------------------------


@dataclass
class History:
    """Transactions as invoked (by id, in order) and every status reported for each, in arrival order."""

    intents: dict[str, Transaction] = field(default_factory=dict)
    results: dict[str, list[str]] = field(default_factory=dict)

    def invoke(self, transaction: Transaction) -> None:
        self.intents[transaction.tx_id] = transaction

    def record(self, tx_id: str, status: str) -> None:
        """A result heard for `tx_id` (a repeat of the last status heard is not counted twice)."""
        status = status.lower()
        heard = self.results.setdefault(tx_id, [])
        if not heard or heard[-1] != status:
            heard.append(status)

    def record_result(self, result: TransactionResult) -> None:
        self.record(result.tx_id, result.status)

    def final(self, tx_id: str) -> str | None:
        """The last terminal status heard, else the last status (e.g. `stuck`), else None."""
        heard = self.results.get(tx_id, [])
        terminal = [s for s in heard if s in TERMINAL]
        if terminal:
            return terminal[-1]
        return heard[-1] if heard else None

    def missing(self) -> list[str]:
        """Invoked transactions with no terminal result yet."""
        return [t for t in self.intents if self.final(t) not in TERMINAL]

    async def recover_from_log(self, settings: Settings) -> int:
        """Read the `results` topic from the start and record every result of an invoked transaction;
        returns how many transactions gained a terminal status."""
        from polycommit.bus import read_topic, topics_for
        from polycommit.codec import default_codec

        codec = default_codec()
        before = set(self.missing())
        found: list[tuple[str, str]] = []

        def handle(record: Any) -> None:
            key = record.key.decode() if record.key else ""
            if key in self.intents and record.value is not None:
                event = codec.decode_as(record.value, "TransactionResult")
                found.append((str(event["tx_id"]), str(event["status"]).lower()))

        await read_topic(settings, topics_for(settings).results, handle)
        # The log is authoritative and ordered per transaction; a status the client heard that the log
        # does not have (impossible unless results are lost) is kept, after the log's own.
        from_log: dict[str, list[str]] = {}
        for tx_id, status in found:
            heard = from_log.setdefault(tx_id, [])
            if not heard or heard[-1] != status:
                heard.append(status)
        for tx_id, statuses in from_log.items():
            extra = [s for s in self.results.get(tx_id, []) if s not in statuses]
            self.results[tx_id] = statuses + extra
        return len(before - set(self.missing()))


# -- the report -----------------------------------------------------------------------------------


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


# -- what the stores hold -------------------------------------------------------------------------


@dataclass(frozen=True)
class SeenMarker:
    pending: bool = False  # Qdrant: written ahead of its effect, never confirmed
    at: datetime.datetime | None = None  # PostgreSQL: the committing transaction's start


MarkerKey = tuple[str, int, str]  # (tx_id, step_index, action)


@dataclass
class _Expect:
    """One effect of a structured operation, to be found (or not) in a store."""

    tx_id: str
    step: int
    store: str
    where: tuple[Any, ...]  # the grouping of reads: (table, key columns) / (collection,) / (label, key fields)
    key: Any  # the row key dict / canonical point id / node key dict
    values: dict[str, Any] | None  # what must be there after EXECUTE; None: must be absent
    vector: list[float] | None = None

    def describe(self) -> str:
        if self.store == "postgres":
            return f"row {self.where[0]}{json.dumps(self.key, sort_keys=True)}"
        if self.store == "qdrant":
            return f"point {self.where[0]}/{self.key}"
        return f"node (:{self.where[0]} {json.dumps(self.key, sort_keys=True)})"


def _expectations(tx_id: str, index: int, op: Operation) -> list[_Expect]:
    """The effects an operation has once executed (values), each of which its undo must remove."""
    kind, store = op["kind"], op["store"]
    if kind in ("upsert_row", "delete_row"):
        key = json.loads(op["key"])
        values = {**json.loads(op["values"]), **key} if kind == "upsert_row" else None
        return [_Expect(tx_id, index, store, (op["target"], tuple(sorted(key))), key, values)]
    if kind == "upsert_points":
        return [
            _Expect(tx_id, index, store, (op["target"],), canonical_id(p["id"]), json.loads(p["payload"]), p["vector"])
            for p in op["points"]
        ]
    if kind == "delete_points":
        return [_Expect(tx_id, index, store, (op["target"],), canonical_id(i), None) for i in op["point_ids"]]
    if kind in ("merge_node", "delete_node"):
        key = json.loads(op["key"])
        values = {**json.loads(op["values"]), **key} if kind == "merge_node" else None
        return [_Expect(tx_id, index, store, (op["target"], tuple(sorted(key))), key, values)]
    return []  # raw statements and relationships: markers only


def _frozen(key: Any) -> Any:
    return json.dumps(key, sort_keys=True, default=str) if isinstance(key, dict) else key


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _tick(identifier: str) -> str:
    return "`" + identifier.replace("`", "``") + "`"


class _Stores:
    """Batched reads of markers and data from the three stores."""

    def __init__(self, settings: Settings, qdrant: QdrantParticipant) -> None:
        self.settings = settings
        self.qdrant = qdrant

    # markers

    async def postgres_markers(self, tx_ids: Sequence[str]) -> dict[MarkerKey, SeenMarker]:
        found: dict[MarkerKey, SeenMarker] = {}
        if not tx_ids:
            return found
        conn = await asyncpg.connect(self.settings.postgres.dsn)
        try:
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", MARKER_TABLE)
            if not exists:
                return found
            for chunk in _chunks(tx_ids):
                rows = await conn.fetch(
                    f"SELECT tx_id, step_index, action, applied_at FROM {MARKER_TABLE} WHERE tx_id = ANY($1::text[])",
                    list(chunk),
                )
                for r in rows:
                    found[(r["tx_id"], r["step_index"], r["action"])] = SeenMarker(at=r["applied_at"])
        finally:
            await conn.close()
        return found

    async def neo4j_markers(self, wanted: Sequence[MarkerKey]) -> dict[MarkerKey, SeenMarker]:
        found: dict[MarkerKey, SeenMarker] = {}
        if not wanted:
            return found
        by_id = {f"{tx}/{step}/{action}": (tx, step, action) for tx, step, action in wanted}
        query = f"UNWIND $ids AS id MATCH (m:{MARKER_LABEL} {{id: id}}) RETURN m.id AS id"
        for records in await self._neo4j_reads([(query, {"ids": list(chunk)}) for chunk in _chunks(list(by_id))]):
            for record in records:
                found[by_id[record["id"]]] = SeenMarker()
        return found

    async def qdrant_markers(self, wanted: Sequence[MarkerKey]) -> dict[MarkerKey, SeenMarker]:
        found: dict[MarkerKey, SeenMarker] = {}
        if not wanted or await self.qdrant.backend.collection_info(MARKERS) is None:
            return found
        by_point = {marker_point_id(f"{tx}/{step}/{action}"): (tx, step, action) for tx, step, action in wanted}
        for chunk in _chunks(list(by_point)):
            points = await self.qdrant.backend.retrieve(MARKERS, list(chunk), with_vectors=False)
            for point_id, point in points.items():
                found[by_point[point_id]] = SeenMarker(pending=bool(point["payload"].get("pending")))
        return found

    # data

    async def rows(self, expects: Sequence[_Expect]) -> dict[tuple[Any, ...], dict[str, Any]]:
        """(table, key columns, frozen key) -> row as JSON, for every expected row that exists."""
        found: dict[tuple[Any, ...], dict[str, Any]] = {}
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for e in expects:
            groups.setdefault(e.where, []).append(e.key)
        if not groups:
            return found
        conn = await asyncpg.connect(self.settings.postgres.dsn)
        try:
            for (table, columns), keys in groups.items():
                if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _quote(table)):
                    continue
                using = ", ".join(_quote(c) for c in columns)
                sql = (
                    f"SELECT to_jsonb(t)::text FROM {_quote(table)} t "
                    f"JOIN jsonb_populate_recordset(NULL::{_quote(table)}, $1::jsonb) k USING ({using})"
                )
                for chunk in _chunks(keys):
                    for value in await conn.fetch(sql, json.dumps(list(chunk), default=str)):
                        row = json.loads(value[0])
                        key = {c: row.get(c) for c in columns}
                        found[(table, columns, _frozen(key))] = row
        finally:
            await conn.close()
        return found

    async def points(self, expects: Sequence[_Expect]) -> dict[tuple[str, str], dict[str, Any]]:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        groups: dict[str, list[str]] = {}
        for e in expects:
            groups.setdefault(e.where[0], []).append(e.key)
        for collection, ids in groups.items():
            if await self.qdrant.backend.collection_info(collection) is None:
                continue
            for chunk in _chunks(sorted(set(ids))):
                for point_id, point in (await self.qdrant.read_points(collection, chunk)).items():
                    found[(collection, point_id)] = dict(point)
        return found

    async def nodes(self, expects: Sequence[_Expect]) -> dict[tuple[Any, ...], dict[str, Any]]:
        found: dict[tuple[Any, ...], dict[str, Any]] = {}
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for e in expects:
            groups.setdefault(e.where, []).append(e.key)
        reads: list[tuple[str, dict[str, Any]]] = []
        shapes: list[tuple[Any, ...]] = []
        for (label, fields), keys in groups.items():
            pattern = ", ".join(f"{_tick(f)}: k.{_tick(f)}" for f in fields)
            query = f"UNWIND $keys AS k MATCH (n:{_tick(label)} {{{pattern}}}) RETURN properties(n) AS props"
            for chunk in _chunks(keys):
                reads.append((query, {"keys": list(chunk)}))
                shapes.append((label, fields))
        for (label, fields), records in zip(shapes, await self._neo4j_reads(reads), strict=True):
            for record in records:
                props = dict(record["props"])
                found[(label, fields, _frozen({f: props.get(f) for f in fields}))] = props
        return found

    async def _neo4j_reads(self, reads: Sequence[tuple[str, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        if not reads:
            return []
        cfg = self.settings.neo4j
        driver = AsyncGraphDatabase.driver(cfg.uri, auth=(cfg.user, cfg.password), notifications_min_severity="OFF")
        try:
            results: list[list[dict[str, Any]]] = []
            async with driver.session(default_access_mode="READ") as session:
                for query, params in reads:
                    result = await session.run(query, params)
                    results.append(await result.data())
            return results
        finally:
            await driver.close()


# -- judging --------------------------------------------------------------------------------------


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
        return await _check(history, _Stores(settings, participant), keys_owned, started)
    finally:
        if own_qdrant:
            await participant.close()


async def _check(history: History, stores: _Stores, keys_owned: bool, started: float) -> CheckReport:
    violations: list[Violation] = []
    statuses: dict[str, int] = {}
    wanted: dict[str, list[MarkerKey]] = {"postgres": [], "qdrant": [], "neo4j": []}
    judged: dict[str, str] = {}  # tx_id -> final status, for the transactions whose stores are read
    for tx_id, tx in history.intents.items():
        final = history.final(tx_id)
        statuses[final or "none"] = statuses.get(final or "none", 0) + 1
        terminal = [s for s in dict.fromkeys(history.results.get(tx_id, [])) if s in TERMINAL]
        if final is None:
            violations.append(Violation(tx_id, LOST, "no result after recovery"))
            continue
        if len(terminal) > 1:
            # No state of the stores can agree with both: that is the violation, the rest would be noise.
            violations.append(Violation(tx_id, CONFLICTING, f"reported {' then '.join(terminal)}"))
            continue
        if final not in (*TERMINAL, "stuck"):
            violations.append(Violation(tx_id, UNKNOWN, f"reported {final!r}"))
            continue
        if final == "stuck":
            violations.append(Violation(tx_id, STUCK, "a compensation never succeeded; the saga is still stuck"))
        judged[tx_id] = final
        for step in tx.steps:
            store = step["operation"]["store"]
            if store in wanted:
                for action in (EXECUTE, COMPENSATE):
                    wanted[store].append((tx_id, step["index"], action))

    markers: dict[MarkerKey, SeenMarker] = {}
    markers.update(await stores.postgres_markers(sorted({k[0] for k in wanted["postgres"]})))
    markers.update(await stores.neo4j_markers(wanted["neo4j"]))
    markers.update(await stores.qdrant_markers(wanted["qdrant"]))

    expects: list[_Expect] = []
    for tx_id, final in judged.items():
        tx = history.intents[tx_id]
        for step in tx.steps:
            index, store = step["index"], step["operation"]["store"]
            execute = markers.get((tx_id, index, EXECUTE))
            compensate = markers.get((tx_id, index, COMPENSATE))

            def flag(kind: str, what: str, tx_id: str = tx_id, store: str = store, index: int = index) -> None:
                violations.append(Violation(tx_id, kind, what, store, index))

            if execute and compensate and execute.at and compensate.at and execute.at > compensate.at:
                # P4: EXECUTE after its COMPENSATE must be skipped; a later EXECUTE marker is a hanging step.
                flag(HANGING, f"EXECUTE recorded at {execute.at}, after its COMPENSATE at {compensate.at}")
            if final in ("completed", "committed"):
                if execute is None:
                    flag(MISSING_EXECUTE, "no EXECUTE marker")
                elif execute.pending:
                    flag(PENDING_MARKER, "the EXECUTE marker was never confirmed")
                if compensate is not None:
                    flag(COMPENSATED_IN_COMPLETED, "a COMPENSATE marker in a completed transaction")
            elif final in ("compensated", "failed", "aborted"):
                undone = compensate is not None and not compensate.pending
                if execute is not None and not undone:
                    state = "an unconfirmed" if compensate is not None else "no"
                    flag(LEFT_APPLIED, f"EXECUTE marker with {state} COMPENSATE marker")
            if keys_owned and final != "stuck":
                expects.extend(_expectations(tx_id, index, step["operation"]))

    rows = await stores.rows([e for e in expects if e.store == "postgres"])
    points = await stores.points([e for e in expects if e.store == "qdrant"])
    nodes = await stores.nodes([e for e in expects if e.store == "neo4j"])
    for e in expects:
        final = judged[e.tx_id]
        actual: dict[str, Any] | None
        if e.store == "postgres":
            actual = rows.get((*e.where, _frozen(e.key)))
        elif e.store == "qdrant":
            point = points.get((e.where[0], e.key))
            actual = None if point is None else point["payload"]
        else:
            actual = nodes.get((*e.where, _frozen(e.key)))
        if final in ("completed", "committed"):
            if e.values is None:
                if actual is not None:
                    violations.append(
                        Violation(e.tx_id, EFFECT_WRONG, f"{e.describe()} was deleted but exists", e.store, e.step)
                    )
            elif actual is None:
                violations.append(Violation(e.tx_id, EFFECT_MISSING, f"{e.describe()} is missing", e.store, e.step))
            else:
                wrong = _differences(e.values, actual)
                if e.store == "qdrant" and e.vector is not None:
                    point = points[(e.where[0], e.key)]
                    if point["vector"] and not _similar(e.vector, point["vector"]):
                        wrong.append("vector differs")
                if wrong:
                    what = f"{e.describe()} holds {', '.join(wrong)}"
                    violations.append(Violation(e.tx_id, EFFECT_WRONG, what, e.store, e.step))
        elif actual is not None and e.values is not None:
            # P4 directly: the keys were fresh, so an undone (or never run) upsert leaves nothing behind.
            what = f"{e.describe()} exists after the transaction ended {final}"
            violations.append(Violation(e.tx_id, EFFECT_PRESENT, what, e.store, e.step))
    violations.sort(key=lambda v: (v.kind, v.tx_id, v.step or 0))
    return CheckReport(len(history.intents), violations, statuses, time.perf_counter() - started)
