"""Cypher text for the Neo4j participant, without I/O: the statements it runs, and how to read their answers.

Labels, types and property names are validated identifiers, written between backticks; values are
always parameters.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from consumers.neo4j.effects import Effect, EffectKind, NodeShape, NodeTarget, RelShape, RelTarget, Target
from polycommit import versioning
from polycommit.errors import InvalidOperationError
from polycommit.parsed import IDENTIFIER, dumps

MARKER_LABEL = "PolycommitStep"


# -- Cypher text (labels, types and property names are validated identifiers; values are parameters) --


def _tick(name: str) -> str:
    if not IDENTIFIER.match(name):  # never reached for validated operations; a second guard before text
        raise InvalidOperationError(f"{name!r} is not a plain identifier")
    return f"`{name}`"


def _pattern(var: str, shape: NodeShape, param: str) -> str:
    label, props = shape
    fields = ", ".join(f"{_tick(p)}: row.{param}.{_tick(p)}" for p in props)
    return f"({var}:{_tick(label)} {{{fields}}})"


# Each effect query reads the before-images AND writes, in one round trip per (kind, shape) and group:
# the keys of a group are distinct, so a row's before-image is its own target's state before the group.
# It answers with ONE record, a list of [i, before, ...] rows: the Python driver spends ~0.1 ms on each
# record it receives, which for 200 rows costs more than the whole MERGE on the server.
# Where an effect can be refused (a node that still has relationships, a missing end node), the query
# skips the write for that row and returns what it saw; `refusal()` then fails that command alone.


@functools.lru_cache(maxsize=1024)
def node_effect_query(kind: EffectKind, shape: NodeShape) -> str:
    n, old = _pattern("n", shape, "key"), _pattern("old", shape, "key")
    head = f"UNWIND $rows AS row OPTIONAL MATCH {old} "
    tail = " RETURN collect([row.i, before]) AS seen"
    if kind in ("merge", "replace"):
        assignment = "+=" if kind == "merge" else "="
        return f"{head}WITH row, properties(old) AS before MERGE {n} SET n {assignment} row.props{tail}"
    if kind == "erase":
        return f"{head}WITH row, old, properties(old) AS before DETACH DELETE old{tail}"
    # delete: DELETE, not DETACH DELETE, so a relationship that appears anyway fails the commit loudly.
    return (
        f"{head}WITH row, old, properties(old) AS before, "
        "CASE WHEN old IS NULL THEN 0 ELSE COUNT { (old)--() } END AS degree "
        "CALL (old, degree) { WITH * WHERE old IS NOT NULL AND degree = 0 DELETE old } "
        "RETURN collect([row.i, before, degree]) AS seen"
    )


@functools.lru_cache(maxsize=1024)
def rel_effect_query(kind: EffectKind, shape: RelShape) -> str:
    rel_type, start, end = shape
    a, b, t = _pattern("a", start, "start"), _pattern("b", end, "end"), _tick(rel_type)
    if kind in ("delete", "erase"):
        return (
            f"UNWIND $rows AS row OPTIONAL MATCH {a}-[r:{t}]->{b} "
            "WITH row, collect(r) AS found WITH row, found, properties(found[0]) AS before "
            "FOREACH (r IN found | DELETE r) RETURN collect([row.i, before]) AS seen"
        )
    assignment = "+=" if kind == "merge" else "="
    return (
        f"UNWIND $rows AS row OPTIONAL MATCH {a} OPTIONAL MATCH {b} OPTIONAL MATCH (a)-[old:{t}]->(b) "
        "WITH row, a, b, properties(collect(old)[0]) AS before "
        "CALL (row, a, b) { WITH * WHERE a IS NOT NULL AND b IS NOT NULL "
        f"MERGE (a)-[r:{t}]->(b) SET r {assignment} row.props }} "
        "RETURN collect([row.i, before, 0, a IS NOT NULL, b IS NOT NULL]) AS seen"
    )


def effect_query(effect: Effect) -> str:
    if isinstance(effect.target, NodeTarget):
        return node_effect_query(effect.kind, effect.target.shape)
    if isinstance(effect.target, RelTarget):
        return rel_effect_query(effect.kind, effect.target.shape)
    raise ValueError(f"a {effect.kind} effect has no structured query")


@functools.lru_cache(maxsize=1024)
def node_read_query(shape: NodeShape) -> str:
    return f"UNWIND $rows AS row OPTIONAL MATCH {_pattern('n', shape, 'key')} RETURN properties(n) AS props"


@functools.lru_cache(maxsize=1024)
def rel_read_query(shape: RelShape) -> str:
    rel_type, start, end = shape
    return (
        f"UNWIND $rows AS row OPTIONAL MATCH {_pattern('a', start, 'start')}-[r:{_tick(rel_type)}]->"
        f"{_pattern('b', end, 'end')} RETURN properties(r) AS props LIMIT 1"
    )


def read_query(target: Target) -> str:
    return node_read_query(target.shape) if isinstance(target, NodeTarget) else rel_read_query(target.shape)


def constraint_statement(shape: NodeShape) -> str:
    label, props = shape
    # A readable name plus a digest, so two shapes never share a name however their parts are spelled.
    digest = hashlib.sha256(repr(shape).encode()).hexdigest()[:10]
    name = f"polycommit_key_{label}_{digest}"  # built from a validated label: safe between backticks
    fields = ", ".join(f"n.{_tick(p)}" for p in props)
    return f"CREATE CONSTRAINT `{name}` IF NOT EXISTS FOR (n:{_tick(label)}) REQUIRE ({fields}) IS UNIQUE"


CREATE_MARKER_CONSTRAINT = (
    f"CREATE CONSTRAINT polycommit_step_id IF NOT EXISTS FOR (m:{MARKER_LABEL}) REQUIRE m.id IS UNIQUE"
)
READ_MARKERS = f"UNWIND $ids AS id MATCH (m:{MARKER_LABEL} {{id: id}}) RETURN collect([m.id, m.before]) AS markers"


# Versions (polycommit.versioning): one (:PolycommitVersion {key, version}) node per resource key, kept
# after the key's delete (its tombstone). Neo4j does not lock what a query reads, so the lock query writes
# first (SET takes the node's write lock until the transaction ends) and reads after: nobody can change a
# version between our check and our bump. Keys come sorted, so batches lock them in one order.
VERSION_LABEL = versioning.VERSION_LABEL
CREATE_VERSION_CONSTRAINT = (
    f"CREATE CONSTRAINT polycommit_version_key IF NOT EXISTS FOR (v:{VERSION_LABEL}) REQUIRE v.key IS UNIQUE"
)
LOCK_VERSIONS = (
    f"UNWIND $keys AS k MERGE (v:{VERSION_LABEL} {{key: k}}) ON CREATE SET v.version = 0 "
    "SET v.locked = true REMOVE v.locked RETURN collect([k, v.version]) AS versions"
)

# A batch transaction's first and last queries, each one round trip for what took two (at one transaction
# per batch, a round trip is a few ms of every step's latency). The first reads the batch's markers and
# locks the versions of every key its effects may write (a key the batch then skips is locked for nothing,
# which is harmless); the versions are then kept in the participant while the effects run, and the last
# query raises each written key's version by its count of writes and writes the new markers.
_MARKERS_AND_LOCKED_VERSIONS = (
    f"CALL () {{ UNWIND $ids AS id MATCH (m:{MARKER_LABEL} {{id: id}}) RETURN collect([m.id, m.before]) AS markers }} "
    f"CALL () {{ UNWIND $keys AS k MERGE (v:{VERSION_LABEL} {{key: k}}) ON CREATE SET v.version = 0 "
    "SET v.locked = true REMOVE v.locked RETURN collect([k, v.version]) AS versions } "
)
READ_MARKERS_LOCK_VERSIONS = _MARKERS_AND_LOCKED_VERSIONS + "RETURN markers, versions"


@functools.lru_cache(maxsize=1024)
def read_markers_lock_versions_then(effect_query: str) -> str:
    """READ_MARKERS_LOCK_VERSIONS and, in the same round trip, a batch's one effect query, run only if
    the batch has no marker at all (the common batch: fresh EXECUTEs, which the planner then applies
    exactly so). With a marker, nothing is written and `seen` is empty: the batch goes the usual way."""
    return (
        f"{_MARKERS_AND_LOCKED_VERSIONS}"
        f"CALL (markers) {{ WITH markers WHERE size(markers) = 0 {effect_query} }} "
        "RETURN markers, versions, seen"
    )


BUMP_VERSIONS_WRITE_MARKERS = (
    f"CALL () {{ UNWIND $bumps AS b MATCH (v:{VERSION_LABEL} {{key: b.key}}) SET v.version = v.version + b.by }} "
    # CREATE, not MERGE: a second writer of the same marker (a redelivery racing on another consumer) then
    # fails on the uniqueness constraint and rolls back its whole effect instead of applying it twice.
    f"CALL () {{ UNWIND $rows AS row CREATE (:{MARKER_LABEL} {{id: row.id, before: row.before}}) }}"
)
READ_VERSIONS = (
    f"UNWIND $keys AS k OPTIONAL MATCH (v:{VERSION_LABEL} {{key: k}}) "
    "RETURN collect([k, coalesce(v.version, 0)]) AS versions"
)


def row_of(effect: Effect) -> dict[str, Any]:
    """The `$rows` entry of an effect's target, as the queries above read it."""
    target = effect.target
    if isinstance(target, NodeTarget):
        return {"key": target.key, "props": effect.properties}
    assert target is not None
    return {"start": target.start.key, "end": target.end.key, "props": effect.properties}


# -- what an effect query saw ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """A target as its effect query found it: properties (None: absent), degree, whether its ends exist."""

    properties: dict[str, Any] | None
    degree: int = 0
    has_start: bool = True
    has_end: bool = True


def refusal(effect: Effect, seen: Seen) -> InvalidOperationError | None:
    """Why an effect cannot apply to what the read found; such a command fails alone, permanently."""
    target = effect.target
    if isinstance(target, NodeTarget) and effect.kind == "delete" and seen.degree:
        return InvalidOperationError(
            f"delete_node (:{target.label} {dumps(target.key)}) has {seen.degree} relationship(s); "
            "delete its relationships first"
        )
    if isinstance(target, RelTarget) and effect.kind in ("merge", "replace"):
        for present, end in ((seen.has_start, target.start), (seen.has_end, target.end)):
            if not present:
                return InvalidOperationError(
                    f"{target.type} relationship: end node (:{end.label} {dumps(end.key)}) does not exist"
                )
    return None
