"""The PostgreSQL participant: applies saga steps with their markers, one local transaction per batch.

Every step's effect and its applied-step marker (`polycommit_steps`) commit in the same PostgreSQL
transaction, so "applied" and "recorded as applied" cannot disagree after a crash. A batch runs in one
transaction; if any statement in it fails, the batch is rolled back and its commands are run one by one,
each in its own transaction, so a bad command fails alone and the others still apply. A raw SQL step
runs alone, in a savepoint, by the extended protocol (one statement, its parameters checked against the
prepared statement), after the markers of every step before it are written: its failure undoes only
itself, and should it end the transaction anyway (a COMMIT that got past parsing), no effect is ever
separated from its marker.

What a command may do is decided by the shared planner (consumers/planner.py); before-images and
compensations by `consumers.postgres.effects`; the SQL text is in `consumers.postgres.sql`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from consumers import timing
from consumers.base import Marker, Participant, Plan, Timing, failed, marker_id, outcome, status_for
from consumers.command import TypedCommand
from consumers.planner import Planned, batch_groups, plan_batch
from consumers.postgres import effects, phase2, twophase
from consumers.postgres import sql as q
from consumers.postgres.batches import BatchRegistry
from consumers.postgres.failures import UNREACHABLE, classify, unreachable
from consumers.postgres.sessions import SessionResets
from polycommit.config import Settings
from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError, VersionConflict
from polycommit.events import StepOutcome, Store
from polycommit.parsed import ParsedOperation, RawOperation, RowOperation


class _TransactionEnded(Exception):
    """A raw step ended the batch's transaction (a COMMIT or ROLLBACK that got past parsing)."""

    def __init__(self, error: InvalidOperationError) -> None:
        super().__init__(str(error))
        self.error = error
        self.index = 0
        self.at = Timing(0, 0)


@dataclass
class _Batch:
    """One transaction's work: the plan, and what running it produced, by batch position."""

    planned: list[Planned]
    before: dict[int, str | None] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)

    ran: list[Planned] = field(default_factory=list)  # run, and their markers not yet written

    def take_markers(self) -> list[tuple[str, int, str, str | None]]:
        """The markers of the steps run since the last call (each is written once)."""
        ran, self.ran = self.ran, []
        # Only an EXECUTE's before-image is ever needed again: compensations restore from it.
        return [
            (c.tx_id, c.step_index, c.action, self.before.get(p.position) if p.is_execute else None)
            for p, c in ((p, p.command) for p in ran)
            if p.position not in self.errors
        ]

    def outcome(self, p: Planned, store: Store, timing: Timing) -> StepOutcome:
        if p.position in self.errors:
            return failed(p.command.source, store, self.errors[p.position], timing)
        if p.decision is Plan.ALREADY_APPLIED and p.earlier in self.errors:
            return failed(p.command.source, store, self.errors[p.earlier], timing)  # its twin here failed
        before: str | None = None
        if p.decision is Plan.APPLY_EXECUTE:
            before = self.before.get(p.position)
        elif p.decision is Plan.ALREADY_APPLIED and p.is_execute:
            before = p.own.before_image if p.own is not None else self.before.get(p.earlier or 0)
        return outcome(p.command.source, store, status_for(p.decision), timing, before_image=before)


