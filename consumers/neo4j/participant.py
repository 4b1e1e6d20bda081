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

What each command may do is decided by the shared planner (consumers/planner.py); what it does to the
graph lives in `consumers/neo4j/effects.py`, the Cypher text in `consumers/neo4j/cypher.py`, one
transaction's work in `consumers/neo4j/unit.py`. This module does the I/O: the driver, schema, transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from neo4j import AsyncDriver, AsyncGraphDatabase, AsyncSession, AsyncTransaction
from neo4j.exceptions import DriverError, Neo4jError

from consumers import timing
from consumers.base import Marker, Participant, failed
from consumers.command import TypedCommand
from consumers.neo4j.cypher import (
    CREATE_MARKER_CONSTRAINT,
    CREATE_VERSION_CONSTRAINT,
    MARKER_LABEL,
    READ_MARKERS,
    READ_MARKERS_LOCK_VERSIONS,
    READ_VERSIONS,
    Seen,
    constraint_statement,
    read_query,
    row_of,
)
from consumers.neo4j.effects import (
    STORE,
    Effect,
    Effects,
    NodeShape,
    NodeTarget,
    RelTarget,
    effects_of,
    end_target,
    nodes_of,
)
from consumers.neo4j.first_group import FirstGroup, first_group
from consumers.neo4j.unit import Unit, keys_to_lock, planned_groups, read_seen
from polycommit.config import Settings
from polycommit.errors import PolycommitError, StoreUnavailableError
from polycommit.events import NodeRef, StepOutcome, Store
from polycommit.neo4j_errors import classify

# Imported from here by the runtime, the consistency checker (markers by label) and the tests.
__all__ = ["MARKER_LABEL", "Neo4jParticipant", "classify"]

# The longest a batch, a vote or a read may take before its connection counts as stale. The server's
# `connection.recv_timeout_seconds` hint (120 s) did this per socket read, at the cost of a task and a
# timer per read in the driver (~40 per batch, ~0.5 ms of CPU); one deadline per call replaces it.
CALL_DEADLINE_S = 120.0
# Two consumers creating the same constraint at once: the loser's error means "it exists", i.e. success.
_ALREADY_EXISTS_CODES = frozenset(
    {"Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists", "Neo.ClientError.Schema.ConstraintAlreadyExists"}
)


# -- the participant ----------------------------------------------------------------------------------


