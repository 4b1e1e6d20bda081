"""Sagas on shared keys, on the real servers: the semantic lock keeps a compensating saga from undoing a
later saga's writes, and without it (both opted out) the later saga's writes are lost.

Saga A writes one row, one point and one node, then runs a raw statement that waits on a PostgreSQL
advisory lock the test holds and then fails (division by zero): A stays in flight, holding its keys,
exactly as long as the test wants, with no sleep and no timing guess. Saga B writes the same three keys.
Every wait below follows the log (lock events, commands, outcomes) with a deadline.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from log_follow import follow
from runtimes import started_runtime

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import topics_for
from polycommit.client import Coordinator, Saga, Transaction, TransactionResult
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.lock_log import expand
from polycommit.tooling import workload
from polycommit.tooling.checker import EFFECT_WRONG, History, check
from polycommit.tooling.runtime import Runtime

POLICY = SagaPolicy(default_timeout_ms=30_000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
WAIT_S = 60.0
pytestmark = pytest.mark.servers

# The failing step: it takes the advisory lock the test holds (so it waits for the test), then divides by
# zero (not retriable): the saga compensates. The division reads the lock's result column, so the
# planner cannot fold it into a constant and fail before the lock is taken.
HELD_THEN_FAIL = "SELECT 1 / length(held::text || '') FROM pg_advisory_xact_lock($1) AS held"


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    async with started_runtime(topics, policy=POLICY, batch_size=200) as rt:
        yield rt


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with Coordinator(runtime.settings, timeout=WAIT_S) as coordinator:
        yield coordinator


def write(saga: Saga, doc: str, title: str, stores: tuple[str, ...] = ("postgres", "qdrant", "neo4j")) -> Saga:
    for store in stores:
        if store == "postgres":
            saga.step(ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": title}))
        elif store == "qdrant":
            point = ops.point(doc, workload.embed(title), {"title": title})
            saga.step(ops.upsert_points(workload.DOCUMENTS, [point]))
        else:
            saga.step(ops.merge_node("Document", {"id": doc}, {"title": title}))
    return saga


async def titles(runtime: Runtime, doc: str) -> tuple[Any, Any, Any]:
    """The title each store holds for `doc` (PostgreSQL row, Qdrant payload, Neo4j node)."""
    conn = await asyncpg.connect(runtime.settings.postgres.dsn)
    try:
        row = await conn.fetchrow("SELECT title FROM documents WHERE id = $1", doc)
    finally:
        await conn.close()
    qdrant = runtime.workers["qdrant"].participant
    points = await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(doc)])  # type: ignore[attr-defined]
    node = await runtime.workers["neo4j"].participant.read_node("Document", {"id": doc})  # type: ignore[attr-defined]
    point = next(iter(points.values()), None)
    return (row and row["title"], point and point["payload"].get("title"), node and node.get("title"))


def lock(tx_id: str, action: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["tx_id"] == tx_id and e["action"] == action


def applied(tx_id: str, step: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["tx_id"] == tx_id and e["step_index"] == step and e["status"] == "APPLIED"


class AdvisoryLock:
    """A PostgreSQL advisory lock the test holds while a saga's step waits for it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key = uuid.uuid4().int % 2**62
        self.conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> AdvisoryLock:
        self.conn = await asyncpg.connect(self.settings.postgres.dsn)
        await self.conn.execute("SELECT pg_advisory_lock($1)", self.key)
        return self

    async def release(self) -> None:
        if self.conn is not None:
            await self.conn.close()  # ends the session, and with it the lock
            self.conn = None

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def failing_step(self) -> Any:
        return ops.sql(HELD_THEN_FAIL, [self.key])


async def seeded(client: Coordinator, doc: str) -> None:
    assert (await client.execute(write(Saga("seed"), doc, "v0"))).status == "completed"


async def checked(runtime: Runtime, results: list[tuple[Transaction, TransactionResult]]) -> list[Any]:
    """The checker's violations for these transactions (keys shared with the seed: not owned)."""
    history = History()
    for transaction, result in results:
        history.invoke(transaction)
        history.record(transaction.tx_id, result.status)
    qdrant = runtime.workers["qdrant"].participant
    report = await check(runtime.settings, history, qdrant=qdrant, keys_owned=False)  # type: ignore[arg-type]
    return report.violations


