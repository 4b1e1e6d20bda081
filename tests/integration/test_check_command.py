"""`polycommit check` on the real servers: a clean run is clean, and each planted defect is named.

A small real workload runs first (a Runtime in this process): sagas that complete, one that is
compensated, one that updates a key another saga wrote and is compensated (the old value must come
back), one that deletes a row and is compensated (the row must come back), and one over a row older than
the whole log (its before-image is the only record of it). The runtime then stops (so
the command can open the Qdrant Edge storage), and every test plants one defect — in a store, or on the
topics of a copy of the log under a prefix of its own — runs `polycommit check --json` as a subprocess and
asserts that exactly that class is counted once, with exit code 1. Store plants are undone afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from log_follow import publish
from neo4j import AsyncGraphDatabase

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import create_topics, delete_topics, read_topic, topics_for
from polycommit.client import Coordinator, Saga, Transaction
from polycommit.config import Settings
from polycommit.events import now_ms
from polycommit.kafka_client import client_security
from polycommit.tooling.bench import COLLECTION, TABLE, prepare
from polycommit.tooling.runtime import Runtime
from polycommit.tooling.workload import embed

pytestmark = pytest.mark.servers
POLICY = SagaPolicy(default_timeout_ms=5000, backoff_base_ms=50, backoff_max_ms=500, compensation_retries=3)
RUN = uuid.uuid4().hex[:8]
LABEL = f"CheckNode{RUN}"


def key(i: int | str) -> str:
    return f"k{RUN}-{i}"


def writes(k: str, v: int) -> list[Any]:
    return [
        ops.upsert_row(TABLE, {"id": k}, {"v": v}),
        ops.upsert_points(COLLECTION, [ops.point(ops.point_id(k), embed(f"{k}/{v}"), {"v": v})]),
        ops.merge_node(LABEL, {"id": k}, {"v": v}),
    ]


def saga(operations: list[Any], *, fail: bool = False) -> Saga:
    s = Saga("check")
    for op in operations:
        s.step(op)
    if fail:
        s.step(ops.sql(f"UPDATE {TABLE} SET v = 1/0 WHERE id = $1", [key("nobody")]))
    return s


@dataclasses.dataclass
class Workload:
    settings: Settings
    completed: list[str]  # tx ids of the completed sagas, writing key(0), key(1), key(2)
    compensated: str  # wrote key("undone") and was compensated


@pytest.fixture(scope="module")
async def workload(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Workload]:
    edge = tmp_path_factory.mktemp("check-edge")
    run = dataclasses.replace(
        settings, topic_prefix=f"check-{RUN}", qdrant=dataclasses.replace(settings.qdrant, edge_path=Path(edge))
    )
    await create_topics(run)
    await prepare(run)
    # A row older than the whole log: the compensated saga over it must leave it as it was.
    await pg(run, f"INSERT INTO {TABLE} (id, v) VALUES ($1, 42)", key("pre"))
    runtime = Runtime(run, policy=POLICY, batch_size=100)
    await runtime.start()
    try:
        async with Coordinator(run, timeout=60) as client:
            done = [saga(writes(key(i), i)) for i in range(3)]
            for s in done:
                assert (await client.execute(s)).status == "completed"
            undone = saga(writes(key("undone"), 9), fail=True)
            overwrite = saga(writes(key(0), 100), fail=True)  # key(0) existed: its old value must come back
            delete = saga([ops.delete_row(TABLE, {"id": key(1)})], fail=True)  # the row must come back
            older = saga(writes(key("pre"), 7), fail=True)
            for s in (undone, overwrite, delete, older):
                assert (await client.execute(s)).status == "compensated"
    finally:
        await runtime.stop()
    yield Workload(run, [s.tx_id for s in done], undone.tx_id)
    await delete_topics(run)


async def polycommit_check(settings: Settings) -> tuple[int, dict[str, Any]]:
    env = {**os.environ, "POLYCOMMIT_QDRANT_EDGE_PATH": str(settings.qdrant.edge_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "polycommit.tooling.cli", "check", "--json", "--prefix", settings.topic_prefix),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode in (0, 1), f"exit {process.returncode}: {err.decode()}"
    return process.returncode, json.loads(out)


async def assert_exactly(settings: Settings, kind: str) -> None:
    code, report = await polycommit_check(settings)
    named = {k: n for k, n in report["classes"].items() if n}
    assert named == {kind: 1}, report
    assert report["violations"] == 1
    assert code == 1


async def pg(settings: Settings, sql: str, *args: Any) -> None:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def cypher(settings: Settings, query: str, **params: Any) -> None:
    cfg = settings.neo4j
    driver = AsyncGraphDatabase.driver(cfg.uri, auth=(cfg.user, cfg.password))
    try:
        async with driver.session() as session:
            await (await session.run(query, params)).consume()
    finally:
        await driver.close()


@pytest.fixture
async def copy(workload: Workload) -> AsyncIterator[Settings]:
    """The workload's log copied, record for record, under a prefix of its own: a topic plant goes there."""
    target = dataclasses.replace(workload.settings, topic_prefix=f"check-{RUN}-{uuid.uuid4().hex[:6]}")
    await create_topics(target)
    source, into = topics_for(workload.settings), topics_for(target)
    producer = AIOKafkaProducer(**client_security(target), acks="all")
    await producer.start()
    try:
        for name in ("intents", "outcomes", "results", "decisions", "dead_letters"):
            records: list[Any] = []
            await read_topic(workload.settings, getattr(source, name), records.append)
            for r in records:
                await producer.send_and_wait(getattr(into, name), r.value, key=r.key)
    finally:
        await producer.stop()
    yield target
    await delete_topics(target)


