"""The Neo4j participant: applies saga steps to the graph in batches, each step with its applied-step marker.

One MERGE per Neo4j transaction runs at ~450 tx/s on this kind of machine, while UNWIND batches reach
~15 000 nodes/s (DESIGN.md), so a whole batch of commands becomes ONE write transaction: the markers are
read in one query, the commands are split into generations in which no key repeats, and each generation
applies its effects with one UNWIND query per (kind, shape) that also returns the before-images it saw
(one round trip instead of a read and a write; within a generation every key is distinct, so the image
a row sees is its own target's state before the generation). Raw Cypher steps run alone, in order,
inside the same transaction. Every step's effect and its `(:PolycommitStep {id, before})` marker commit
together, so "applied" and "recorded as applied" cannot disagree after a crash. If the batch transaction
fails (bad Cypher, a constraint, a deadlock), it is rolled back and the commands run one by one, each in
its own transaction, so only the guilty one fails.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from neo4j import AsyncDriver, AsyncGraphDatabase, AsyncTransaction
from neo4j.exceptions import DriverError, Neo4jError, ServiceUnavailable, SessionExpired

from consumers.base import Marker, Participant, Plan, failed, generations, marker_id, outcome, plan, status_for
from polycommit.config import Settings
from polycommit.errors import (
    InvalidOperationError,
    PolycommitError,
    StoreError,
    StoreUnavailableError,
)
from polycommit.events import NodeRef, Operation, StepOutcome, Store, StoreCommand
from polycommit.operations import IDENTIFIER, dumps, json_object, lock_keys, validate_operation

STORE: Store = "neo4j"
MARKER_LABEL = "PolycommitStep"

# A timeout or a termination ends the transaction, not the request: the same work may succeed later.
_RETRIABLE_CLIENT_CODES = frozenset(
    {
        "Neo.ClientError.Transaction.Terminated",
        "Neo.ClientError.Transaction.LockClientStopped",
        "Neo.ClientError.Transaction.TransactionTimedOut",
        "Neo.ClientError.Transaction.TransactionTimedOutClientConfiguration",
    }
)
# Two consumers creating the same constraint at once: the loser's error means "it exists", i.e. success.
_ALREADY_EXISTS_CODES = frozenset(
    {"Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists", "Neo.ClientError.Schema.ConstraintAlreadyExists"}
)

NodeShape: TypeAlias = tuple[str, tuple[str, ...]]  # (label, sorted key property names)
RelShape: TypeAlias = tuple[str, NodeShape, NodeShape]  # (type, start shape, end shape)
EffectKind = Literal["merge", "replace", "delete", "erase", "cypher", "noop"]


# -- what a command does to the graph ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeTarget:
    label: str
    key: dict[str, Any]

    @functools.cached_property
    def shape(self) -> NodeShape:
        return (self.label, tuple(sorted(self.key)))

    @functools.cached_property
    def lock_key(self) -> str:
        return f"neo4j:{self.label}:{dumps(self.key)}"  # the format of operations.lock_keys


@dataclass(frozen=True)
class RelTarget:
    type: str
    start: NodeTarget
    end: NodeTarget

    @functools.cached_property
    def shape(self) -> RelShape:
        return (self.type, self.start.shape, self.end.shape)


Target: TypeAlias = NodeTarget | RelTarget


@dataclass(frozen=True)
class Effect:
    """One change: merge (SET +=), replace (SET =, creating if absent), delete, erase (a restore to
    "absent": DETACH DELETE for a node), a raw statement, or nothing (a raw step with no compensation)."""

    kind: EffectKind
    target: Target | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    statement: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Parsed:
    """A command that passed validation, with its effects and the keys that order it within a batch."""

    position: int
    command: StoreCommand
    effect: Effect
    compensation: Effect | None
    keys: tuple[str, ...]
    raw: bool  # runs alone, between generations: a raw statement may touch any key

    @functools.cached_property
    def execute_id(self) -> str:
        return marker_id(self.command["tx_id"], self.command["step_index"], "EXECUTE")

    @functools.cached_property
    def compensate_id(self) -> str:
        return marker_id(self.command["tx_id"], self.command["step_index"], "COMPENSATE")

    @functools.cached_property
    def own_id(self) -> str:
        return marker_id(self.command["tx_id"], self.command["step_index"], self.command["action"])

    def targets(self) -> list[Target]:
        return [e.target for e in (self.effect, self.compensation) if e is not None and e.target is not None]


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidOperationError(f"integer {value} does not fit Neo4j's 64 bits")
        return "number"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    raise InvalidOperationError(f"{type(value).__name__} values cannot be stored as Neo4j properties")


def _check_storable(properties: Mapping[str, Any], what: str) -> None:
    """Refuse what Neo4j would refuse at run time: caught here, one bad command costs no batch rollback."""
    for name, value in properties.items():
        if value is None:
            continue  # SET n += {p: null} removes p
        try:
            if isinstance(value, list):
                kinds = {_kind_of(v) if v is not None else "null" for v in value}
                if len(kinds) > 1 or "null" in kinds:
                    raise InvalidOperationError("a list property must hold non-null values of one type")
            else:
                _kind_of(value)
        except InvalidOperationError as exc:
            raise InvalidOperationError(f"{what} {name!r}: {exc}") from None


def _node_target(label: str, key_text: str) -> NodeTarget:
    key = json_object(key_text, "node key")
    if any(v is None for v in key.values()):
        raise InvalidOperationError(f"node key {key_text} of :{label} has a null value; MERGE cannot match it")
    _check_storable(key, "key property")
    return NodeTarget(label, key)


def _end(ref: NodeRef | None) -> NodeTarget:
    if ref is None:  # validate_operation refuses this first; kept for the type checker
        raise InvalidOperationError("a relationship needs both end nodes")
    return _node_target(ref["label"], ref["key"])


def effect_of(op: Operation) -> Effect:
    """The effect of a validated neo4j operation, applied as an EXECUTE."""
    kind = op["kind"]
    if kind == "cypher":
        return Effect("cypher", statement=op["statement"], params=json_object(op["params"], "params"))
    values = json_object(op["values"], "values")
    _check_storable(values, "property")
    if kind in ("merge_node", "delete_node"):
        target = _node_target(op["target"], op["key"])
        changed = sorted(k for k in values if k in target.key and values[k] != target.key[k])
        if changed:
            raise InvalidOperationError(f"merge_node would change its key properties {changed}")
        return Effect("merge" if kind == "merge_node" else "delete", target, values)
    rel = RelTarget(op["target"], _end(op["from_node"]), _end(op["to_node"]))
    return Effect("merge" if kind == "merge_relationship" else "delete", rel, values)


def restoring(target: Target, before_image: str) -> Effect:
    """The effect that puts `target` back as the before-image recorded it (None there: absent)."""
    field_name = "node" if isinstance(target, NodeTarget) else "relationship"
    try:
        image = json.loads(before_image)
        old = image[field_name]
    except (ValueError, TypeError, KeyError):
        raise InvalidOperationError(f"before-image {before_image[:200]!r} has no {field_name!r}") from None
    if old is None:
        return Effect("erase", target)
    if not isinstance(old, dict):
        raise InvalidOperationError(f"before-image {field_name!r} is not a property map")
    return Effect("replace", target, old)


def before_image_of(target: Target, properties: Mapping[str, Any] | None) -> str:
    field_name = "node" if isinstance(target, NodeTarget) else "relationship"
    return dumps({field_name: None if properties is None else dict(properties)})


def parse(position: int, command: StoreCommand, max_payload_bytes: int) -> Parsed:
    """Validate a command and derive its effects; raise a typed error for anything no retry can fix."""
    if command["action"] not in ("EXECUTE", "COMPENSATE"):
        raise InvalidOperationError(f"the neo4j participant runs EXECUTE and COMPENSATE, not {command['action']}")
    op, compensation = command["operation"], command["compensation"]
    for candidate in (op, compensation):
        if candidate is None:
            continue
        if candidate["store"] != STORE:
            raise InvalidOperationError(f"a {candidate['store']} operation was sent to the neo4j participant")
        validate_operation(candidate, max_payload_bytes)
    effect = effect_of(op)
    comp_effect = effect_of(compensation) if compensation is not None else None
    keys = [f"step:{command['tx_id']}/{command['step_index']}", *lock_keys(op)]
    if compensation is not None:
        keys += lock_keys(compensation)
    keys += [t.lock_key for e in (effect, comp_effect) if e is not None for t in _nodes_written(e)]
    raw = op["kind"] == "cypher" or (
        command["action"] == "COMPENSATE" and compensation is not None and compensation["kind"] == "cypher"
    )
    return Parsed(position, command, effect, comp_effect, tuple(dict.fromkeys(keys)), raw)


def _nodes_written(effect: Effect) -> list[NodeTarget]:
    return [effect.target] if isinstance(effect.target, NodeTarget) else []


def _nodes_read(effect: Effect | None) -> list[NodeTarget]:
    if effect is not None and isinstance(effect.target, RelTarget):
        return [effect.target.start, effect.target.end]
    return []


def batch_groups(parsed: Sequence[Parsed]) -> list[list[Parsed]]:
    """Split a batch into groups that may share UNWIND queries, keeping the effect of applying it in order.

    Raw statements run alone. Between them, `generations()` starts a new group when a key repeats; a
    relationship also claims its end nodes when a node command of the same run writes them, so "merge
    A, then merge A->B" never tries the relationship before A exists. End nodes that nobody writes stay
    shared, so many relationships to one hub node still go in one query.
    """
    groups: list[list[Parsed]] = []
    run: list[Parsed] = []

    def flush() -> None:
        written = {t.lock_key for p in run for e in (p.effect, p.compensation) if e for t in _nodes_written(e)}
        keys: dict[int, Sequence[str]] = {}
        for i, p in enumerate(run):
            ends = [n.lock_key for e in (p.effect, p.compensation) for n in _nodes_read(e)]
            keys[i] = [*p.keys, *(k for k in ends if k in written)]
        groups.extend([run[i] for i in g] for g in generations([p.command for p in run], keys))
        run.clear()

    for p in parsed:
        if p.raw:
            flush()
            groups.append([p])
        else:
            run.append(p)
    flush()
    return [g for g in groups if g]


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


_CREATE_MARKER_CONSTRAINT = (
    f"CREATE CONSTRAINT polycommit_step_id IF NOT EXISTS FOR (m:{MARKER_LABEL}) REQUIRE m.id IS UNIQUE"
)
_READ_MARKERS = f"UNWIND $ids AS id MATCH (m:{MARKER_LABEL} {{id: id}}) RETURN collect([m.id, m.before]) AS markers"
# CREATE, not MERGE: a second writer of the same marker (a redelivery racing on another consumer) then
# fails on the uniqueness constraint and rolls back its whole effect instead of applying it twice.
_WRITE_MARKERS = f"UNWIND $rows AS row CREATE (:{MARKER_LABEL} {{id: row.id, before: row.before}})"


# -- errors -----------------------------------------------------------------------------------------


def classify(exc: BaseException) -> BaseException:
    """A driver or server error as polycommit's: unreachable, retriable, or permanent."""
    if isinstance(exc, PolycommitError):
        return exc
    if isinstance(exc, ServiceUnavailable | SessionExpired):  # includes IncompleteCommit: redo is idempotent
        return StoreUnavailableError(f"neo4j unreachable: {exc}")
    if isinstance(exc, Neo4jError):
        retriable = exc.is_retryable() or exc.code in _RETRIABLE_CLIENT_CODES
        return StoreError(f"{exc.code}: {exc.message}", retriable=retriable, store=STORE, code=exc.code)
    if isinstance(exc, DriverError):
        return StoreError(f"{type(exc).__name__}: {exc}", retriable=exc.is_retryable(), store=STORE)
    return exc


