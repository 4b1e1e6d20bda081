"""The PostgreSQL participant on the real server: before-images, markers, exactly-once effect."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from consumers.command import TypedCommand, parse_command
from consumers.postgres import PostgresParticipant
from polycommit import operations as ops
from polycommit.config import Settings
from polycommit.events import Operation, StepAction, StoreCommand, store_command
from polycommit.parsed import RawOperation

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


# -- compensations of rows that existed before the saga (issue 9, defect 1) ------------------------------


async def test_execute_and_compensate_in_one_batch_restore_a_row_that_existed_before(pg: PostgresParticipant) -> None:
    k, old = key(), {"v": 1, "note": "before the saga"}
    await pg.apply_batch([command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k, old))])
    tx = uuid.uuid4().hex
    update, delete = ops.upsert_row(TABLE, k, {"v": 2}), ops.delete_row(TABLE, k)
    same_batch = [command(tx, 0, "EXECUTE", update), command(tx, 0, "COMPENSATE", update)]
    same_batch += [command(tx, 1, "EXECUTE", delete), command(tx, 1, "COMPENSATE", delete)]
    outcomes = await pg.apply_batch(same_batch)
    assert [o["status"] for o in outcomes] == ["APPLIED"] * 4
    assert await pg.read_row(TABLE, k) == {**k, **old}


async def test_execute_and_compensate_in_separate_batches_restore_a_row_that_existed_before(
    pg: PostgresParticipant,
) -> None:
    k, old = key(), {"v": 1, "note": "before the saga"}
    await pg.apply_batch([command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k, old))])
    tx = uuid.uuid4().hex
    for op in (ops.upsert_row(TABLE, k, {"v": 2}), ops.delete_row(TABLE, k)):
        (done,) = await pg.apply_batch([command(tx, 0, "EXECUTE", op)])
        (undone,) = await pg.apply_batch([command(tx, 0, "COMPENSATE", op)])
        assert (done["status"], undone["status"]) == ("APPLIED", "APPLIED")
        assert await pg.read_row(TABLE, k) == {**k, **old}
        tx = uuid.uuid4().hex


# -- raw SQL that must fail alone (issue 9, defects 2 and 6) ---------------------------------------------


def raw(statement: str, params: list[Any] | str = "[]") -> Operation:
    """A raw SQL operation as any producer may publish it: params are JSON text, possibly not JSON at all."""
    return {**ops.sql(statement), "params": params if isinstance(params, str) else json.dumps(params)}


async def test_raw_sql_with_bad_parameters_fails_alone_and_permanently(pg: PostgresParticipant) -> None:
    k1, k2 = key(), key()
    update = f"UPDATE {TABLE} SET v = $1 WHERE id = $2"
    bad = [raw(update, "not json"), raw(update, [1]), raw(update, [1, "x", 3]), raw(update, ["not an int", "x"])]
    batch = [command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k1, {"v": 1}))]
    batch += [command(uuid.uuid4().hex, 0, "EXECUTE", op) for op in bad]
    batch += [command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k2, {"v": 2}))]
    outcomes = await pg.apply_batch(batch)
    assert [o["status"] for o in outcomes] == ["APPLIED", "FAILED", "FAILED", "FAILED", "FAILED", "APPLIED"]
    errors = [o["error"] for o in outcomes[1:5]]
    assert all(e is not None and e["error_class"] == "InvalidOperationError" and not e["retriable"] for e in errors)
    assert await pg.read_row(TABLE, k1) == {**k1, "v": 1, "note": None}
    assert await pg.read_row(TABLE, k2) == {**k2, "v": 2, "note": None}
    for o in (outcomes[0], outcomes[5]):
        assert "0/EXECUTE" in await pg.markers_of(o["tx_id"])


async def test_a_raw_step_that_ends_the_transaction_fails_alone_and_the_batch_keeps_its_markers(
    pg: PostgresParticipant,
) -> None:
    """A COMMIT that got past parsing (built here by hand) must not separate the others' effects from their
    markers: it fails alone, and every other command commits with its marker."""
    k1, k2 = key(), key()
    first = command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k1, {"v": 1}))
    last = command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k2, {"v": 2}))
    typed = [parse_command(c, "postgres", 1024 * 1024) for c in (first, last)]
    for statement in ("COMMIT", "ROLLBACK"):
        sneaky = command(uuid.uuid4().hex, 0, "EXECUTE", ops.sql("SELECT 1"))
        smuggled = TypedCommand(sneaky, RawOperation("postgres", statement, (), ()), None)
        outcomes = await pg.apply_commands([typed[0], smuggled, typed[1]])
        assert [o["status"] for o in outcomes][1] == "FAILED"
        assert {o["status"] for o in (outcomes[0], outcomes[2])} <= {"APPLIED", "ALREADY_APPLIED"}
        error = outcomes[1]["error"]
        assert error is not None and error["error_class"] == "InvalidOperationError" and not error["retriable"]
        assert await pg.markers_of(sneaky["tx_id"]) == {}
    for c, k, v in ((first, k1, 1), (last, k2, 2)):
        assert await pg.read_row(TABLE, k) == {**k, "v": v, "note": None}
        assert json.loads((await pg.markers_of(c["tx_id"]))["0/EXECUTE"] or "") == {"row": None}


async def test_a_raw_step_that_ends_the_transaction_fails_alone_when_the_batch_runs_one_by_one(
    pg: PostgresParticipant,
) -> None:
    """The same, in a batch that another bad command sends down the one-by-one path."""
    k1, k2 = key(), key()
    commands = [
        command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k1, {"v": 1})),
        command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row("no_such_table_anywhere", {"id": "x"}, {})),
        command(uuid.uuid4().hex, 0, "EXECUTE", ops.sql("SELECT 1")),
        command(uuid.uuid4().hex, 0, "EXECUTE", ops.upsert_row(TABLE, k2, {"v": 2})),
    ]
    typed = [parse_command(c, "postgres", 1024 * 1024) for c in commands]
    typed[2] = TypedCommand(commands[2], RawOperation("postgres", "COMMIT", (), ()), None)
    outcomes = await pg.apply_commands(typed)
    assert [o["status"] for o in outcomes][1:3] == ["FAILED", "FAILED"]
    assert (
        outcomes[2]["error"] is not None and "ended the consumer's batch transaction" in outcomes[2]["error"]["message"]
    )
    assert {o["status"] for o in (outcomes[0], outcomes[3])} <= {"APPLIED", "ALREADY_APPLIED"}
    assert await pg.read_row(TABLE, k1) == {**k1, "v": 1, "note": None}
    assert await pg.read_row(TABLE, k2) == {**k2, "v": 2, "note": None}
    assert [list(await pg.markers_of(c["tx_id"])) for c in commands] == [["0/EXECUTE"], [], [], ["0/EXECUTE"]]


async def test_what_a_raw_step_leaves_in_its_session_is_reset_before_the_connection_is_reused(
    settings: Settings, pg: PostgresParticipant
) -> None:
    """Released connections are reset only after a raw step (the default reset is a round trip on every
    batch): a session-level setting and an advisory lock taken by one are gone once its batch returns."""
    lock, name = 7_000_000 + uuid.uuid4().int % 1_000_000, f"leaked-{uuid.uuid4().hex[:8]}"
    leaky = [
        raw("SELECT set_config('application_name', $1, false)", [name]),
        raw("SELECT pg_advisory_lock($1)", [lock]),
    ]
    outcomes = await pg.apply_batch([command(uuid.uuid4().hex, 0, "EXECUTE", op) for op in leaky])
    assert [o["status"] for o in outcomes] == ["APPLIED", "APPLIED"]
    other = await asyncpg.connect(settings.postgres.dsn)
    try:
        assert await other.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name) == 0
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", lock) is True
    finally:
        await other.close()