class Neo4jParticipant(Participant):
    store: Store = "neo4j"

    def __init__(
        self, settings: Settings, connection_timeout_s: float = 5.0, call_deadline_s: float = CALL_DEADLINE_S
    ) -> None:
        self.settings = settings
        self.connection_timeout_s = connection_timeout_s
        self.call_deadline_s = call_deadline_s
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
            await self._schema(CREATE_VERSION_CONSTRAINT)
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

    async def _ensure_keys(self, effects: Mapping[int, Effects]) -> dict[NodeShape, BaseException]:
        """Ensure every node shape of the batch; return the shapes whose constraint could not be made."""
        broken: dict[NodeShape, BaseException] = {}
        shapes = {n.shape for e in effects.values() for t in e.targets() for n in nodes_of(t)}
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

    async def apply_commands(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        begun = timing.started()
        outcomes: dict[int, StepOutcome] = {}
        effects: dict[int, Effects] = {}
        for position, command in enumerate(commands):
            try:
                effects[position] = effects_of(command)
            except PolycommitError as exc:  # one bad command fails alone; the batch goes on
                outcomes[position] = failed(command.source, STORE, exc, timing.since(begun))
        broken = await self._ensure_keys(effects)
        runnable: list[int] = []
        for position, e in effects.items():
            shape = next((n.shape for t in e.targets() for n in nodes_of(t) if n.shape in broken), None)
            if shape is None:
                runnable.append(position)
            else:
                outcomes[position] = failed(commands[position].source, STORE, broken[shape], timing.since(begun))
        if runnable:
            work = [(i, commands[i], effects[i]) for i in runnable]
            outcomes.update(await self._apply(work, begun))
        return [outcomes[i] for i in range(len(commands))]

    async def _apply(self, work: Sequence[tuple[int, TypedCommand, Effects]], begun: int) -> dict[int, StepOutcome]:
        try:
            return await self._transaction(work, begun)
        except Exception as exc:
            error = classify(exc)
            if isinstance(error, StoreUnavailableError):
                raise error from exc
            if len(work) == 1:
                return {work[0][0]: failed(work[0][1].source, STORE, error, timing.since(begun))}
        # The batch transaction is rolled back; one by one, only the guilty command fails.
        results: dict[int, StepOutcome] = {}
        for item in work:
            try:
                results.update(await self._transaction([item], begun))
            except Exception as exc:
                error = classify(exc)
                if isinstance(error, StoreUnavailableError):
                    raise error from exc
                results[item[0]] = failed(item[1].source, STORE, error, timing.since(begun))
        return results

    async def _transaction(
        self, work: Sequence[tuple[int, TypedCommand, Effects]], begun: int
    ) -> dict[int, StepOutcome]:
        """Apply commands in one Neo4j write transaction: all their effects and markers, or none."""
        commands = [c for _, c, _ in work]
        async with asyncio.timeout(self.call_deadline_s), self.driver.session() as session:
            with _pipelined_begin(session):
                tx = await session.begin_transaction()
            _without_read_timeout(tx)
            try:
                effects = {i: e for i, (_, _, e) in enumerate(work)}
                first = first_group(commands, effects)
                markers, versions, seen = await _first_query(tx, commands, keys_to_lock(effects.values()), first)
                applied = first if first is not None and not markers else None  # planned as it assumed
                if applied is not None:
                    planned, groups = applied.planned, applied.groups
                else:
                    planned, groups = planned_groups(commands, effects, markers)
                unit = Unit(tx, planned, effects, versions)
                if applied is not None:  # its one group ran in the first query
                    await unit.absorb([(p, effects[p.position].effect) for p in groups[0]], seen)
                    groups = groups[1:]
                for group in groups:
                    await unit.apply_group(group)
                await unit.finish()
                await tx.commit()
            finally:
                if not tx.closed():
                    with contextlib.suppress(Neo4jError, DriverError):  # keep the error that got us here
                        await tx.close()  # rolls back
        done = timing.since(begun)
        return {work[i][0]: result for i, result in unit.outcomes(done).items()}

    async def vote(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        from consumers.neo4j.vote import vote

        try:
            async with asyncio.timeout(self.call_deadline_s):
                return await vote(self.driver, commands, _read_markers, self._ensure_keys, classify)
        except TimeoutError as exc:
            raise classify(exc) from exc

    # -- reads for tests and the consistency checker ------------------------------------------------

    async def read_node(self, label: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        target = NodeTarget(label, dict(key))
        records = await self._read_query(read_query(target), {"key": target.key})
        return records[0]["props"] if records else None

    async def read_relationship(self, rel_type: str, from_node: NodeRef, to_node: NodeRef) -> dict[str, Any] | None:
        target = RelTarget(rel_type, end_target(from_node), end_target(to_node))
        records = await self._read_query(read_query(target), row_of(Effect("noop", target)))
        return records[0]["props"] if records else None

    async def read_version(self, resource: str) -> int:
        """The version of a node or relationship, by its lock key (0: never written by polycommit)."""
        try:
            async with (
                asyncio.timeout(self.call_deadline_s),
                self.driver.session(default_access_mode="READ") as session,
            ):
                record = await (await session.run(READ_VERSIONS, keys=[resource])).single(strict=True)
        except (Neo4jError, DriverError, TimeoutError) as exc:
            raise classify(exc) from exc
        return int(record["versions"][0][1])

    async def _read_query(self, query: str, row: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            async with (
                asyncio.timeout(self.call_deadline_s),
                self.driver.session(default_access_mode="READ") as session,
            ):
                result = await session.run(query, rows=[row])
                return await result.data()
        except (Neo4jError, DriverError, TimeoutError) as exc:
            raise classify(exc) from exc


def _without_read_timeout(tx: AsyncTransaction) -> None:
    """Drop the per-read timeout the driver set from the server's hint on this pooled connection; every
    call here runs under CALL_DEADLINE_S instead. A driver without these internals keeps its timeout."""
    socket = getattr(getattr(tx, "_connection", None), "socket", None)
    drop = getattr(socket, "set_read_timeout", None)
    if callable(drop):
        drop(None)


def _pipelined_begin(session: Any) -> contextlib.AbstractContextManager[Any]:
    """BEGIN sent with the transaction's first query instead of awaited alone: one round trip less per
    batch (a BEGIN refused then fails that query, which rolls the batch back like any other error). The
    driver does this for its own `execute_query` through this session flag; without it, a plain BEGIN."""
    flag = getattr(session, "_pipelined_begin", None)
    return flag if isinstance(flag, contextlib.AbstractContextManager) else contextlib.nullcontext()


async def _first_query(
    tx: AsyncTransaction, commands: Sequence[TypedCommand], keys: list[str], first: FirstGroup | None
) -> tuple[dict[str, Marker], dict[str, int], list[Seen]]:
    """The batch's markers, the versions of `keys` locked to the end of the transaction and, with
    `first` and no marker, what its effect query saw (it ran in the same query)."""
    ids = _marker_ids(commands)
    if first is None:
        result = await tx.run(READ_MARKERS_LOCK_VERSIONS, ids=ids, keys=keys)
    else:
        result = await tx.run(first.query, ids=ids, keys=keys, rows=first.rows)
    record = await result.single(strict=True)
    markers = {step_id: Marker(before) for step_id, before in record["markers"]}
    seen = [Seen(None) for _ in commands]
    if first is not None:
        read_seen(record["seen"], seen)
    return markers, {key: int(version) for key, version in record["versions"]}, seen


async def _read_markers(tx: AsyncTransaction | AsyncSession, commands: Sequence[TypedCommand]) -> dict[str, Marker]:
    """The commands' markers, in `tx` or as one auto-commit query of a session (the vote's common case)."""
    record = await (await tx.run(READ_MARKERS, ids=_marker_ids(commands))).single(strict=True)
    return {step_id: Marker(before) for step_id, before in record["markers"]}


def _marker_ids(commands: Sequence[TypedCommand]) -> list[str]:
    """The markers a batch's commands may have: each step's EXECUTE and COMPENSATE."""
    return sorted({i for c in commands for i in (c.execute_id, c.compensate_id)})