def strong(operations: list[Any]) -> Transaction:
    tx = Transaction(name="planted 2pc", consistency="STRONG")
    for op in operations:
        tx.add(op)
    return tx


async def publish_intent(settings: Settings, tx: Transaction) -> None:
    await publish(settings, topics_for(settings).intents, tx.tx_id, "TransactionIntent", tx.intent("", "planted"))


# -- the tests ---------------------------------------------------------------------------------------


async def test_a_clean_run_has_no_violation_in_any_class(workload: Workload) -> None:
    code, report = await polycommit_check(workload.settings)
    assert report["violations"] == 0, report
    assert set(report["classes"].values()) == {0}
    assert report["statuses"] == {"completed": 3, "compensated": 4}
    assert code == 0


async def test_a_deleted_row_of_a_completed_transaction_is_a_lost_write(workload: Workload) -> None:
    await pg(workload.settings, f"DELETE FROM {TABLE} WHERE id = $1", key(2))
    try:
        await assert_exactly(workload.settings, "effect-missing")
    finally:
        await pg(workload.settings, f"INSERT INTO {TABLE} (id, v) VALUES ($1, 2)", key(2))


async def test_a_compensated_row_inserted_again_is_an_undone_write_still_visible(workload: Workload) -> None:
    await pg(workload.settings, f"INSERT INTO {TABLE} (id, v) VALUES ($1, 9)", key("undone"))
    try:
        await assert_exactly(workload.settings, "effect-present-after-compensation")
    finally:
        await pg(workload.settings, f"DELETE FROM {TABLE} WHERE id = $1", key("undone"))


async def test_a_row_older_than_the_log_deleted_by_a_compensation_is_an_undone_write(workload: Workload) -> None:
    await pg(workload.settings, f"DELETE FROM {TABLE} WHERE id = $1", key("pre"))
    try:
        await assert_exactly(workload.settings, "effect-present-after-compensation")
    finally:
        await pg(workload.settings, f"INSERT INTO {TABLE} (id, v) VALUES ($1, 42)", key("pre"))


async def test_a_node_no_transaction_wrote_is_an_orphan(workload: Workload) -> None:
    await cypher(workload.settings, f"CREATE (:{LABEL} {{id: $id, v: 0}})", id=key("orphan"))
    try:
        await assert_exactly(workload.settings, "orphan")
    finally:
        await cypher(workload.settings, f"MATCH (n:{LABEL} {{id: $id}}) DELETE n", id=key("orphan"))


