"""Two-phase commit survives kill -9 of its own processes at each of its failpoints.

The coordinator and the three store consumers run as subprocesses (`polycommit.tooling.processes.Cluster`);
one is armed with `POLYCOMMIT_FAILPOINT` and SIGKILLs itself between two protocol steps. It is started
again without the failpoint, every result is awaited, and then: every transaction is decided (one
decision, the same as its result), the stores agree with the decision (all three writes present when
committed, none when aborted), and no prepared PostgreSQL transaction of ours is left. Only polycommit's
own processes are killed: the broker and the servers are never touched.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from neo4j import AsyncGraphDatabase

from consumers.postgres import twophase
from consumers.qdrant import QdrantParticipant
from fault.fault_runs import fault_run
from polycommit import operations as ops
from polycommit.bus import read_topic, topics_for
from polycommit.client import Coordinator, Saga, TransactionResult
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.failpoints import TWO_PHASE_ONLY
from polycommit.tooling.bench import COLLECTION, LABEL, TABLE, Write, saga_of, writes
from polycommit.tooling.inspect import transactions_in_flight
from polycommit.tooling.processes import Cluster

pytestmark = pytest.mark.servers

TRANSACTIONS = 20
DEATH_DEADLINE_S = 60.0
# Failpoints only an aborting transaction reaches: their workload has one in four with a vector of the
# wrong size, so Qdrant votes no, the decision is ABORT, and PostgreSQL's batch holding it rolls back.
NEEDS_ABORTS = frozenset({"postgres.after_batch_rollback"})
RESULTS_DEADLINE_S = 120.0

CASES: list[tuple[str, str]] = [
    ("postgres.after_prepare", "postgres"),
    ("neo4j.after_validate", "neo4j"),
    ("qdrant.between_points_and_marker", "qdrant"),  # reached by the COMMIT write-set
    ("postgres.phase2", "postgres"),
    ("postgres.after_batch_rollback", "postgres"),  # reached by an ABORT (a bad vector) in a prepared batch
    ("neo4j.phase2", "neo4j"),
    ("qdrant.phase2", "qdrant"),
    ("coordinator.after_decision:2", "coordinator"),  # its second decision: others are in flight
]


def test_every_two_phase_failpoint_has_a_case() -> None:
    covered = {spec.split(":")[0] for spec, _ in CASES}
    assert covered >= TWO_PHASE_ONLY


@pytest.fixture
async def fault_settings(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    async with fault_run(settings, tmp_path, "fault2pc") as run:
        yield run


async def decisions(settings: Settings) -> dict[str, list[str]]:
    codec = default_codec()
    found: dict[str, list[str]] = {}

    def take(record: Any) -> None:
        d = codec.decode_as(record.value, "Decision")
        found.setdefault(d["tx_id"], []).append(d["outcome"])

    await read_topic(settings, topics_for(settings).decisions, take)
    return found


async def stores(settings: Settings, items: Sequence[Write]) -> dict[str, tuple[bool, bool, bool]]:
    """Per key: (row, point, node) present."""
    keys = [w.key for w in items]
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        rows = {r[0] for r in await conn.fetch(f"SELECT id FROM {TABLE} WHERE id = ANY($1::text[])", keys)}
    finally:
        await conn.close()
    driver = AsyncGraphDatabase.driver(settings.neo4j.uri, auth=(settings.neo4j.user, settings.neo4j.password))
    try:
        async with driver.session() as session:
            result = await session.run(f"MATCH (n:{LABEL}) WHERE n.id IN $ids RETURN n.id AS id", ids=keys)
            nodes = {r["id"] for r in await result.data()}
    finally:
        await driver.close()
    qdrant = QdrantParticipant(settings)
    await qdrant.start()
    try:
        points = set(await qdrant.read_points(COLLECTION, [ops.point_id(k) for k in keys]))
    finally:
        await qdrant.close()
    return {k: (k in rows, ops.point_id(k) in points, k in nodes) for k in keys}


async def our_prepared(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        space = twophase.space_of(settings.topic_prefix)
        return [r[0] for r in await conn.fetch(twophase.PREPARED_GIDS, f"{twophase.GID_PREFIX}{space}_")]
    finally:
        await conn.close()


async def await_all(
    settings: Settings, futures: Sequence[asyncio.Future[TransactionResult]]
) -> list[TransactionResult]:
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), RESULTS_DEADLINE_S))
    except TimeoutError:
        waiting = {
            tx: (s["phase"], [step["status"] for step in s["steps"]])
            for tx, s in (await transactions_in_flight(settings)).items()
        }
        missing = [f for f in futures if not f.done() or f.cancelled()]
        raise AssertionError(
            f"{len(missing)} results missing after {RESULTS_DEADLINE_S}s; in flight in the log: {waiting}"
        ) from None


async def in_two_waves(
    client: Coordinator, cluster: Cluster, owner: str, transactions: list[Saga]
) -> list[asyncio.Future[Any]]:
    """Half the transactions, then the other half once one of the first ended (or the owner died): the
    coordinator decides the waves in different loops, so a failpoint's second hit (`:2`) is reached even
    when a whole wave's votes arrive in one batch and are decided in one Kafka transaction."""
    half = len(transactions) // 2
    futures = [await client.submit(t) for t in transactions[:half]]
    first = asyncio.ensure_future(asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED))
    died = asyncio.ensure_future(cluster[owner].exited())
    await asyncio.wait([first, died], timeout=DEATH_DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
    for waiting in (first, died):
        waiting.cancel()
    return futures + [await client.submit(t) for t in transactions[half:]]


@pytest.mark.parametrize(("spec", "owner"), CASES, ids=[f"{s}@{o}" for s, o in CASES])
async def test_a_process_killed_at_a_two_phase_failpoint_ends_decided_and_consistent(
    fault_settings: Settings, tmp_path: Path, spec: str, owner: str
) -> None:
    cluster = Cluster(fault_settings, tmp_path / "logs", supervise=False)
    items = writes(f"t{uuid.uuid4().hex[:6]}", TRANSACTIONS)
    if spec in NEEDS_ABORTS:
        items = [Write(w.key, w.value, w.vector[:-1]) if i % 4 == 1 else w for i, w in enumerate(items)]
    transactions: list[Saga] = [saga_of(w, mode="2pc") for w in items]
    await cluster.start({owner: spec})
    try:
        async with Coordinator(fault_settings, timeout=300) as client:
            futures = await in_two_waves(client, cluster, owner, transactions)
            code = await cluster[owner].exited(DEATH_DEADLINE_S)
            assert code == -signal.SIGKILL, f"{owner} exited with {code}, not by its failpoint {spec}"
            await cluster.restart(owner)
            results = await await_all(fault_settings, futures)
    finally:
        codes = await cluster.stop()
    assert codes == dict.fromkeys(cluster.names, 0), f"unclean exits {codes}; logs in {cluster.log_dir}"
    statuses = {r.tx_id: r.status for r in results}
    assert set(statuses.values()) <= {"committed", "aborted"}, statuses
    decided = await decisions(fault_settings)
    present = await stores(fault_settings, items)
    for tx, write in zip(transactions, items, strict=True):
        expected = "COMMIT" if statuses[tx.tx_id] == "committed" else "ABORT"
        assert decided.get(tx.tx_id) == [expected], (tx.tx_id, decided.get(tx.tx_id), statuses[tx.tx_id])
        want = statuses[tx.tx_id] == "committed"
        assert present[write.key] == (want, want, want), (write.key, statuses[tx.tx_id], present[write.key])
    assert await our_prepared(fault_settings) == []
    assert "committed" in statuses.values()
