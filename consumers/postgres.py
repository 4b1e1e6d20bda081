"""The PostgreSQL participant: applies saga steps with their markers, one local transaction per batch.

Every step's effect and its applied-step marker (`polycommit_steps`) commit in the same PostgreSQL
transaction, so "applied" and "recorded as applied" cannot disagree after a crash. A batch runs in one
transaction; if any statement in it fails, the batch is rolled back and its commands are run one by one,
each in its own transaction, so a bad command fails alone and the others still apply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import asyncpg

from consumers import postgres_sql as sql
from consumers.base import Marker, Participant, Plan, failed, generations, marker_id, outcome, plan, status_for
from polycommit.config import Settings
from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError
from polycommit.events import Operation, StepOutcome, Store, StoreCommand
from polycommit.operations import lock_keys

MARKER_TABLE = "polycommit_steps"
_CREATE_MARKERS = f"""
CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (
    tx_id        text        NOT NULL,
    step_index   integer     NOT NULL,
    action       text        NOT NULL,
    before_image jsonb,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tx_id, step_index, action)
)"""
_READ_MARKERS = f"""
SELECT m.tx_id, m.step_index, m.action, m.before_image::text
FROM {MARKER_TABLE} m
JOIN unnest($1::text[], $2::int[]) AS k(tx_id, step_index) USING (tx_id, step_index)"""
_WRITE_MARKERS = f"""
INSERT INTO {MARKER_TABLE} (tx_id, step_index, action, before_image)
SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::jsonb[])"""

# SQLSTATE classes after which the same statement may succeed later: transaction rollback (40:
# serialization failure, deadlock), connection exceptions (08), object not in prerequisite state (55:
# lock not available), operator intervention (57: shutdown, cancel), insufficient resources (53).
_RETRIABLE_CLASSES = ("40", "08", "55", "57", "53")


def _q(identifier: str) -> str:
    """Quote an identifier already checked by operations.validate_operation."""
    return '"' + identifier.replace('"', '""') + '"'


def classify(exc: Exception) -> StoreError:
    code = getattr(exc, "sqlstate", None) or ""
    message = getattr(exc, "message", None) or str(exc)
    return StoreError(
        f"{type(exc).__name__}: {message}", retriable=code[:2] in _RETRIABLE_CLASSES, store="postgres", code=code
    )


@dataclass
class _Step:
    """One command of a batch: what the markers allow it to do, and what doing it produced."""

    command: StoreCommand
    decision: Plan
    execute: Marker | None
    own: Marker | None
    started_ns: int = field(default_factory=time.perf_counter_ns)
    before: str | None = None
    error: Exception | None = None

    @property
    def set_based(self) -> bool:
        return self.decision is Plan.APPLY_EXECUTE and self.command["operation"]["kind"] in SET_BASED

    @property
    def writes_marker(self) -> bool:
        return self.decision in (Plan.APPLY_EXECUTE, Plan.APPLY_COMPENSATION, Plan.RECORD_NOOP_COMPENSATION)

    @property
    def marker_before(self) -> str | None:
        return self.before if self.command["action"] == "EXECUTE" else None

    @cached_property
    def key(self) -> dict[str, Any]:
        return dict(json.loads(self.command["operation"]["key"]))

    @cached_property
    def values(self) -> dict[str, Any]:
        return {k: v for k, v in json.loads(self.command["operation"]["values"]).items() if k not in self.key}

    def shape(self) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
        op = self.command["operation"]
        return op["kind"], op["target"], tuple(sorted(self.key)), tuple(sorted(self.values))

    def outcome(self, store: Store) -> StepOutcome:
        if self.error is not None:
            return failed(self.command, store, self.error, self.started_ns)
        before = self.before
        if self.decision is Plan.ALREADY_APPLIED and self.own is not None:
            before = self.own.before_image
        return outcome(self.command, store, status_for(self.decision), before_image=before, started_ns=self.started_ns)


SET_BASED = frozenset({"upsert_row", "delete_row"})


def _plan_batch(commands: Sequence[StoreCommand], markers: dict[str, Marker]) -> list[_Step]:
    """Plan every command in order; a step planned to write its marker counts as recorded for the
    commands after it (e.g. a compensation of a step executed earlier in the same batch)."""
    steps = []
    for command in commands:
        tx, index, action = command["tx_id"], command["step_index"], command["action"]
        execute = markers.get(marker_id(tx, index, "EXECUTE"))
        compensate = markers.get(marker_id(tx, index, "COMPENSATE"))
        step = _Step(
            command, plan(command, execute, compensate), execute, execute if action == "EXECUTE" else compensate
        )
        if step.writes_marker:
            markers[marker_id(tx, index, action)] = Marker(None)
        steps.append(step)
    return steps


def _groups(steps: list[_Step]) -> list[list[_Step]]:
    """Consecutive set-based steps on distinct keys form one group; anything else (raw SQL, a
    compensation) runs on its own, in order, so the batch behaves as if applied one by one."""
    active = [s for s in steps if s.writes_marker]
    keys = {i: lock_keys(s.command["operation"]) for i, s in enumerate(active) if s.set_based}
    alone = {i for i, s in enumerate(active) if not s.set_based}
    return [[active[i] for i in group] for group in generations([s.command for s in active], keys, alone)]


class PostgresParticipant(Participant):
    store: Store = "postgres"

    def __init__(self, settings: Settings, pool_size: int = 4) -> None:
        self.settings = settings
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._columns: dict[str, list[str]] = {}

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
            await conn.execute(_CREATE_MARKERS)

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

    async def apply_batch(self, commands: Sequence[StoreCommand]) -> list[StepOutcome]:
        if not commands:
            return []
        try:
            async with self.pool.acquire() as conn:
                started = time.perf_counter_ns()
                try:
                    async with conn.transaction():
                        return await self._apply(conn, commands)
                except asyncpg.PostgresError as exc:
                    if len(commands) == 1:
                        return [failed(commands[0], self.store, classify(exc), started)]
                    # One statement failed and took the batch's transaction with it: find the guilty
                    # command by running each alone.
                    outcomes = []
                    for command in commands:
                        outcomes.extend(await self._apply_alone(conn, command))
                    return outcomes
        except (OSError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailableError(f"PostgreSQL at {self.settings.postgres.address}: {exc}") from exc

    async def _apply_alone(self, conn: asyncpg.Connection, command: StoreCommand) -> list[StepOutcome]:
        started = time.perf_counter_ns()
        try:
            async with conn.transaction():
                return await self._apply(conn, [command])
        except asyncpg.PostgresError as exc:
            return [failed(command, self.store, classify(exc), started)]

    async def _apply(self, conn: asyncpg.Connection, commands: Sequence[StoreCommand]) -> list[StepOutcome]:
        markers = await self._read_markers(conn, commands)
        steps = _plan_batch(commands, markers)
        for group in _groups(steps):
            if len(group) == 1 and not group[0].set_based:
                await self._run_one(conn, group[0])
            else:
                await self._run_set(conn, group)
        new_markers = [
            (s.command["tx_id"], s.command["step_index"], s.command["action"], s.marker_before)
            for s in steps
            if s.writes_marker and s.error is None
        ]
        if new_markers:
            await conn.execute(_WRITE_MARKERS, *list(zip(*new_markers, strict=True)))
        return [s.outcome(self.store) for s in steps]

    async def _run_one(self, conn: asyncpg.Connection, step: _Step) -> None:
        try:
            if step.decision is Plan.APPLY_EXECUTE:
                step.before = await self._run(conn, step.command["operation"])
            elif step.decision is Plan.APPLY_COMPENSATION:
                assert step.execute is not None
                await self._compensate(conn, step.command, step.execute.before_image)
        except InvalidOperationError as exc:
            step.error = exc

    async def _run_set(self, conn: asyncpg.Connection, group: list[_Step]) -> None:
        """Structured EXECUTEs on distinct keys: a few statements per table, whatever the group's size."""
        shapes: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], list[_Step]] = {}
        for step in group:
            shapes.setdefault(step.shape(), []).append(step)
        for (kind, table, keys, columns), members in shapes.items():
            docs = [json.dumps(m.key) for m in members]
            rows = dict(await conn.fetch(sql.lock_rows(table, keys), docs))  # ordinal (from 1) -> row JSON
            for ordinal, member in enumerate(members, 1):
                member.before = '{"row":' + rows.get(ordinal, "null") + "}"
            if kind == "delete_row":
                await conn.execute(sql.delete_rows(table, keys), docs)
                continue
            full = [json.dumps({**m.values, **m.key}) for m in members]
            existing = [doc for ordinal, doc in enumerate(full, 1) if ordinal in rows]
            missing = [doc for ordinal, doc in enumerate(full, 1) if ordinal not in rows]
            if existing and columns:
                await conn.execute(sql.update_rows(table, keys, columns), existing)
            if missing:
                await conn.execute(sql.insert_rows(table, keys, keys + columns), missing)

    async def _read_markers(self, conn: asyncpg.Connection, commands: Sequence[StoreCommand]) -> dict[str, Marker]:
        rows = await conn.fetch(_READ_MARKERS, [c["tx_id"] for c in commands], [c["step_index"] for c in commands])
        return {marker_id(r[0], r[1], r[2]): Marker(r[3]) for r in rows}

    # -- operations ---------------------------------------------------------------------------------

    async def _run(self, conn: asyncpg.Connection, op: Operation) -> str | None:
        """Apply one operation; return its before-image (JSON text) where it has one."""
        kind = op["kind"]
        if kind == "sql":
            params = json.loads(op["params"])
            if not isinstance(params, list):
                raise InvalidOperationError("sql params must be a JSON array of positional values")
            await conn.execute(op["statement"], *params)
            return None
        key = json.loads(op["key"])
        row = await self._lock_row(conn, op["target"], key)
        if kind == "upsert_row" and row is not None:
            # An UPDATE, not INSERT .. ON CONFLICT: a partial row must not trip NOT NULL columns it omits.
            await self._update(conn, op["target"], key, json.loads(op["values"]))
        elif kind == "upsert_row":
            await self._upsert(conn, op["target"], key, {**json.loads(op["values"]), **key})
        elif kind == "delete_row":
            await self._delete(conn, op["target"], key)
        else:
            raise InvalidOperationError(f"postgres cannot run {kind!r}")
        return '{"row":' + (row or "null") + "}"

    async def _compensate(self, conn: asyncpg.Connection, command: StoreCommand, before: str | None) -> None:
        if command["compensation"] is not None:
            await self._run(conn, command["compensation"])
            return
        op = command["operation"]
        if op["kind"] == "sql":
            return  # a raw step without a declared compensation: nothing to undo, by the caller's choice
        key = json.loads(op["key"])
        row = json.loads(before)["row"] if before else None
        if row is None:
            await self._delete(conn, op["target"], key)
        else:
            await self._upsert(conn, op["target"], key, row)

    async def _lock_row(self, conn: asyncpg.Connection, table: str, key: dict[str, Any]) -> str | None:
        # FOR UPDATE returns the newest committed version and holds it until this batch commits, so the
        # before-image is exactly what this step overwrites.
        keys = ", ".join(_q(k) for k in key)
        sql = (
            f"SELECT to_jsonb(t)::text FROM {_q(table)} t WHERE ({keys}) = "
            f"(SELECT {keys} FROM jsonb_populate_record(NULL::{_q(table)}, $1::jsonb)) FOR UPDATE"
        )
        value = await conn.fetchval(sql, json.dumps(key))
        return str(value) if value is not None else None

    async def _upsert(self, conn: asyncpg.Connection, table: str, key: dict[str, Any], row: dict[str, Any]) -> None:
        columns = list(row)
        names = ", ".join(_q(c) for c in columns)
        updates = [f"{_q(c)} = EXCLUDED.{_q(c)}" for c in columns if c not in key]
        conflict = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
        sql = (
            f"INSERT INTO {_q(table)} ({names}) "
            f"SELECT {names} FROM jsonb_populate_record(NULL::{_q(table)}, $1::jsonb) "
            f"ON CONFLICT ({', '.join(_q(k) for k in key)}) {conflict}"
        )
        await conn.execute(sql, json.dumps(row))

    async def _update(self, conn: asyncpg.Connection, table: str, key: dict[str, Any], values: dict[str, Any]) -> None:
        columns = [c for c in values if c not in key]
        if not columns:
            return
        assignments = ", ".join(f"{_q(c)} = r.{_q(c)}" for c in columns)
        sql = (
            f"UPDATE {_q(table)} t SET {assignments} FROM jsonb_populate_record(NULL::{_q(table)}, $1::jsonb) r "
            f"WHERE ({', '.join('t.' + _q(k) for k in key)}) = ({', '.join('r.' + _q(k) for k in key)})"
        )
        await conn.execute(sql, json.dumps({**values, **key}))

    async def _delete(self, conn: asyncpg.Connection, table: str, key: dict[str, Any]) -> None:
        keys = ", ".join(_q(k) for k in key)
        sql = (
            f"DELETE FROM {_q(table)} WHERE ({keys}) = "
            f"(SELECT {keys} FROM jsonb_populate_record(NULL::{_q(table)}, $1::jsonb))"
        )
        await conn.execute(sql, json.dumps(key))

    # -- reads for tests, the demo and the consistency checker --------------------------------------

    async def read_row(self, table: str, key: dict[str, Any]) -> dict[str, Any] | None:
        keys = ", ".join(_q(k) for k in key)
        sql = (
            f"SELECT to_jsonb(t)::text FROM {_q(table)} t WHERE ({keys}) = "
            f"(SELECT {keys} FROM jsonb_populate_record(NULL::{_q(table)}, $1::jsonb))"
        )
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(sql, json.dumps(key))
        return json.loads(value) if value is not None else None

    async def markers_of(self, tx_id: str) -> dict[str, str | None]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT step_index, action, before_image::text FROM {MARKER_TABLE} WHERE tx_id = $1", tx_id
            )
        return {f"{r[0]}/{r[1]}": r[2] for r in rows}