class PostgresParticipant(Participant):
    store: Store = "postgres"

    def __init__(self, settings: Settings, pool_size: int = 16) -> None:
        self.settings = settings
        self.pool_size = pool_size  # saga batches use one connection; prepares of a batch run side by side
        self._pool: asyncpg.Pool | None = None
        self.settled: list[dict[str, str]] = []  # prepared gids settled at the last start
        self.gid_space = twophase.space_of(settings.topic_prefix)
        self.slots = twophase.Slots()
        self.batches = BatchRegistry()  # prepared batches not yet settled, and the phase 2 they hold
        self._released: list[StepOutcome] = []
        self.sessions = SessionResets()  # a released connection is reset only if a raw step ran on it

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailableError("the PostgreSQL participant is not started")
        return self._pool

    async def start(self) -> None:
        """Connect, create the tables, settle prepared transactions. The server failing at any point (refusing,
        starting up, dying under a query) is StoreUnavailableError with no pool left: the worker waits and
        starts again. Any other error (a permission refused) ends the consumer."""
        try:
            self._pool = await asyncpg.create_pool(
                self.settings.postgres.dsn,
                min_size=1,
                max_size=self.pool_size,
                command_timeout=60,
                reset=self.sessions.reset,
            )
            await self._prepare()
        except Exception as exc:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.terminate()  # at once: its connections may be to a server that is gone
            if not unreachable(exc):
                raise
            raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc

    async def _prepare(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(q.CREATE_MARKERS)
            await conn.execute(q.CREATE_VERSIONS)
            await conn.execute(twophase.CREATE_MEMBERS)
            if await conn.fetchval("SELECT to_regclass($1)", twophase.MEMBERS_INDEX) is None:
                await conn.execute(twophase.CREATE_MEMBERS_INDEX)
        from consumers.postgres.settlement import settle_at_start  # reads the decisions topic

        self.settled = await settle_at_start(self.settings, self.pool)
        async with self.pool.acquire() as conn:
            limit = int(await conn.fetchval("SHOW max_prepared_transactions"))
        # The server's prepared slots but a few (others may share the server); ours still held count.
        self.slots = twophase.Slots(limit=max(1, limit - 10), used=len(await self.in_doubt()))

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def health(self) -> dict[str, Any]:
        try:
            async with self.pool.acquire() as conn:
                version = await conn.fetchval("SHOW server_version")
            return {"healthy": True, "version": str(version), "address": self.settings.postgres.address}
        except Exception as exc:
            return {"healthy": False, "version": "", "address": self.settings.postgres.address, "error": str(exc)}

    # -- the batch ----------------------------------------------------------------------------------

    async def apply_commands(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        if not commands:
            return []
        begun = timing.started()
        outcomes: dict[int, StepOutcome] = {}
        remaining = list(enumerate(commands))
        try:
            async with self.pool.acquire() as conn:
                while remaining:
                    try:
                        outcomes.update(await self._apply_batch(conn, remaining, begun))
                        remaining = []
                    except _TransactionEnded as ended:
                        # What ran before the guilty step committed (or rolled back) WITH its markers, so
                        # the others are simply planned again: done ones are ALREADY_APPLIED now.
                        position = remaining[ended.index][0]
                        outcomes[position] = failed(commands[position].source, self.store, ended.error, ended.at)
                        remaining = [r for r in remaining if r[0] != position]
        except UNREACHABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc
        return [outcomes[i] for i in range(len(commands))]

    async def _apply_batch(
        self, conn: asyncpg.Connection, batch: list[tuple[int, TypedCommand]], begun: int
    ) -> dict[int, StepOutcome]:
        commands = [c for _, c in batch]
        try:
            async with conn.transaction(isolation=effects.batch_isolation(c.source["isolation"] for c in commands)):
                results = await self._apply(conn, commands, begun)
        except asyncpg.PostgresError as exc:
            if len(commands) == 1:
                results = [failed(commands[0].source, self.store, classify(exc), timing.since(begun))]
            else:
                # One statement failed and took the batch's transaction with it: find the guilty
                # command by running each alone.
                results = []
                for index, command in enumerate(commands):
                    try:
                        results.extend(await self._apply_alone(conn, command, begun))
                    except _TransactionEnded as ended:
                        ended.index = index
                        raise
        return {position: result for (position, _), result in zip(batch, results, strict=True)}

    async def _apply_alone(self, conn: asyncpg.Connection, command: TypedCommand, begun: int) -> list[StepOutcome]:
        try:
            async with conn.transaction(isolation=effects.batch_isolation([command.source["isolation"]])):
                return await self._apply(conn, [command], begun)
        except asyncpg.PostgresError as exc:
            return [failed(command.source, self.store, classify(exc), timing.since(begun))]

    async def _apply(self, conn: asyncpg.Connection, commands: Sequence[TypedCommand], begun: int) -> list[StepOutcome]:
        batch = _Batch(plan_batch(commands, await self._read_markers(conn, commands)))
        for group in batch_groups(batch.planned, effects.writes, alone=lambda p: not effects.set_based(p)):
            if effects.set_based(group[0]):
                members = [(p.position, op) for p in group if isinstance(op := p.command.operation, RowOperation)]
                images, conflicts = await self._run_rows(conn, members)
                batch.before.update(images)
                batch.errors.update(conflicts)
            else:
                await self._run_one(conn, batch, group[0], begun)
            batch.ran.extend(group)
        await self._write_markers(conn, batch)
        done = timing.since(begun)
        return [batch.outcome(p, self.store, done) for p in batch.planned]

    async def _write_markers(self, conn: asyncpg.Connection, batch: _Batch) -> None:
        new_markers = batch.take_markers()
        if new_markers:
            await conn.execute(q.WRITE_MARKERS, *list(zip(*new_markers, strict=True)))

    async def _run_one(self, conn: asyncpg.Connection, batch: _Batch, p: Planned, begun: int) -> None:
        operation = p.command.operation
        step: ParsedOperation
        if p.decision is Plan.APPLY_COMPENSATION and p.earlier in batch.errors:
            return  # its EXECUTE, earlier in this batch, failed (e.g. a version conflict): nothing to undo
        if p.decision is Plan.APPLY_EXECUTE:
            step = operation
        elif p.decision is Plan.APPLY_COMPENSATION and p.command.compensation is not None:
            step = p.command.compensation
        elif p.decision is Plan.APPLY_COMPENSATION and isinstance(operation, RowOperation):
            # The EXECUTE's before-image: from its marker, or from this batch if it ran earlier in it.
            before = p.execute.before_image if p.execute is not None else batch.before.get(p.earlier or 0)
            step = effects.restoring(operation, before)
        else:
            return  # a raw step without a declared compensation: nothing to undo, by the caller's choice
        if isinstance(step, RawOperation):
            # Everything before a raw step is recorded first: should it still end the transaction, the
            # effects that committed (or rolled back) did so together with their markers.
            await self._write_markers(conn, batch)
            try:
                await self._run_raw(conn, step)
            except _TransactionEnded as ended:
                ended.index, ended.at = p.position, timing.since(begun)
                raise
            except (InvalidOperationError, StoreError) as exc:
                batch.errors[p.position] = exc
            return
        if not isinstance(step, RowOperation):
            batch.errors[p.position] = InvalidOperationError(f"postgres cannot run {type(step).__name__}")
            return
        images, conflicts = await self._run_rows(conn, [(p.position, step)])
        batch.errors.update(conflicts)
        if p.decision is Plan.APPLY_EXECUTE and p.position in images:
            batch.before[p.position] = images[p.position]

    async def _run_raw(self, conn: asyncpg.Connection, op: RawOperation) -> None:
        """One raw statement in a savepoint, so that its failure undoes it alone, by the extended protocol
        (one statement, typed parameters); a wrong parameter list is the step's fault, never the store's."""
        self.sessions.ran_raw_sql(conn)
        await conn.execute(q.SAVEPOINT)
        try:
            statement = await conn.prepare(op.statement)
            expected = len(statement.get_parameters())
            if expected != len(op.params):
                raise InvalidOperationError(f"sql statement takes {expected} parameter(s); {len(op.params)} given")
            try:
                await statement.executemany([op.params])  # extended protocol; the rows are not wanted
            except asyncpg.DataError as exc:
                if not isinstance(exc.__cause__, TypeError | ValueError):
                    raise  # the server's: a data exception of the statement itself
                # asyncpg could not encode a parameter for its column type: nothing was sent.
                raise InvalidOperationError(f"sql parameters do not fit the statement: {exc}") from None
        except asyncpg.PostgresError as exc:
            await self._undo_raw(conn)
            raise classify(exc) from exc
        except InvalidOperationError:
            await self._undo_raw(conn)
            raise
        if not conn.is_in_transaction():
            raise _TransactionEnded(InvalidOperationError("a raw SQL step ended the consumer's batch transaction"))
        await conn.execute(q.RELEASE_SAVEPOINT)

    async def _undo_raw(self, conn: asyncpg.Connection) -> None:
        if not conn.is_in_transaction():
            raise _TransactionEnded(InvalidOperationError("a raw SQL step ended the consumer's batch transaction"))
        await conn.execute(q.ROLLBACK_TO_SAVEPOINT)

    async def _run_rows(
        self, conn: asyncpg.Connection, members: list[tuple[int, RowOperation]]
    ) -> tuple[dict[int, str], dict[int, VersionConflict]]:
        """Row operations on distinct keys: a few statements per shape, whatever their number; returns
        each one's before-image by position, and the members refused by their expected version (not run).

        Versions first, then rows, always in that order (no two batches wait on each other crosswise): the
        version rows are locked and checked, bumped for the members that go ahead, then the rows written,
        all in the caller's transaction, so check, write and bump are one atomic change."""
        conflicts = await self._check_versions(conn, members)
        members = [m for m in members if m[0] not in conflicts]
        if members:
            await conn.execute(q.BUMP_VERSIONS, [effects.resource(op) for _, op in members])
        shapes: dict[effects.Shape, list[tuple[int, RowOperation]]] = {}
        for position, op in members:
            shapes.setdefault(effects.shape(op), []).append((position, op))
        images: dict[int, str] = {}
        for (kind, table, keys, columns), group in shapes.items():
            docs = [effects.key_doc(op) for _, op in group]
            rows = dict(await conn.fetch(q.lock_rows(table, keys), docs))  # ordinal (from 1) -> row JSON
            for ordinal, (position, _) in enumerate(group, 1):
                images[position] = effects.row_image(rows.get(ordinal))
            if kind == "delete_row":
                await conn.execute(q.delete_rows(table, keys), docs)
                continue
            full = [effects.row_doc(op) for _, op in group]
            existing = [doc for ordinal, doc in enumerate(full, 1) if ordinal in rows]
            missing = [doc for ordinal, doc in enumerate(full, 1) if ordinal not in rows]
            if existing and columns:
                await conn.execute(q.update_rows(table, keys, columns), existing)
            if missing:
                await conn.execute(q.insert_rows(table, keys, keys + columns), missing)
        return images, conflicts

    async def _check_versions(
        self, conn: asyncpg.Connection, members: list[tuple[int, RowOperation]]
    ) -> dict[int, VersionConflict]:
        """Lock the version rows of a group that expects versions; the members whose expectation fails."""
        if not effects.checks_versions([op for _, op in members]):
            return {}
        names = [effects.resource(op) for _, op in members]
        await conn.execute(q.ENSURE_VERSIONS, names)
        versions = {r[0]: int(r[1]) for r in await conn.fetch(q.LOCK_VERSIONS, names)}
        return effects.version_conflicts(members, versions)

    async def _read_markers(self, conn: asyncpg.Connection, commands: Sequence[TypedCommand]) -> dict[str, Marker]:
        rows = await conn.fetch(q.READ_MARKERS, [c.tx_id for c in commands], [c.step_index for c in commands])
        return {marker_id(r[0], r[1], r[2]): Marker(r[3]) for r in rows}

    # -- two-phase commit (consumers.postgres.twophase) ----------------------------------------------

    async def vote(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        try:
            return await twophase.prepare(self, commands)
        except UNREACHABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc

    async def finish(self, commands: Sequence[TypedCommand]) -> list[StepOutcome | None]:
        saga = [i for i, c in enumerate(commands) if c.action in ("EXECUTE", "COMPENSATE")]
        results: dict[int, StepOutcome | None] = dict(
            zip(saga, await self.apply_commands([commands[i] for i in saga]), strict=True)
        )
        ends = [i for i in range(len(commands)) if i not in results]
        try:
            decided, released = await phase2.finish(self, [commands[i] for i in ends])
        except UNREACHABLE as exc:
            raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreUnavailableError(f"PostgreSQL phase 2: {classify(exc)}") from exc  # retried as a batch
        self._released.extend(released)
        results.update(zip(ends, decided, strict=True))
        return [results[i] for i in range(len(commands))]

    def released(self) -> list[StepOutcome]:
        released, self._released = self._released, []
        return released

    def classify(self, exc: Exception) -> StoreError:
        return classify(exc)

    async def execute_in(
        self, conn: asyncpg.Connection, commands: Sequence[TypedCommand], begun: int
    ) -> list[StepOutcome]:
        """The saga's EXECUTE of PREPAREs' steps, in the caller's open transaction."""
        executes = [TypedCommand({**c.source, "action": "EXECUTE"}, c.operation, None) for c in commands]
        return await self._apply(conn, executes, begun)

    async def in_doubt(self) -> list[str]:
        async with self.pool.acquire() as conn:
            return [r[0] for r in await conn.fetch(twophase.PREPARED_GIDS, f"{twophase.GID_PREFIX}{self.gid_space}_")]

    # -- reads for tests, the demo and the consistency checker --------------------------------------

    async def read_row(self, table: str, key: dict[str, Any]) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(q.read_row(table, tuple(key)), [json.dumps(key)])
        return json.loads(value) if value is not None else None

    async def read_version(self, table: str, key: dict[str, Any]) -> int:
        """The row's version (0: never written by polycommit)."""
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(q.READ_VERSION, effects.resource(RowOperation("upsert_row", table, key, {})))
        return int(value or 0)

    async def markers_of(self, tx_id: str) -> dict[str, str | None]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(q.MARKERS_OF, tx_id)
        return {f"{r[0]}/{r[1]}": r[2] for r in rows}