# -- one transaction's work -------------------------------------------------------------------------


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


@dataclass
class Unit:
    """One transaction's view of the markers: those read at its start plus those it has written."""

    tx: AsyncTransaction
    markers: dict[str, Marker]
    started_ns: int
    new_markers: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[int, StepOutcome] = field(default_factory=dict)

    def record(self, p: Parsed, status: Literal["APPLIED", "NOOP"], before: str | None) -> None:
        self.markers[p.own_id] = Marker(before)
        self.new_markers.append({"id": p.own_id, "before": before})
        self.outcomes[p.position] = outcome(p.command, STORE, status, before_image=before, started_ns=self.started_ns)

    def fail(self, p: Parsed, exc: BaseException) -> None:
        self.outcomes[p.position] = failed(p.command, STORE, exc, self.started_ns)

    async def apply_group(self, group: Sequence[Parsed]) -> None:
        work: list[tuple[Parsed, Effect]] = []
        for p in group:
            effect = self._planned(p)
            if effect is not None:
                work.append((p, effect))
        seen = await self._apply_structured([e for _, e in work])
        for (p, effect), s in zip(work, seen, strict=True):
            reason = refusal(effect, s)
            if reason is not None:
                self.fail(p, reason)
                continue
            if effect.kind == "cypher":
                result = await self.tx.run(effect.statement, effect.params)
                await result.consume()
            before = before_image_of(effect.target, s.properties) if effect.target is not None else None
            self.record(p, "APPLIED", before)

    def _planned(self, p: Parsed) -> Effect | None:
        """Settle what the markers already decide; return the effect still to apply, if any."""
        decision = plan(p.command, self.markers.get(p.execute_id), self.markers.get(p.compensate_id))
        if decision is Plan.APPLY_EXECUTE:
            return p.effect
        if decision is Plan.APPLY_COMPENSATION:
            try:
                return self._compensation(p)
            except PolycommitError as exc:
                self.fail(p, exc)
                return None
        if decision is Plan.RECORD_NOOP_COMPENSATION:
            self.record(p, "NOOP", None)  # so that a late EXECUTE of this step is skipped
            return None
        own = self.markers.get(p.own_id)
        before = own.before_image if decision is Plan.ALREADY_APPLIED and own is not None else None
        self.outcomes[p.position] = outcome(
            p.command, STORE, status_for(decision), before_image=before, started_ns=self.started_ns
        )
        return None

    def _compensation(self, p: Parsed) -> Effect:
        if p.compensation is not None:
            return p.compensation
        if p.effect.kind == "cypher":
            return Effect("noop")  # a raw step without a declared compensation: recorded, nothing to undo
        assert p.effect.target is not None
        # The EXECUTE marker's image was written atomically with the effect: it wins over the command's.
        execute = self.markers.get(p.execute_id)
        image = execute.before_image if execute is not None and execute.before_image else p.command["before_image"]
        if not image:
            raise InvalidOperationError(f"step {p.own_id} has no before-image to compensate from")
        return restoring(p.effect.target, image)

    async def _apply_structured(self, effects: Sequence[Effect]) -> list[Seen]:
        """Apply the group's structured effects, one UNWIND query per (kind, shape); return what each saw."""
        seen = [Seen(None) for _ in effects]
        by_shape: dict[tuple[EffectKind, NodeShape | RelShape], list[int]] = defaultdict(list)
        for i, effect in enumerate(effects):
            if effect.target is not None:
                by_shape[(effect.kind, effect.target.shape)].append(i)
        for indexes in by_shape.values():
            rows = [{"i": i, **_row(effects[i])} for i in indexes]
            result = await self.tx.run(effect_query(effects[indexes[0]]), rows=rows)
            record = await result.single(strict=True)
            for i, props, *context in record["seen"]:
                seen[i] = Seen(props, *context)
        return seen

    async def flush_markers(self) -> None:
        if self.new_markers:
            result = await self.tx.run(_WRITE_MARKERS, rows=self.new_markers)
            await result.consume()