def second_writer(kind: str, doc: str) -> tuple[Transaction, str]:
    """B, writing the same three keys as A: a saga, or a two-phase commit (one lock table for both); and
    the status it ends with."""
    saga = write(Saga("B"), doc, "B")
    if kind == "saga":
        return saga, "completed"
    strong = Transaction(name="B", consistency="STRONG")
    for step in saga.steps:
        strong.add(step["operation"])
    return strong, "committed"


@pytest.mark.parametrize("kind", ["saga", "2pc"])
async def test_a_transaction_waits_for_the_keys_of_a_saga_in_flight_and_its_writes_survive_the_compensation(
    runtime: Runtime, client: Coordinator, kind: str
) -> None:
    """B (a saga, or a STRONG transaction: nothing prepared while it waits) waits for A's keys until A
    ends, so A's compensation cannot put its before-images over B's writes."""
    doc = f"lk-{uuid.uuid4().hex[:8]}"
    await seeded(client, doc)
    settings, topics = runtime.settings, topics_for(runtime.settings)
    async with AdvisoryLock(settings) as held:
        first = write(Saga("A"), doc, "A").step(held.failing_step(), timeout=WAIT_S)
        second, ends = second_writer(kind, doc)
        first_result = await client.submit(first)
        await follow(settings, topics.locks, "LockEvent", lock(first.tx_id, "GRANTED"))
        second_result = await client.submit(second)
        waiting = await follow(settings, topics.locks, "LockEvent", lock(second.tx_id, "WAITING"))
        assert waiting["blockers"] == [first.tx_id]
        await follow(settings, topics.outcomes, "StepOutcome", applied(first.tx_id, 2))
        assert await titles(runtime, doc) == ("A", "A", "A")  # A's writes are in, B's wait
        await held.release()  # A's last step fails now: A compensates, then B runs
        a, b = await asyncio.wait_for(asyncio.gather(first_result, second_result), WAIT_S)
    assert (a.status, b.status) == ("compensated", ends), (a, b)
    assert await titles(runtime, doc) == ("B", "B", "B")  # B's writes survived A's compensation everywhere
    released = await follow(settings, topics.locks, "LockEvent", lock(first.tx_id, "RELEASED"))
    granted = await follow(settings, topics.locks, "LockEvent", lock(second.tx_id, "GRANTED"))
    assert granted["at_ms"] >= released["at_ms"]
    assert await checked(runtime, [(first, a), (second, b)]) == []


async def test_without_locks_a_compensation_undoes_a_later_sagas_completed_writes(
    runtime: Runtime, client: Coordinator
) -> None:
    """The anomaly the locks prevent (so the test above can fail): B completes between A's writes and
    A's compensation, which puts back the before-images A recorded, over B's writes."""
    doc = f"nl-{uuid.uuid4().hex[:8]}"
    await seeded(client, doc)
    settings, topics = runtime.settings, topics_for(runtime.settings)
    async with AdvisoryLock(settings) as held:
        first = write(Saga("A", locks=False), doc, "A").step(held.failing_step(), timeout=WAIT_S)
        # B's PostgreSQL write last: the PostgreSQL consumer is busy with A's waiting step meanwhile.
        second = write(Saga("B", locks=False), doc, "B", ("qdrant", "neo4j", "postgres"))
        first_result = await client.submit(first)
        await follow(settings, topics.outcomes, "StepOutcome", applied(first.tx_id, 2))
        second_result = await client.submit(second)
        row_command = lambda c: c["tx_id"] == second.tx_id and c["step_index"] == 2  # noqa: E731
        await follow(settings, topics.commands("postgres"), "StoreCommand", row_command)
        await held.release()
        a, b = await asyncio.wait_for(asyncio.gather(first_result, second_result), WAIT_S)
    assert (a.status, b.status) == ("compensated", "completed"), (a, b)
    stores = await titles(runtime, doc)
    assert stores != ("B", "B", "B"), stores  # B completed, yet its writes are gone from some store
    assert "v0" in stores  # A's before-image, put back over B's write
    violations = await checked(runtime, [(first, a), (second, b)])
    assert any(v.kind == EFFECT_WRONG and v.tx_id == second.tx_id for v in violations), violations


