"""PostgreSQL's prepared batches on the real server: one PREPARE TRANSACTION for several global
transactions; an ABORT rolls the batch back and its members decided COMMIT are redone; settlement at
start and `recover` judge a batch by its members' decisions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from consumers.command import TypedCommand, parse_command
from consumers.postgres import twophase
from consumers.postgres.participant import PostgresParticipant
from polycommit import operations as ops
from polycommit.bus import Outgoing, Publisher, topics_for
from polycommit.config import Settings
from polycommit.events import Decision, now_ms, store_command
from polycommit.tooling import workload
from polycommit.tooling.recovery import _settled_meanwhile, prepared_batches

pytestmark = pytest.mark.servers


def command(tx_id: str, action: str) -> TypedCommand:
    operation = ops.upsert_row(workload.DOCUMENTS, {"id": tx_id}, {"title": "batched"})
    return parse_command(store_command(tx_id, 0, action, operation), "postgres", 1 << 20)  # type: ignore[arg-type]


@pytest.fixture
async def participant(topics: Settings) -> AsyncIterator[PostgresParticipant]:
    await workload.prepare_postgres(topics)
    p = PostgresParticipant(topics)
    await p.start()
    yield p
    await p.close()


async def rows(settings: Settings, ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        found = await conn.fetch(f"SELECT id FROM {workload.DOCUMENTS} WHERE id = ANY($1::text[])", ids)
        return {r[0] for r in found}
    finally:
        await conn.close()


async def decide(settings: Settings, outcomes: dict[str, str]) -> None:
    publisher = Publisher(settings)
    await publisher.start()
    try:
        records = [
            Outgoing(
                topics_for(settings).decisions,
                tx,
                "Decision",
                Decision(tx_id=tx, outcome=o, participants=["postgres"], reason="test", at_ms=now_ms()),  # type: ignore[typeddict-item]
            )
            for tx, o in outcomes.items()
        ]
        await publisher.publish_and_wait(records)
    finally:
        await publisher.stop()


async def test_an_abort_rolls_the_batch_back_and_its_commit_members_are_redone(
    topics: Settings, participant: PostgresParticipant
) -> None:
    a, b, c = (f"batch-{uuid.uuid4().hex[:8]}" for _ in range(3))
    votes = await participant.vote([command(tx, "PREPARE") for tx in (a, b, c)])
    assert [v["status"] for v in votes] == ["PREPARED"] * 3
    batches = await prepared_batches(topics)
    assert [txs for txs in batches.values() if a in txs] == [sorted([a, b, c])]  # one prepared transaction

    held = await participant.finish([command(a, "COMMIT")])
    assert held == [None] and participant.released() == []  # a waits for b and c
    assert await rows(topics, [a, b, c]) == set()  # nothing visible before the batch settles

    aborted = await participant.finish([command(b, "ABORT")])
    assert [o["status"] for o in aborted if o] == ["NOOP"]
    assert [(o["tx_id"], o["status"]) for o in participant.released()] == [(a, "APPLIED")]  # redone
    assert await rows(topics, [a, b, c]) == {a}

    late = await participant.finish([command(c, "COMMIT")])  # its batch is gone: redone alone
    assert [o["status"] for o in late if o] == ["APPLIED"]
    assert await rows(topics, [a, b, c]) == {a, c}
    assert not [g for g, txs in (await prepared_batches(topics)).items() if a in txs]
    assert [v["status"] for v in await participant.vote([command(b, "PREPARE")])] == ["VOTED_NO"]  # fenced


async def test_a_batch_left_prepared_is_settled_by_its_members_decisions_and_reported(topics: Settings) -> None:
    await workload.prepare_postgres(topics)
    committed, aborted = [f"set-{uuid.uuid4().hex[:8]}" for _ in range(2)], [f"set-{uuid.uuid4().hex[:8]}"]
    first = PostgresParticipant(topics)
    await first.start()
    try:  # two batches prepared, then the participant goes away without phase 2 (as if killed)
        await first.vote([command(tx, "PREPARE") for tx in committed])
        await first.vote([command(tx, "PREPARE") for tx in [*aborted, f"set-{uuid.uuid4().hex[:8]}"]])
    finally:
        await first.close()
    before = await prepared_batches(topics)
    assert len([g for g, txs in before.items() if set(txs) & {*committed, *aborted}]) == 2
    await decide(topics, {**dict.fromkeys(committed, "COMMIT"), **dict.fromkeys(aborted, "ABORT")})

    second = PostgresParticipant(topics)  # settles at start
    await second.start()
    await second.close()
    verbs = {e["transactions"]: e["action"] for e in second.settled if "transactions" in e}
    assert verbs[",".join(sorted(committed))] == "COMMIT"
    assert [v for k, v in verbs.items() if aborted[0] in k] == ["ROLLBACK"]
    assert await rows(topics, [*committed, *aborted]) == set(committed)
    reported = {e["gid"]: e["action"] for e in await _settled_meanwhile(topics, before)}
    assert sorted(reported.values()) == ["COMMIT", "ROLLBACK"]
    assert not [g for g in await prepared_batches(topics) if g.startswith(twophase.GID_PREFIX) and g in before]
