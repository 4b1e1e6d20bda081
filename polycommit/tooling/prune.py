"""`polycommit prune --older-than DURATION`: delete the applied-step markers of transactions that ended long ago.

Markers make redelivery harmless (P4), so only the markers of transactions that are over may go: the
transactions come from the results topic (a result other than STUCK, finished before the cutoff), minus
every transaction the coordinator's changelog still has in flight (a stuck saga, an intent sent again).
Their markers are deleted in all three stores: PostgreSQL `polycommit_steps` rows, Neo4j
`:PolycommitStep` nodes, Qdrant `_polycommit_markers` points. The coordinator refuses intents older than
the marker retention (orchestrator/admission.py), so a pruned transaction cannot be run a second time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, get_args

import asyncpg
from neo4j import AsyncGraphDatabase

from consumers.neo4j.cypher import MARKER_LABEL
from consumers.postgres.sql import MARKER_TABLE
from consumers.qdrant.backend import QdrantBackend
from consumers.qdrant.effects import MARKERS, marker_point_id
from consumers.qdrant.participant import backend_for
from polycommit.bus import read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings, parse_duration_ms
from polycommit.errors import CodecError
from polycommit.events import StepAction, now_ms
from polycommit.tooling.inspect import transactions_in_flight

DELETE_PG = f"DELETE FROM {MARKER_TABLE} WHERE tx_id = ANY($1::text[]) AND applied_at < to_timestamp($2 / 1000.0)"
DELETE_NEO4J = f"UNWIND $ids AS id MATCH (m:{MARKER_LABEL} {{id: id}}) DELETE m RETURN count(m) AS deleted"
ACTIONS: tuple[str, ...] = get_args(StepAction)  # every action a marker is written for, two-phase included


def marker_ids(steps: dict[str, int]) -> list[str]:
    """Every marker id the transactions could have written (`tx/step/ACTION`, consumers/command.py)."""
    return [f"{tx}/{index}/{action}" for tx, count in steps.items() for index in range(count) for action in ACTIONS]


async def ended_before(settings: Settings, cutoff_ms: int) -> dict[str, int]:
    """tx id -> step count of every transaction whose last result ended it before `cutoff_ms`."""
    codec = default_codec()
    last: dict[str, tuple[int, str, int]] = {}

    def handle(record: Any) -> None:
        try:
            result = codec.decode_as(record.value, "TransactionResult")
        except CodecError:
            return
        last[result["tx_id"]] = (result["finished_at_ms"], result["status"], len(result["steps"]))

    await read_topic(settings, topics_for(settings).results, handle)
    return {tx: steps for tx, (at, status, steps) in last.items() if status != "STUCK" and at < cutoff_ms}


async def _prune_postgres(settings: Settings, tx_ids: Sequence[str], cutoff_ms: int) -> int:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        status = await conn.execute(DELETE_PG, list(tx_ids), cutoff_ms)
    except asyncpg.UndefinedTableError:
        return 0  # no PostgreSQL consumer has run: no markers
    finally:
        await conn.close()
    return int(status.split()[-1])


async def _prune_neo4j(settings: Settings, ids: list[str]) -> int:
    cfg = settings.neo4j
    async with AsyncGraphDatabase.driver(cfg.uri, auth=(cfg.user, cfg.password)) as driver:
        records, _, _ = await driver.execute_query(DELETE_NEO4J, ids=ids)
    return int(records[0]["deleted"]) if records else 0


async def _prune_qdrant(backend: QdrantBackend, ids: Iterable[str]) -> int:
    if await backend.collection_info(MARKERS) is None:
        return 0
    points = [marker_point_id(marker) for marker in ids]
    present = list(await backend.retrieve(MARKERS, points, with_vectors=False))
    if present:
        await backend.delete(MARKERS, present)
        await backend.flush()  # like a batch under POLYCOMMIT_QDRANT_FSYNC: the deletion is on disk
    return len(present)


async def prune(
    settings: Settings, older_than_ms: int, *, now: int | None = None, qdrant: QdrantBackend | None = None
) -> dict[str, Any]:
    """Delete the markers of transactions that ended more than `older_than_ms` ago; `qdrant` is an open
    backend to use (Qdrant Edge allows one process per storage: pass the running consumer's)."""
    cutoff = (now_ms() if now is None else now) - older_than_ms
    ended = await ended_before(settings, cutoff)
    in_flight = set(await transactions_in_flight(settings))
    steps = {tx: count for tx, count in ended.items() if tx not in in_flight}
    ids = marker_ids(steps)
    deleted = {"postgres": 0, "neo4j": 0, "qdrant": 0}
    if steps:
        # Qdrant first: an Edge storage held by a running consumer fails here, before anything is deleted
        # (a prune run again deletes what is left: every deletion is idempotent).
        backend = qdrant or backend_for(settings)
        try:
            deleted["qdrant"] = await _prune_qdrant(backend, ids)
        finally:
            if qdrant is None:
                await backend.close()
        deleted["postgres"] = await _prune_postgres(settings, list(steps), cutoff)
        deleted["neo4j"] = await _prune_neo4j(settings, ids)
    return {
        "cutoff_ms": cutoff,
        "transactions": sorted(steps),
        "kept_in_flight": sorted(in_flight & set(ended)),
        "deleted": deleted,
    }


async def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        older_than = parse_duration_ms(args.older_than)
    except ValueError as exc:
        print(f"polycommit prune: {exc}", file=sys.stderr)
        return 2
    report = await prune(settings, older_than)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        counts = ", ".join(f"{store} {n}" for store, n in report["deleted"].items())
        print(f"{len(report['transactions'])} ended transactions; markers deleted: {counts}")
        if report["kept_in_flight"]:
            print(f"kept (in flight again): {', '.join(report['kept_in_flight'])}")
    return 0
