"""The PostgreSQL part of a transaction runs at the transaction's isolation level, on the real server: a
saga batch and a two-phase commit's prepared batch run at the strictest level their commands ask, which a
raw step records (`current_setting('transaction_isolation')`) in the transaction it runs in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from consumers.command import TypedCommand, parse_command
from consumers.postgres.participant import PostgresParticipant
from polycommit import operations as ops
from polycommit.config import Settings
from polycommit.events import Isolation, StepAction, store_command

pytestmark = pytest.mark.servers

PROBE = "isolation_probe"
RECORD = f"INSERT INTO {PROBE} (tx_id, level) SELECT $1, current_setting('transaction_isolation')"


def probe(tx_id: str, action: StepAction, isolation: Isolation) -> TypedCommand:
    operation = ops.sql(RECORD, [tx_id], lock_keys=[f"postgres:{PROBE}:{tx_id}"])
    command = store_command(tx_id, 0, action, operation, isolation=isolation)
    return parse_command(command, "postgres", 1 << 20)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def pg(settings: Settings) -> AsyncIterator[PostgresParticipant]:
    participant = PostgresParticipant(settings)
    await participant.start()
    async with participant.pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {PROBE} (tx_id text PRIMARY KEY, level text NOT NULL)")
    yield participant
    await participant.close()


async def levels(settings: Settings, tx_ids: list[str]) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        return dict(await conn.fetch(f"SELECT tx_id, level FROM {PROBE} WHERE tx_id = ANY($1::text[])", tx_ids))
    finally:
        await conn.close()


def tx() -> str:
    return uuid.uuid4().hex


async def test_a_saga_batch_runs_at_the_strictest_level_of_its_commands(
    pg: PostgresParticipant, settings: Settings
) -> None:
    alone = {tx(): level for level in ("READ_COMMITTED", "REPEATABLE_READ", "SERIALIZABLE")}
    for tx_id, level in alone.items():  # one batch each
        (done,) = await pg.apply_commands([probe(tx_id, "EXECUTE", level)])  # type: ignore[arg-type]
        assert done["status"] == "APPLIED", done
    mixed = [tx(), tx()]
    outcomes = await pg.apply_commands(
        [probe(mixed[0], "EXECUTE", "READ_COMMITTED"), probe(mixed[1], "EXECUTE", "SERIALIZABLE")]
    )
    assert [o["status"] for o in outcomes] == ["APPLIED", "APPLIED"]
    found = await levels(settings, [*alone, *mixed])
    assert [found[t] for t in alone] == ["read committed", "repeatable read", "serializable"]
    assert [found[t] for t in mixed] == ["serializable", "serializable"]  # one transaction: the strictest


async def test_a_prepared_batch_runs_at_its_commands_level(pg: PostgresParticipant, settings: Settings) -> None:
    tx_id = tx()
    (vote,) = await pg.vote([probe(tx_id, "PREPARE", "REPEATABLE_READ")])
    assert vote["status"] == "PREPARED", vote
    (committed,) = await pg.finish([probe(tx_id, "COMMIT", "REPEATABLE_READ")])
    assert committed is not None and committed["status"] == "APPLIED", committed
    assert (await levels(settings, [tx_id]))[tx_id] == "repeatable read"
