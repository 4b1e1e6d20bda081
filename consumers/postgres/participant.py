"""The PostgreSQL participant: applies saga steps with their markers, one local transaction per batch.

Every step's effect and its applied-step marker (`polycommit_steps`) commit in the same PostgreSQL
transaction, so "applied" and "recorded as applied" cannot disagree after a crash. A batch runs in one
transaction; if any statement in it fails, the batch is rolled back and its commands are run one by one,
each in its own transaction, so a bad command fails alone and the others still apply.

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
from consumers.postgres import effects
from consumers.postgres import sql as q
from polycommit.config import Settings
from polycommit.errors import StoreError, StoreUnavailableError
from polycommit.events import StepOutcome, Store
from polycommit.parsed import RawOperation, RowOperation

# SQLSTATE classes after which the same statement may succeed later: transaction rollback (40:
# serialization failure, deadlock), connection exceptions (08), object not in prerequisite state (55:
# lock not available), operator intervention (57: shutdown, cancel), insufficient resources (53).
_RETRIABLE_CLASSES = ("40", "08", "55", "57", "53")


def classify(exc: Exception) -> StoreError:
    code = getattr(exc, "sqlstate", None) or ""
    message = getattr(exc, "message", None) or str(exc)
    return StoreError(
        f"{type(exc).__name__}: {message}", retriable=code[:2] in _RETRIABLE_CLASSES, store="postgres", code=code
    )


@dataclass
class _Batch:
    """One transaction's work: the plan, and what running it produced, by batch position."""

    planned: list[Planned]
    before: dict[int, str | None] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)

    def new_markers(self) -> list[tuple[str, int, str, str | None]]:
        return [
            (
                p.command.tx_id,
                p.command.step_index,
                p.command.action,
                self.before.get(p.position) if p.is_execute else None,
            )
            for p in self.planned
            if p.writes_marker and p.position not in self.errors
        ]

    def outcome(self, p: Planned, store: Store, timing: Timing) -> StepOutcome:
        if p.position in self.errors:
            return failed(p.command.source, store, self.errors[p.position], timing)
        before: str | None = None
        if p.decision is Plan.APPLY_EXECUTE:
            before = self.before.get(p.position)
        elif p.decision is Plan.ALREADY_APPLIED and p.is_execute:
            before = p.own.before_image if p.own is not None else self.before.get(p.earlier or 0)
        return outcome(p.command.source, store, status_for(p.decision), timing, before_image=before)


class PostgresParticipant(Participant):
    store: Store = "postgres"

    def __init__(self, settings: Settings, pool_size: int = 4) -> None:
        self.settings = settings
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailableError("the PostgreSQL participant is not started")
        return self._pool

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.settings.postgres.dsn, min_size=1, max_size=self.pool_size, command_timeout=60
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc
        async with self.pool.acquire() as conn:
            await conn.execute(q.CREATE_MARKERS)

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
        try:
            async with self.pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        return await self._apply(conn, commands, begun)
                except asyncpg.PostgresError as exc:
                    if len(commands) == 1:
                        return [failed(commands[0].source, self.store, classify(exc), timing.since(begun))]
                    # One statement failed and took the batch's transaction with it: find the guilty
                    # command by running each alone.
                    outcomes = []
                    for command in commands:
                        outcomes.extend(await self._apply_alone(conn, command, begun))
                    return outcomes
        except (OSError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc

    async def _apply_alone(self, conn: asyncpg.Connection, command: TypedCommand, begun: int) -> list[StepOutcome]:
        try:
            async with conn.transaction():
                return await self._apply(conn, [command], begun)
        except asyncpg.PostgresError as exc:
            return [failed(command.source, self.store, classify(exc), timing.since(begun))]

    async def _apply(self, conn: asyncpg.Connection, commands: Sequence[TypedCommand], begun: int) -> list[StepOutcome]:
        batch = _Batch(plan_batch(commands, await self._read_markers(conn, commands)))
        for group in batch_groups(batch.planned, effects.writes, alone=lambda p: not effects.set_based(p)):
            if effects.set_based(group[0]):
                members = [(p.position, p.command.operation) for p in group]
                batch.before.update(await self._run_rows(conn, members))  # type: ignore[arg-type]
            else:
                await self._run_one(conn, batch, group[0])
        new_markers = batch.new_markers()
        if new_markers:
            await conn.execute(q.WRITE_MARKERS, *list(zip(*new_markers, strict=True)))
        done = timing.since(begun)
        return [batch.outcome(p, self.store, done) for p in batch.planned]

    async def _run_one(self, conn: asyncpg.Connection, batch: _Batch, p: Planned) -> None:
        if p.decision is Plan.APPLY_EXECUTE:
            batch.before[p.position] = await self._run(conn, p.position, p.command.operation)
        elif p.decision is Plan.APPLY_COMPENSATION:
            compensation = p.command.compensation
            operation = p.command.operation
            if compensation is not None:
                await self._run(conn, p.position, compensation)
            elif isinstance(operation, RowOperation):
                before = p.execute.before_image if p.execute is not None else None
                await self._run(conn, p.position, effects.restoring(operation, before))
            # else: a raw step without a declared compensation: nothing to undo, by the caller's choice

    async def _run(self, conn: asyncpg.Connection, position: int, op: Any) -> str | None:
        """Apply one operation; return its before-image (JSON text) where it has one."""
        if isinstance(op, RawOperation):
            await conn.execute(op.statement, *op.params)
            return None
        return (await self._run_rows(conn, [(position, op)]))[position]

    async def _run_rows(self, conn: asyncpg.Connection, members: list[tuple[int, RowOperation]]) -> dict[int, str]:
        """Row operations on distinct keys: a few statements per shape, whatever their number; returns
        each one's before-image by position."""
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
        return images

    async def _read_markers(self, conn: asyncpg.Connection, commands: Sequence[TypedCommand]) -> dict[str, Marker]:
        rows = await conn.fetch(q.READ_MARKERS, [c.tx_id for c in commands], [c.step_index for c in commands])
        return {marker_id(r[0], r[1], r[2]): Marker(r[3]) for r in rows}

    # -- reads for tests, the demo and the consistency checker --------------------------------------

    async def read_row(self, table: str, key: dict[str, Any]) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(q.read_row(table, tuple(key)), [json.dumps(key)])
        return json.loads(value) if value is not None else None

    async def markers_of(self, tx_id: str) -> dict[str, str | None]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(q.MARKERS_OF, tx_id)
        return {f"{r[0]}/{r[1]}": r[2] for r in rows}
