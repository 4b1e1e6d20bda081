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

What a command does to the graph and how a batch is grouped live in `consumers/neo4j_effects.py`; the
Cypher text in `consumers/neo4j_cypher.py`. This module does the I/O: the driver, schema, transactions.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from neo4j import AsyncDriver, AsyncGraphDatabase, AsyncTransaction
from neo4j.exceptions import DriverError, Neo4jError, ServiceUnavailable, SessionExpired

from consumers.base import Marker, Participant, Plan, failed, outcome, plan, status_for
from consumers.neo4j_cypher import (
    CREATE_MARKER_CONSTRAINT,
    MARKER_LABEL,
    READ_MARKERS,
    WRITE_MARKERS,
    Seen,
    constraint_statement,
    effect_query,
    read_query,
    refusal,
    row_of,
)
from consumers.neo4j_effects import (
    STORE,
    Effect,
    EffectKind,
    NodeShape,
    NodeTarget,
    Parsed,
    RelShape,
    RelTarget,
    batch_groups,
    before_image_of,
    end_target,
    nodes_of,
    parse,
    restoring,
)
from polycommit.config import Settings
from polycommit.errors import (
    InvalidOperationError,
    PolycommitError,
    StoreError,
    StoreUnavailableError,
)
from polycommit.events import NodeRef, StepOutcome, Store, StoreCommand

# Imported from here by the runtime, the consistency checker (markers by label) and the tests.
__all__ = ["MARKER_LABEL", "Neo4jParticipant", "classify"]

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
            rows = [{"i": i, **row_of(effects[i])} for i in indexes]
            result = await self.tx.run(effect_query(effects[indexes[0]]), rows=rows)
            record = await result.single(strict=True)
            for i, props, *context in record["seen"]:
                seen[i] = Seen(props, *context)
        return seen

    async def flush_markers(self) -> None:
        if self.new_markers:
            result = await self.tx.run(WRITE_MARKERS, rows=self.new_markers)
            await result.consume()


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
            await self._schema(CREATE_MARKER_CONSTRAINT)
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
        shapes = {n.shape for p in parsed for t in p.targets() for n in nodes_of(t)}
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
            shape = next((n.shape for t in p.targets() for n in nodes_of(t) if n.shape in broken), None)
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
        target = RelTarget(rel_type, end_target(from_node), end_target(to_node))
        records = await self._read_query(read_query(target), row_of(Effect("noop", target)))
        return records[0]["props"] if records else None

    async def _read_query(self, query: str, row: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            async with self.driver.session(default_access_mode="READ") as session:
                result = await session.run(query, rows=[row])
                return await result.data()
        except (Neo4jError, DriverError) as exc:
            raise classify(exc) from exc


async def _read_markers(tx: AsyncTransaction, parsed: Sequence[Parsed]) -> dict[str, Marker]:
    ids = sorted({i for p in parsed for i in (p.execute_id, p.compensate_id)})
    record = await (await tx.run(READ_MARKERS, ids=ids)).single(strict=True)
    return {step_id: Marker(before) for step_id, before in record["markers"]}
