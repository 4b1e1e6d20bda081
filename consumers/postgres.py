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
from typing import Any

import asyncpg

from consumers.base import Marker, Participant, Plan, failed, marker_id, outcome, plan, status_for
from polycommit.config import Settings
from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError
from polycommit.events import Operation, StepOutcome, Store, StoreCommand

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
        new_markers: list[tuple[str, int, str, str | None]] = []
        outcomes: list[StepOutcome] = []
        for command in commands:
            started = time.perf_counter_ns()
            tx, step = command["tx_id"], command["step_index"]
            execute = markers.get(marker_id(tx, step, "EXECUTE"))
            compensate = markers.get(marker_id(tx, step, "COMPENSATE"))
            decision = plan(command, execute, compensate)
            before: str | None = None
            try:
                if decision is Plan.APPLY_EXECUTE:
                    before = await self._run(conn, command["operation"])
                elif decision is Plan.APPLY_COMPENSATION:
                    assert execute is not None
                    await self._compensate(conn, command, execute.before_image)
                elif decision is Plan.ALREADY_APPLIED:
                    own = execute if command["action"] == "EXECUTE" else compensate
                    before = own.before_image if own is not None else None
            except InvalidOperationError as exc:
                outcomes.append(failed(command, self.store, exc, started))
                continue
            if decision in (Plan.APPLY_EXECUTE, Plan.APPLY_COMPENSATION, Plan.RECORD_NOOP_COMPENSATION):
                action = command["action"]
                marker_before = before if action == "EXECUTE" else None
                new_markers.append((tx, step, action, marker_before))
                # Later commands of this batch must see this step's marker (e.g. its compensation).
                markers[marker_id(tx, step, action)] = Marker(marker_before)
            outcomes.append(outcome(command, self.store, status_for(decision), before_image=before, started_ns=started))
        if new_markers:
            columns = list(zip(*new_markers, strict=True))
            await conn.execute(_WRITE_MARKERS, *columns)
        return outcomes

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
