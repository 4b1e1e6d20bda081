"""The PostgreSQL participant on the real server: before-images, markers, exactly-once effect."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from consumers.postgres import PostgresParticipant
from polycommit import operations as ops
from polycommit.config import Settings
from polycommit.events import Operation, StepAction, StoreCommand, store_command

TABLE = "adapter_test_rows"


def command(
    tx: str, step: int, action: StepAction, op: Operation, compensation: Operation | None = None
) -> StoreCommand:
    return store_command(tx, step, action, op, compensation=compensation, issued_at_ms=0)


@pytest.fixture(scope="module")
async def pg(settings: Settings) -> AsyncIterator[PostgresParticipant]:
    participant = PostgresParticipant(settings)
    await participant.start()
    async with participant.pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer, note text)")
    yield participant
    await participant.close()


def key() -> dict[str, Any]:
    return {"id": uuid.uuid4().hex}


async def test_upsert_records_before_image_and_marker(pg: PostgresParticipant) -> None:
    k, tx = key(), uuid.uuid4().hex
    (first,) = await pg.apply_batch([command(tx, 0, "EXECUTE", ops.upsert_row(TABLE, k, {"v": 1}))])
    assert first["status"] == "APPLIED"
    assert json.loads(first["before_image"] or "") == {"row": None}
    (second,) = await pg.apply_batch([command(tx + "b", 0, "EXECUTE", ops.upsert_row(TABLE, k, {"v": 2, "note": "n"}))])
    assert json.loads(second["before_image"] or "") == {"row": {**k, "v": 1, "note": None}}
    assert await pg.read_row(TABLE, k) == {**k, "v": 2, "note": "n"}
    markers = await pg.markers_of(tx + "b")
    assert json.loads(markers["0/EXECUTE"] or "") == {"row": {**k, "v": 1, "note": None}}


async def test_a_repeated_execute_is_a_no_op_even_after_a_later_write(pg: PostgresParticipant) -> None:
    k, tx = key(), uuid.uuid4().hex
    cmd = command(tx, 0, "EXECUTE", ops.upsert_row(TABLE, k, {"v": 1}))
    await pg.apply_batch([cmd])
    await pg.apply_batch([command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k, {"v": 5}))])
    (again,) = await pg.apply_batch([cmd])
    assert again["status"] == "ALREADY_APPLIED"
    assert json.loads(again["before_image"] or "") == {"row": None}
    assert (await pg.read_row(TABLE, k) or {})["v"] == 5


async def test_compensation_restores_the_before_image(pg: PostgresParticipant) -> None:
    k = key()
    await pg.apply_batch([command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k, {"v": 1}))])
    tx = uuid.uuid4().hex
    op = ops.upsert_row(TABLE, k, {"v": 2})
    await pg.apply_batch([command(tx, 0, "EXECUTE", op)])
    (undo,) = await pg.apply_batch([command(tx, 0, "COMPENSATE", op)])
    assert undo["status"] == "APPLIED"
    assert (await pg.read_row(TABLE, k) or {})["v"] == 1
    (again,) = await pg.apply_batch([command(tx, 0, "COMPENSATE", op)])
    assert again["status"] == "ALREADY_APPLIED"
    # Compensating an insert deletes the row it created.
    k2, tx2 = key(), uuid.uuid4().hex
    insert = ops.upsert_row(TABLE, k2, {"v": 9})
    await pg.apply_batch([command(tx2, 0, "EXECUTE", insert), command(tx2, 0, "COMPENSATE", insert)])
    assert await pg.read_row(TABLE, k2) is None


async def test_compensation_before_execute_is_a_noop_and_the_late_execute_is_skipped(pg: PostgresParticipant) -> None:
    k, tx = key(), uuid.uuid4().hex
    op = ops.upsert_row(TABLE, k, {"v": 1})
    (noop,) = await pg.apply_batch([command(tx, 0, "COMPENSATE", op)])
    assert noop["status"] == "NOOP"
    (late,) = await pg.apply_batch([command(tx, 0, "EXECUTE", op)])
    assert late["status"] == "SKIPPED"
    assert await pg.read_row(TABLE, k) is None


async def test_a_bad_statement_fails_alone_and_the_rest_of_the_batch_applies(pg: PostgresParticipant) -> None:
    k1, k2 = key(), key()
    batch = [
        command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k1, {"v": 1})),
        command(uuid.uuid4().hex, 0, "EXECUTE", ops.sql("SELEC 1")),
        command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k2, {"v": 2})),
    ]
    outcomes = await pg.apply_batch(batch)
    assert [o["status"] for o in outcomes] == ["APPLIED", "FAILED", "APPLIED"]
    error = outcomes[1]["error"]
    assert error is not None and not error["retriable"] and "syntax" in error["message"]
    assert await pg.read_row(TABLE, k1) is not None and await pg.read_row(TABLE, k2) is not None


async def test_the_same_key_twice_in_a_batch_gives_one_by_one_before_images(pg: PostgresParticipant) -> None:
    k = key()
    outcomes = await pg.apply_batch(
        [
            command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k, {"v": 1})),
            command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k, {"v": 2})),
        ]
    )
    assert json.loads(outcomes[1]["before_image"] or "")["row"]["v"] == 1


async def test_a_serialization_failure_is_retriable(pg: PostgresParticipant) -> None:
    raise_40001 = "DO $$ BEGIN RAISE EXCEPTION 'try again' USING ERRCODE = '40001'; END $$"
    (outcome,) = await pg.apply_batch([command(uuid.uuid4().hex, 0, "EXECUTE", ops.sql(raise_40001))])
    assert outcome["status"] == "FAILED" and outcome["error"] is not None and outcome["error"]["retriable"]


async def test_a_prepared_transaction_survives_a_postgres_restart(settings: Settings) -> None:
    from polycommit.tooling.services import start_servers, stop_servers

    gid, k = f"pc-test-{uuid.uuid4().hex}", uuid.uuid4().hex
    conn = await asyncpg.connect(settings.postgres.dsn)
    await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, v integer, note text)")
    await conn.execute("BEGIN")
    await conn.execute(f"INSERT INTO {TABLE} (id, v) VALUES ($1, 42)", k)
    await conn.execute(f"PREPARE TRANSACTION '{gid}'")
    await conn.close()
    await stop_servers(settings, ["postgres"])
    await start_servers(settings, ["postgres"])
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1", gid) == 1
        assert await conn.fetchval(f"SELECT v FROM {TABLE} WHERE id = $1", k) is None  # not yet visible
        await conn.execute(f"COMMIT PREPARED '{gid}'")
        assert await conn.fetchval(f"SELECT v FROM {TABLE} WHERE id = $1", k) == 42
    finally:
        await conn.close()