def _row(effect: Effect) -> dict[str, Any]:
    target = effect.target
    if isinstance(target, NodeTarget):
        return {"key": target.key, "props": effect.properties}
    assert target is not None
    return {"start": target.start.key, "end": target.end.key, "props": effect.properties}


# -- the participant ----------------------------------------------------------------------------------


class Neo4jParticipant(Participant):
    store: Store = "neo4j"

    def __init__(self, settings: Settings, connection_timeout_s: float = 5.0) -> None:
        self.settings = settings
        self.connection_timeout_s = connection_timeout_s
        self._driver: AsyncDriver | None = None
        self._node_keys: set[NodeShape] = set()  # uniqueness constraints known to exist

    @property
    def driver(self) -> AsyncDriver:
        if self._driver is None:
            raise StoreUnavailableError("the Neo4j participant is not started")
        return self._driver

    async def start(self) -> None:
        if self._driver is not None:
            return
        cfg = self.settings.neo4j
        self._driver = AsyncGraphDatabase.driver(
            cfg.uri,
            auth=(cfg.user, cfg.password),
            connection_timeout=self.connection_timeout_s,
            connection_acquisition_timeout=2 * self.connection_timeout_s,
            notifications_min_severity="OFF",  # e.g. "label does not exist yet" on every first read
        )
        try:
            await self.driver.verify_connectivity()
            await self._schema(_CREATE_MARKER_CONSTRAINT)
        except Exception as exc:
            await self.close()
            raise classify(exc) from exc

    async def close(self) -> None:
        if self._driver is not None:
            driver, self._driver = self._driver, None
            await driver.close()

    async def health(self) -> dict[str, Any]:
        address = self.settings.neo4j.address
        try:
            async with self.driver.session() as session:
                result = await session.run("CALL dbms.components() YIELD versions RETURN versions[0] AS version")
                record = await result.single()
        except Exception as exc:
            return {"healthy": False, "version": "", "address": address, "error": str(classify(exc))}
        return {"healthy": True, "version": str(record["version"]) if record else "", "address": address}

    # -- schema -------------------------------------------------------------------------------------

    async def _schema(self, statement: str) -> None:
        """Schema commands cannot share a transaction with writes: each runs in its own auto-commit one."""
        async with self.driver.session() as session:
            try:
                result = await session.run(statement)
                await result.consume()
            except Neo4jError as exc:
                if exc.code not in _ALREADY_EXISTS_CODES:
                    raise

    async def ensure_node_key(self, label: str, key_props: Iterable[str]) -> None:
        """Create the uniqueness constraint MERGE needs on (label, key properties), once per process."""
        shape: NodeShape = (label, tuple(sorted(key_props)))
        if shape in self._node_keys:
            return
        await self._schema(constraint_statement(shape))
        self._node_keys.add(shape)

    async def _ensure_keys(self, parsed: Iterable[Parsed]) -> dict[NodeShape, BaseException]:
        """Ensure every node shape of the batch; return the shapes whose constraint could not be made."""
        broken: dict[NodeShape, BaseException] = {}
        shapes = {n.shape for p in parsed for t in p.targets() for n in _nodes_of(t)}
        for shape in sorted(shapes - self._node_keys):
            try:
                await self.ensure_node_key(*shape)
            except Exception as exc:
                error = classify(exc)
                if isinstance(error, StoreUnavailableError):
                    raise error from exc
                broken[shape] = error
        return broken

    # -- batches ------------------------------------------------------------------------------------

    async def apply_batch(self, commands: Sequence[StoreCommand]) -> list[StepOutcome]:
        started = time.perf_counter_ns()
        outcomes: dict[int, StepOutcome] = {}
        parsed: list[Parsed] = []
        for position, command in enumerate(commands):
            try:
                parsed.append(parse(position, command, self.settings.max_payload_bytes))
            except Exception as exc:  # one bad command fails alone; the batch goes on
                outcomes[position] = failed(command, STORE, exc, started)
        broken = await self._ensure_keys(parsed)
        runnable: list[Parsed] = []
        for p in parsed:
            shape = next((n.shape for t in p.targets() for n in _nodes_of(t) if n.shape in broken), None)
            if shape is None:
                runnable.append(p)
            else:
                outcomes[p.position] = failed(p.command, STORE, broken[shape], started)
        if runnable:
            outcomes.update(await self._apply(runnable, started))
        return [outcomes[i] for i in range(len(commands))]

    async def _apply(self, parsed: Sequence[Parsed], started_ns: int) -> dict[int, StepOutcome]:
        try:
            return await self._transaction(parsed, started_ns)
        except Exception as exc:
            error = classify(exc)
            if isinstance(error, StoreUnavailableError):
                raise error from exc
            if len(parsed) == 1:
                return {parsed[0].position: failed(parsed[0].command, STORE, error, started_ns)}
        # The batch transaction is rolled back; one by one, only the guilty command fails.
        results: dict[int, StepOutcome] = {}
        for p in parsed:
            try:
                results.update(await self._transaction([p], started_ns))
            except Exception as exc:
                error = classify(exc)
                if isinstance(error, StoreUnavailableError):
                    raise error from exc
                results[p.position] = failed(p.command, STORE, error, started_ns)
        return results

    async def _transaction(self, parsed: Sequence[Parsed], started_ns: int) -> dict[int, StepOutcome]:
        """Apply commands in one Neo4j write transaction: all their effects and markers, or none."""
        async with self.driver.session() as session:
            tx = await session.begin_transaction()
            try:
                unit = Unit(tx, await _read_markers(tx, parsed), started_ns)
                for group in batch_groups(parsed):
                    await unit.apply_group(group)
                await unit.flush_markers()
                await tx.commit()
            finally:
                if not tx.closed():
                    with contextlib.suppress(Neo4jError, DriverError):  # keep the error that got us here
                        await tx.close()  # rolls back
        return unit.outcomes

    # -- reads for tests and the consistency checker ------------------------------------------------

    async def read_node(self, label: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        target = NodeTarget(label, dict(key))
        records = await self._read_query(read_query(target), {"key": target.key})
        return records[0]["props"] if records else None

    async def read_relationship(self, rel_type: str, from_node: NodeRef, to_node: NodeRef) -> dict[str, Any] | None:
        target = RelTarget(rel_type, _end(from_node), _end(to_node))
        records = await self._read_query(read_query(target), _row(Effect("noop", target)))
        return records[0]["props"] if records else None

    async def _read_query(self, query: str, row: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            async with self.driver.session(default_access_mode="READ") as session:
                result = await session.run(query, rows=[row])
                return await result.data()
        except (Neo4jError, DriverError) as exc:
            raise classify(exc) from exc


def _nodes_of(target: Target) -> list[NodeTarget]:
    return [target] if isinstance(target, NodeTarget) else [target.start, target.end]


async def _read_markers(tx: AsyncTransaction, parsed: Sequence[Parsed]) -> dict[str, Marker]:
    ids = sorted({i for p in parsed for i in (p.execute_id, p.compensate_id)})
    record = await (await tx.run(_READ_MARKERS, ids=ids)).single(strict=True)
    return {step_id: Marker(before) for step_id, before in record["markers"]}
