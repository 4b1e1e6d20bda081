"""The checker as workloads use it (`check(settings, history)`, as chaos and the fault tests do), in-process.

The same plants as tests/fault's planted-violation test, without killing anything: a finished run is
clean, then each defect is named by its class. Also the before-image rule on a workload's history: a
compensated saga over a key that existed before leaves the old value, and that is clean.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from neo4j import AsyncGraphDatabase

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import create_topics, delete_topics
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.tooling.bench import LABEL, TABLE, prepare, writes
from polycommit.tooling.chaos import saga_of
from polycommit.tooling.checker import (
    COMPENSATED_IN_COMPLETED,
    CONFLICTING,
    EFFECT_MISSING,
    EFFECT_PRESENT,
    EFFECT_WRONG,
    HANGING,
    LOST,
    MISSING_EXECUTE,
    History,
    check,
)
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers
POLICY = SagaPolicy(default_timeout_ms=5000, backoff_base_ms=50, backoff_max_ms=500, compensation_retries=3)


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    edge = dataclasses.replace(settings.qdrant, edge_path=tmp_path / "edge")
    own = dataclasses.replace(settings, topic_prefix=f"checkh-{uuid.uuid4().hex[:8]}", qdrant=edge)
    await create_topics(own)
    await prepare(own)
    yield own
    await delete_topics(own)


async def test_the_checker_finds_violations_planted_in_the_stores(run: Settings) -> None:
    history = History()
    items = writes(f"h{uuid.uuid4().hex[:6]}", 7)
    completed = [saga_of(w) for w in items[:4]]
    doomed = saga_of(items[4]).step(ops.cypher("THIS IS NOT CYPHER"))
    lost = saga_of(items[5])
    # A compensated saga over a key a completed one wrote: the completed value must be back, and is.
    overwrite = saga_of(dataclasses.replace(items[0], value=-7)).step(ops.cypher("NOT CYPHER EITHER"))
    row_id = {s.tx_id: w.key for s, w in zip([*completed, doomed], items, strict=False)}
    runtime = Runtime(run, policy=POLICY, batch_size=100)
    await runtime.start()
    try:
        async with Coordinator(run, timeout=60) as client:
            for saga in [*completed, doomed, overwrite]:
                history.invoke(saga)
                history.record_result(await client.execute(saga))
    finally:
        await runtime.stop()
    assert history.final(doomed.tx_id) == history.final(overwrite.tx_id) == "compensated"
    clean = await check(run, history)
    assert clean.ok, clean.to_json()

    history.invoke(lost)
    a, b, c, d = (s.tx_id for s in completed)
    history.record(d, "compensated")
    conn = await asyncpg.connect(run.postgres.dsn)
    try:
        await conn.execute(f"UPDATE {TABLE} SET v = -1 WHERE id = $1", row_id[a])
        await conn.execute("DELETE FROM polycommit_steps WHERE tx_id = $1 AND step_index = 0", b)
        await conn.execute("INSERT INTO polycommit_steps (tx_id, step_index, action) VALUES ($1, 0, 'COMPENSATE')", c)
        await conn.execute(f"INSERT INTO {TABLE} (id, v) VALUES ($1, 0)", row_id[doomed.tx_id])
        await conn.execute(
            "UPDATE polycommit_steps SET applied_at = applied_at + $2 WHERE tx_id = $1 AND action = 'EXECUTE'",
            doomed.tx_id,
            datetime.timedelta(hours=1),
        )
    finally:
        await conn.close()
    cfg = run.neo4j
    driver = AsyncGraphDatabase.driver(cfg.uri, auth=(cfg.user, cfg.password))
    try:
        async with driver.session() as session:
            await (await session.run(f"MATCH (n:{LABEL} {{id: $id}}) DELETE n", id=row_id[c])).consume()
    finally:
        await driver.close()

    report = await check(run, history)
    found = {(v.tx_id, v.kind) for v in report.violations}
    assert found == {
        (lost.tx_id, LOST),
        (d, CONFLICTING),
        (a, EFFECT_WRONG),
        (b, MISSING_EXECUTE),
        (c, COMPENSATED_IN_COMPLETED),
        (c, EFFECT_MISSING),
        (doomed.tx_id, EFFECT_PRESENT),
        (doomed.tx_id, HANGING),
    }, report.to_json()
    assert report.statuses == {"completed": 3, "compensated": 3, "none": 1}