async def test_a_second_node_under_one_key_is_a_duplicate(workload: Workload) -> None:
    # The participant made a uniqueness constraint for this test's own label: drop it to plant the copy.
    cfg = workload.settings.neo4j
    driver = AsyncGraphDatabase.driver(cfg.uri, auth=(cfg.user, cfg.password))
    try:
        async with driver.session() as session:
            names = await (await session.run(f"SHOW CONSTRAINTS WHERE '{LABEL}' IN labelsOrTypes")).value("name")
            for name in names:
                await (await session.run(f"DROP CONSTRAINT `{name}`")).consume()
    finally:
        await driver.close()
    await cypher(workload.settings, f"CREATE (:{LABEL} {{id: $id, v: 2}})", id=key(2))
    try:
        await assert_exactly(workload.settings, "duplicate")
    finally:
        await cypher(workload.settings, f"MATCH (n:{LABEL} {{id: $id}}) WITH n LIMIT 1 DELETE n", id=key(2))


async def test_a_prepared_transaction_left_in_postgres_is_reported(workload: Workload) -> None:
    gid = f"pc_{workload.completed[0]}_0"
    conn = await asyncpg.connect(workload.settings.postgres.dsn)
    try:
        await conn.execute("BEGIN")
        await conn.execute(f"PREPARE TRANSACTION '{gid}'")
        try:
            await assert_exactly(workload.settings, "prepared-left")
        finally:
            await conn.execute(f"ROLLBACK PREPARED '{gid}'")
    finally:
        await conn.close()


async def test_a_step_outcome_applied_twice_is_reported(workload: Workload, copy: Settings) -> None:
    tx_id = workload.completed[1]
    outcome = {
        "tx_id": tx_id,
        "step_index": 0,
        "action": "EXECUTE",
        "attempt": 2,
        "store": "postgres",
        "status": "APPLIED",
        "before_image": '{"row": null}',
        "error": None,
        "at_ms": now_ms(),
        "duration_us": 1,
    }
    await publish(copy, topics_for(copy).outcomes, tx_id, "StepOutcome", outcome)
    await assert_exactly(copy, "applied-twice")


async def test_votes_with_no_decision_are_an_undecided_transaction(copy: Settings) -> None:
    tx = strong(writes(key("2pc-undecided"), 1)[:1])
    await publish_intent(copy, tx)
    vote = {
        "tx_id": tx.tx_id,
        "step_index": 0,
        "action": "PREPARE",
        "attempt": 1,
        "store": "postgres",
        "status": "PREPARED",
        "before_image": '{"row": null}',
        "error": None,
        "at_ms": now_ms(),
        "duration_us": 1,
    }
    await publish(copy, topics_for(copy).outcomes, tx.tx_id, "StepOutcome", vote)
    await assert_exactly(copy, "undecided")


async def test_a_commit_decision_without_phase_two_is_a_lost_commit(copy: Settings) -> None:
    tx = strong(writes(key("2pc-lost"), 1)[:1])
    await publish_intent(copy, tx)
    decision = {"tx_id": tx.tx_id, "outcome": "COMMIT", "participants": ["postgres"], "reason": "", "at_ms": now_ms()}
    await publish(copy, topics_for(copy).decisions, tx.tx_id, "Decision", decision)
    await assert_exactly(copy, "effect-missing")


async def test_a_stuck_transaction_is_its_own_class_and_its_keys_pending(workload: Workload, copy: Settings) -> None:
    tx = Transaction(name="planted stuck")
    tx.add(writes(key(0), 555)[0])  # key(0) now has a writer that never finished: not judged
    await publish_intent(copy, tx)
    result: dict[str, Any] = {
        "tx_id": tx.tx_id,
        "name": tx.name,
        "status": "STUCK",
        "steps": [],
        "error": None,
        "started_at_ms": now_ms(),
        "finished_at_ms": now_ms(),
    }
    await publish(copy, topics_for(copy).results, tx.tx_id, "TransactionResult", result)
    await pg(workload.settings, f"UPDATE {TABLE} SET v = 555 WHERE id = $1", key(0))
    try:
        await assert_exactly(copy, "stuck")
    finally:
        await pg(workload.settings, f"UPDATE {TABLE} SET v = 0 WHERE id = $1", key(0))


async def test_a_prefix_with_no_log_is_a_usage_error_in_one_line(workload: Workload) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "polycommit.tooling.cli", "check", "--json", "--prefix", f"nothing-{RUN}"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 2
    assert out == b""
    assert len(err.decode().strip().splitlines()) == 1, err