async def test_a_lock_wait_past_its_timeout_fails_the_saga_with_nothing_run(
    runtime: Runtime, client: Coordinator
) -> None:
    doc = f"lt-{uuid.uuid4().hex[:8]}"
    await seeded(client, doc)
    async with AdvisoryLock(runtime.settings) as held:
        first = write(Saga("A"), doc, "A").step(held.failing_step(), timeout=WAIT_S)
        first_result = await client.submit(first)
        await follow(runtime.settings, topics_for(runtime.settings).locks, "LockEvent", lock(first.tx_id, "GRANTED"))
        impatient = write(Saga("B", lock_wait=0.3), doc, "B")
        b = await client.execute(impatient)
        assert b.status == "failed" and b.error is not None and b.error.startswith("LockTimeoutError"), b
        assert first.tx_id in b.error
        assert all(s.attempts == 0 and s.status == "pending" for s in b.steps)
        await held.release()
        a = await asyncio.wait_for(first_result, WAIT_S)
    assert a.status == "compensated"
    assert await titles(runtime, doc) == ("v0", "v0", "v0")  # B never ran; A was undone
    markers = await runtime.workers["postgres"].participant.markers_of(impatient.tx_id)  # type: ignore[attr-defined]
    assert not markers  # nothing of B reached PostgreSQL


async def test_execute_with_retries_runs_a_lock_timed_out_saga_again_until_the_keys_are_free(
    runtime: Runtime, client: Coordinator
) -> None:
    """B's first attempt gives up waiting for A's keys (nothing of it ran); `execute(retries=...)` runs
    the same steps again as new transactions until A has ended, and B completes."""
    doc = f"lr-{uuid.uuid4().hex[:8]}"
    await seeded(client, doc)
    settings, topics = runtime.settings, topics_for(runtime.settings)
    attempts: list[TransactionResult] = []
    async with AdvisoryLock(settings) as held:
        first = write(Saga("A"), doc, "A").step(held.failing_step(), timeout=WAIT_S)
        first_result = await client.submit(first)
        await follow(settings, topics.locks, "LockEvent", lock(first.tx_id, "GRANTED"))
        impatient = write(Saga("B", lock_wait=0.3), doc, "B")
        retrying = asyncio.create_task(client.execute(impatient, retries=200, attempts=attempts))
        timed_out = await follow(settings, topics.results, "TransactionResult", lambda r: r["tx_id"] == impatient.tx_id)
        assert timed_out["status"] == "FAILED" and timed_out["error"]["error_class"] == "LockTimeoutError"
        await held.release()
        assert (await asyncio.wait_for(first_result, WAIT_S)).status == "compensated"
        b = await asyncio.wait_for(retrying, WAIT_S)
    assert b.status == "completed" and b.tx_id != impatient.tx_id  # a new transaction, the same steps
    assert all(r.error_class == "LockTimeoutError" for r in attempts[:-1]) and attempts[-1] is b
    assert await titles(runtime, doc) == ("B", "B", "B")


async def test_execute_does_not_run_again_what_a_new_attempt_would_meet_too(
    runtime: Runtime, client: Coordinator
) -> None:
    attempts: list[TransactionResult] = []
    bad = Saga("bad").step(ops.sql("SELECT 1 / 0"), compensate=ops.sql("SELECT 1"))
    result = await client.execute(bad, retries=5, attempts=attempts)
    assert result.status in ("failed", "compensated") and attempts == [result]


async def test_a_saga_on_free_keys_is_granted_its_locks_at_once(runtime: Runtime, client: Coordinator) -> None:
    doc = f"lf-{uuid.uuid4().hex[:8]}"
    saga = write(Saga("free"), doc, "free")
    result = await client.execute(saga)
    assert result.status == "completed"
    released = await follow(
        runtime.settings, topics_for(runtime.settings).locks, "LockEvent", lock(saga.tx_id, "RELEASED")
    )
    events = await lock_history(runtime.settings, saga.tx_id)
    actions = [e["action"] for e in events]
    assert actions == ["GRANTED"] * 3 + ["RELEASED"] * 3, actions  # no WAITING
    assert len({e["at_ms"] for e in events if e["action"] == "GRANTED"}) == 1  # one transition: at start
    # The release is one record about the three keys (the default single partition of the lock events).
    assert sorted([released["resource"], *released["also"]]) == sorted(e["resource"] for e in events[3:])
    assert dict(expand(released)[0]) in events


async def lock_history(settings: Settings, tx_id: str) -> list[dict[str, Any]]:
    from polycommit.bus import read_topic

    codec, found = default_codec(), list[dict[str, Any]]()

    def take(record: Any) -> None:
        try:
            events = expand(codec.decode_as(record.value, "LockEvent"))
        except CodecError:
            return
        found.extend(dict(event) for event in events if event["tx_id"] == tx_id)

    await read_topic(settings, topics_for(settings).locks, take)
    return sorted(found, key=lambda e: (e["action"] != "GRANTED", e["at_ms"]))
