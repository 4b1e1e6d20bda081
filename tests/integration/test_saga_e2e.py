"""Sagas end to end on the real servers: intents -> coordinator -> per-store consumer groups -> results.

The log decides: orders of compensations and retry delays are read back from the Kafka topics.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from runtimes import started_runtime

from consumers.worker import StoreWorker
from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import Outgoing, Publisher, client_security, read_topic, topic_partitions, topics_for
from polycommit.client import Coordinator, Saga
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.tooling import workload
from polycommit.tooling.inspect import transactions_in_flight
from polycommit.tooling.runtime import Runtime, participant_for

POLICY = SagaPolicy(default_timeout_ms=5000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    async with started_runtime(topics, policy=POLICY, batch_size=200) as rt:
        yield rt


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with Coordinator(runtime.settings, timeout=60) as coordinator:
        assert (await coordinator.execute(workload.create_customer(AUTHOR, "Author"))).status == "completed"
        yield coordinator


AUTHOR = f"author-{uuid.uuid4().hex[:8]}"


async def pg_fetch(settings: Settings, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()


async def log_records(settings: Settings, topic: str, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Decoded records of a topic (read to its current end) that `keep` selects, in log order."""
    codec = default_codec()
    found: list[dict[str, Any]] = []

    def handle(record: Any) -> None:
        try:
            value = codec.decode(record.value).record
        except CodecError:
            return  # poison records planted by the poison test
        if keep(value):
            found.append(value)

    await read_topic(settings, topic, handle)
    return found


async def test_a_three_store_saga_completes_and_every_store_shows_its_writes(
    runtime: Runtime, client: Coordinator
) -> None:
    customer, doc = f"c-{uuid.uuid4().hex[:8]}", f"d-{uuid.uuid4().hex[:8]}"
    assert (await client.execute(workload.create_customer(customer, "Ada"))).status == "completed"
    result = await client.execute(workload.ingest_document(doc, "Ledger", "double entry", customer))
    assert result.status == "completed", result
    assert [s.status for s in result.steps] == ["applied"] * 4
    row = await pg_fetch(runtime.settings, "SELECT title, customer_id FROM documents WHERE id = $1", doc)
    assert dict(row) == {"title": "Ledger", "customer_id": customer}
    points = await runtime.workers["qdrant"].participant.read_points(workload.DOCUMENTS, [ops.point_id(doc)])  # type: ignore[attr-defined]
    assert len(points) == 1
    neo4j = runtime.workers["neo4j"].participant
    assert (await neo4j.read_node("Document", {"id": doc}))["title"] == "Ledger"  # type: ignore[attr-defined]
    wrote = await neo4j.read_relationship(  # type: ignore[attr-defined]
        "WROTE", ops.node("Customer", {"id": customer}), ops.node("Document", {"id": doc})
    )
    assert wrote is not None


async def test_a_failing_third_step_compensates_step_two_then_step_one(runtime: Runtime, client: Coordinator) -> None:
    doc = f"d-{uuid.uuid4().hex[:8]}"
    before = await client.execute(workload.ingest_document(doc, "Original", "v1", AUTHOR))
    assert before.status == "completed"
    qdrant = runtime.workers["qdrant"].participant
    point_before = await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(doc)])  # type: ignore[attr-defined]
    saga = Saga("fails at step 3")  # declared in order: one step after the other, undone in reverse
    saga.step(ops.upsert_row("documents", {"id": doc}, {"title": "Changed"}))
    saga.step(
        ops.upsert_points("documents", [ops.point(doc, workload.embed("changed"), {"title": "Changed"})]), after=[0]
    )
    saga.step(ops.sql("UPDATE documents SET title = $1 WHERE id = $2 AND 1/0 = 1", ["Boom", doc]), after=[1])
    result = await client.execute(saga)
    assert result.status == "compensated", result
    assert [s.status for s in result.steps] == ["compensated", "compensated", "failed"]
    compensations = await log_records(
        runtime.settings,
        topics_for(runtime.settings).outcomes,
        lambda o: o["tx_id"] == saga.tx_id and o["action"] == "COMPENSATE",
    )
    # One partition per tx: log order is real order. The failed step is fenced first (a recorded no-op,
    # so the same intent sent again cannot apply it), then step 2 and step 1 are undone.
    assert [(o["step_index"], o["status"]) for o in compensations] == [(2, "NOOP"), (1, "APPLIED"), (0, "APPLIED")]
    row = await pg_fetch(runtime.settings, "SELECT title FROM documents WHERE id = $1", doc)
    assert row["title"] == "Original"
    assert await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(doc)]) == point_before  # type: ignore[attr-defined]


async def test_independent_steps_in_the_three_stores_are_sent_together(runtime: Runtime, client: Coordinator) -> None:
    doc = f"d-{uuid.uuid4().hex[:8]}"
    saga = Saga("parallel")
    saga.step(ops.upsert_row("documents", {"id": doc}, {"title": "Parallel"}))
    saga.step(ops.upsert_points("documents", [ops.point(doc, workload.embed("parallel"), {"title": "Parallel"})]))
    saga.step(ops.merge_node("Document", {"id": doc}, {"title": "Parallel"}))
    result = await client.execute(saga)
    assert result.status == "completed", result
    names = topics_for(runtime.settings)
    commands = []
    for store in ("postgres", "qdrant", "neo4j"):
        commands += await log_records(runtime.settings, names.commands(store), lambda c: c["tx_id"] == saga.tx_id)
    # One transition sent all three: the same coordinator step stamped them with the same time.
    assert sorted(c["step_index"] for c in commands) == [0, 1, 2]
    assert len({c["issued_at_ms"] for c in commands}) == 1
    row = await pg_fetch(runtime.settings, "SELECT title FROM documents WHERE id = $1", doc)
    assert row["title"] == "Parallel"
    points = await runtime.workers["qdrant"].participant.read_points(workload.DOCUMENTS, [ops.point_id(doc)])  # type: ignore[attr-defined]
    assert len(points) == 1
    assert (await runtime.workers["neo4j"].participant.read_node("Document", {"id": doc}))["title"] == "Parallel"  # type: ignore[attr-defined]


async def test_a_failing_step_with_the_others_applied_is_compensated_in_every_store(
    runtime: Runtime, client: Coordinator
) -> None:
    doc = f"d-{uuid.uuid4().hex[:8]}"
    assert (await client.execute(workload.ingest_document(doc, "Original", "v1", AUTHOR))).status == "completed"
    qdrant, neo4j = runtime.workers["qdrant"].participant, runtime.workers["neo4j"].participant
    point_before = await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(doc)])  # type: ignore[attr-defined]
    saga = Saga("fails in neo4j")
    saga.step(ops.upsert_row("documents", {"id": doc}, {"title": "Changed"}))  # 0
    saga.step(ops.upsert_points("documents", [ops.point(doc, workload.embed("x"), {"title": "Changed"})]))  # 1
    saga.step(ops.merge_node("Document", {"id": doc}, {"title": "Changed"}))  # 2
    saga.step(ops.cypher("RETURN 1 / 0 AS boom"))  # 3: neo4j, after step 2 (same store)
    result = await client.execute(saga)
    assert result.status == "compensated", result
    assert [s.status for s in result.steps] == ["compensated", "compensated", "compensated", "failed"]
    outcomes = await log_records(
        runtime.settings, topics_for(runtime.settings).outcomes, lambda o: o["tx_id"] == saga.tx_id
    )
    order = [(o["action"], o["step_index"]) for o in outcomes]
    # One partition per tx, so log order is real order: every execution settled before any compensation,
    # and the failed step 3 is fenced before step 2 (which it ran after) is undone.
    first_compensation = next(i for i, (action, _) in enumerate(order) if action == "COMPENSATE")
    assert {step for action, step in order[:first_compensation]} == {0, 1, 2, 3}
    assert all(action == "COMPENSATE" for action, _ in order[first_compensation:])
    assert order.index(("COMPENSATE", 3)) < order.index(("COMPENSATE", 2))
    row = await pg_fetch(runtime.settings, "SELECT title FROM documents WHERE id = $1", doc)
    assert row["title"] == "Original"
    assert await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(doc)]) == point_before  # type: ignore[attr-defined]
    assert (await neo4j.read_node("Document", {"id": doc}))["title"] == "Original"  # type: ignore[attr-defined]


async def test_a_step_that_fails_twice_is_retried_with_growing_delays(runtime: Runtime, client: Coordinator) -> None:
    sequence = f"flaky_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(runtime.settings.postgres.dsn)
    # nextval is not rolled back with the failing transaction, so it counts attempts across retries.
    await conn.execute(f"CREATE SEQUENCE {sequence}")
    await conn.execute(f"""CREATE OR REPLACE FUNCTION {sequence}() RETURNS void AS $$
        BEGIN IF nextval('{sequence}') <= 2 THEN
            RAISE EXCEPTION 'transient' USING ERRCODE = '40001'; END IF; END $$ LANGUAGE plpgsql""")
    await conn.close()
    saga = Saga("flaky").step(ops.sql(f"SELECT {sequence}()"), retries=3)
    result = await client.execute(saga)
    assert result.status == "completed", result
    assert result.steps[0].attempts == 3
    commands = await log_records(
        runtime.settings, topics_for(runtime.settings).commands("postgres"), lambda c: c["tx_id"] == saga.tx_id
    )
    issued = [c["issued_at_ms"] for c in commands]
    assert [c["attempt"] for c in commands] == [1, 2, 3]
    assert issued[2] - issued[1] > issued[1] - issued[0] >= POLICY.backoff_base_ms // 2


async def test_a_step_past_its_timeout_is_treated_as_failed(runtime: Runtime, client: Coordinator) -> None:
    doc = f"d-{uuid.uuid4().hex[:8]}"
    saga = Saga("slow")
    saga.step(ops.upsert_row("documents", {"id": doc}, {"title": "t"}))
    saga.step(ops.sql("SELECT pg_sleep(2)"), timeout=0.3)
    result = await client.execute(saga)
    assert result.status == "compensated", result
    assert result.steps[1].error is not None and "StepTimeout" in result.steps[1].error
    assert await pg_fetch(runtime.settings, "SELECT id FROM documents WHERE id = $1", doc) is None


async def test_a_compensation_that_always_fails_ends_stuck_and_is_listed(runtime: Runtime, client: Coordinator) -> None:
    saga = Saga("cannot undo")
    saga.step(ops.sql("SELECT 1"), compensate=ops.sql("SELECT 1/0"))
    saga.step(ops.sql("SELECT * FROM no_such_table"))
    result = await client.execute(saga)
    assert result.status == "stuck", result
    assert result.steps[0].status == "compensation_failed"
    assert result.steps[0].compensation_attempts >= POLICY.compensation_retries

    async def listed() -> None:
        while True:
            state = await transactions_in_flight(runtime.settings)
            if state.get(saga.tx_id, {}).get("phase") == "stuck":  # type: ignore[call-overload]
                return

    await asyncio.wait_for(listed(), 30)
    alerts = await log_records(
        runtime.settings, topics_for(runtime.settings).alerts, lambda a: a["tx_id"] == saga.tx_id
    )
    assert [a["kind"] for a in alerts][:1] == ["stuck"]
    # What an operator sees: `polycommit status --json` lists it, and exits 1 while anything is stuck.
    env = {**os.environ, "POLYCOMMIT_TOPIC_PREFIX": runtime.settings.topic_prefix}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "polycommit.tooling.cli", "status", "--json", env=env, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 1
    assert saga.tx_id in {row["tx_id"] for row in json.loads(stdout)["stuck"]}


async def test_a_compensation_before_its_execute_leaves_the_store_untouched(runtime: Runtime) -> None:
    settings = runtime.settings
    names = topics_for(settings)
    tx, doc = str(uuid.uuid4()), f"d-{uuid.uuid4().hex[:8]}"
    op = ops.upsert_row("documents", {"id": doc}, {"title": "late"})
    base = {
        "tx_id": tx,
        "step_index": 0,
        "attempt": 1,
        "operation": op,
        "compensation": None,
        "before_image": None,
        "issued_at_ms": 0,
    }
    publisher = Publisher(settings)
    await publisher.start()
    try:
        await publisher.publish_and_wait(
            [
                Outgoing(names.commands("postgres"), tx, "StoreCommand", {**base, "action": "COMPENSATE"}),
                Outgoing(names.commands("postgres"), tx, "StoreCommand", {**base, "action": "EXECUTE"}),
            ]
        )
    finally:
        await publisher.stop()

    async def both() -> list[dict[str, Any]]:
        while True:
            found = await log_records(settings, names.outcomes, lambda o: o["tx_id"] == tx)
            if len(found) >= 2:
                return found

    outcomes = await asyncio.wait_for(both(), 30)
    assert [(o["action"], o["status"]) for o in outcomes] == [("COMPENSATE", "NOOP"), ("EXECUTE", "SKIPPED")]
    assert await pg_fetch(settings, "SELECT id FROM documents WHERE id = $1", doc) is None


async def test_poison_records_become_dead_letters_and_later_work_completes(
    runtime: Runtime, client: Coordinator
) -> None:
    settings = runtime.settings
    names = topics_for(settings)
    codec = default_codec()
    publisher = Publisher(settings)
    await publisher.start()
    good_alert = codec.encode("Alert", {"kind": "x", "tx_id": "x", "message": "", "at_ms": 0})
    unknown_schema = good_alert[:2] + b"\x01\x02\x03\x04\x05\x06\x07\x08" + good_alert[10:]
    poisons: list[tuple[str, str]] = []  # (topic, key) of every poison record planted
    try:
        # Raw garbage and unknown schemas on the intents topic and on every command topic, on every partition.
        raw = []
        for topic in [names.intents, *(names.commands(s) for s in ("postgres", "qdrant", "neo4j"))]:
            for partition in await publisher.partitions(topic):
                for label, value in (("random", uuid.uuid4().bytes * 3), ("unknown-schema", unknown_schema)):
                    key = f"poison-{label}-{uuid.uuid4().hex[:6]}"
                    raw.append(Outgoing(topic, key, "", None, partition=partition))
                    poisons.append((topic, key))
                    await publisher.producer.send_and_wait(topic, value, key=key.encode(), partition=partition)
        # Invalid operations inside well-formed intents.
        bad_sagas = {
            "wrong vector size": Saga("bad").step(ops.upsert_points("documents", [ops.point(1, [0.1, 0.2])])),
            "unknown store": Saga("bad").step({**ops.upsert_row("documents", {"id": "x"}, {}), "store": "mongodb"}),
            "sql syntax": Saga("bad").step(ops.sql("SELEKT nothing")),
            "2 MiB payload": Saga("bad").step(
                ops.upsert_row("documents", {"id": "big"}, {"title": "x", "body": "x" * (2 * 1024 * 1024)})
            ),
        }
        results = {name: await client.execute(s) for name, s in bad_sagas.items()}
    finally:
        await publisher.stop()
    assert {name: r.status for name, r in results.items()} == {
        "wrong vector size": "compensated",
        "unknown store": "failed",
        "sql syntax": "compensated",
        "2 MiB payload": "failed",
    }
    # Work published after the poison, on the same partitions, still completes.
    later = [workload.ingest_document(f"d-{uuid.uuid4().hex[:8]}", "after poison", "", AUTHOR) for _ in range(8)]
    assert {r.status for r in await client.execute_many(later)} == {"completed"}

    poisoned_keys = {key for _, key in poisons}
    bad_ids = {s.tx_id for s in bad_sagas.values()}

    async def letters() -> list[dict[str, Any]]:
        while True:
            found = await log_records(
                settings,
                names.dead_letters,
                lambda d: (d["key"] or b"").decode() in poisoned_keys or d["tx_id"] in bad_ids,
            )
            if len(found) >= len(poisons) + len(bad_sagas):
                return found

    found = await asyncio.wait_for(letters(), 30)
    assert len(found) == len(poisons) + len(bad_sagas)  # exactly one dead letter per poison record
    classes = {d["tx_id"]: d["error_class"] for d in found if d["tx_id"] in bad_ids}
    assert classes[bad_sagas["unknown store"].tx_id] == "UnknownStoreError"
    assert classes[bad_sagas["2 MiB payload"].tx_id] == "PayloadTooLargeError"
    assert classes[bad_sagas["wrong vector size"].tx_id] == "InvalidOperationError"
    unreadable = [d for d in found if d["tx_id"] not in bad_ids]
    assert {d["error_class"] for d in unreadable} == {"CorruptEventError", "UnknownSchemaError"}
    assert {d["tx_id"] for d in unreadable} == poisoned_keys  # named by their key, the transaction id by convention


async def test_redelivering_every_command_from_offset_zero_changes_nothing(
    runtime: Runtime, client: Coordinator
) -> None:
    settings = runtime.settings
    customer, doc = f"c-{uuid.uuid4().hex[:8]}", f"d-{uuid.uuid4().hex[:8]}"
    results = [
        await client.execute(workload.create_customer(customer, "Grace")),
        await client.execute(workload.ingest_document(doc, "First", "", customer)),
        await client.execute(workload.ingest_document(doc, "Second", "", customer)),  # a replay must not undo it
    ]
    # This test's markers only: other sessions sharing the database write markers meanwhile. (Every other
    # command of the session is judged by the replay itself: it must apply none.)
    tx_ids = [r.tx_id for r in results]

    async def snapshot() -> tuple[Any, ...]:
        qdrant = runtime.workers["qdrant"].participant
        neo4j = runtime.workers["neo4j"].participant
        row = await pg_fetch(settings, "SELECT * FROM documents WHERE id = $1", doc)
        markers = await pg_fetch(settings, "SELECT count(*) AS n FROM polycommit_steps WHERE tx_id = ANY($1)", tx_ids)
        return (
            dict(row),
            markers["n"],
            await qdrant.read_points(workload.DOCUMENTS, [ops.point_id(doc)]),  # type: ignore[attr-defined]
            await neo4j.read_node("Document", {"id": doc}),  # type: ignore[attr-defined]
        )

    before = await snapshot()
    assert before[0]["title"] == "Second"
    await runtime.stop()  # the Qdrant Edge shard allows one opener: free it for the replaying group
    try:
        await replay_every_command(settings)
    finally:
        await runtime.start()
    assert await snapshot() == before


async def replay_every_command(settings: Settings) -> None:
    """Fresh consumer groups (offset 0) for every store: each re-reads and re-handles every command."""
    names = topics_for(settings)
    reader = AIOKafkaConsumer(**client_security(settings), group_id=None)
    await reader.start()
    ends = {}
    try:
        for store in ("postgres", "qdrant", "neo4j"):
            topic = names.commands(store)
            ends[store] = await reader.end_offsets(await topic_partitions(reader, topic))
    finally:
        await reader.stop()
    stop = asyncio.Event()
    workers = [
        StoreWorker(settings, participant_for(store, settings), group_id=f"replay-{uuid.uuid4().hex}") for store in ends
    ]
    tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
    try:
        await asyncio.wait_for(asyncio.gather(*(w.caught_up(ends[w.store]) for w in workers)), 120)
        assert sum(w.stats.outcomes.get("APPLIED", 0) for w in workers) == 0, [w.stats for w in workers]
        assert sum(w.stats.outcomes.get("ALREADY_APPLIED", 0) for w in workers) > 0
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_the_module_level_transaction_shape_commits_on_exit(runtime: Runtime) -> None:
    import polycommit

    doc = f"d-{uuid.uuid4().hex[:8]}"
    async with polycommit.transaction(runtime.settings, name="module shape") as tx:
        tx.postgres.upsert("documents", key={"id": doc}, values={"title": "via polycommit.transaction"})
        tx.neo4j.merge_node("Document", key={"id": doc}, properties={"title": "via polycommit.transaction"})
    assert tx.result is not None and tx.result.status == "completed"
    row = await pg_fetch(runtime.settings, "SELECT title FROM documents WHERE id = $1", doc)
    assert row["title"] == "via polycommit.transaction"


async def test_an_exception_inside_the_block_publishes_nothing(runtime: Runtime, client: Coordinator) -> None:
    doc = f"d-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError):
        async with client.transaction(name="aborted") as tx:
            tx.postgres.upsert("documents", key={"id": doc}, values={"title": "never"})
            raise RuntimeError("the application changed its mind")
    assert tx.result is None
    assert await pg_fetch(runtime.settings, "SELECT id FROM documents WHERE id = $1", doc) is None
    assert tx.tx_id not in await transactions_in_flight(runtime.settings)


async def test_an_intent_sent_again_after_its_saga_ended_cannot_change_the_outcome(
    runtime: Runtime, client: Coordinator
) -> None:
    sequence, doc = f"once_{uuid.uuid4().hex[:8]}", f"d-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(runtime.settings.postgres.dsn)
    await conn.execute(f"CREATE SEQUENCE {sequence}")
    await conn.execute(f"""CREATE OR REPLACE FUNCTION {sequence}() RETURNS void AS $$
        BEGIN IF nextval('{sequence}') <= 1 THEN RAISE EXCEPTION 'fails the first time only'; END IF; END $$
        LANGUAGE plpgsql""")
    await conn.close()
    saga = Saga("fails once").step(ops.sql(f"SELECT {sequence}()"))
    saga.step(ops.upsert_row("documents", {"id": doc}, {"title": "must not appear"}))
    first = await client.execute(saga)
    assert first.status == "compensated", first
    again = await client.execute(saga)  # the same intent (same tx id): a client retry, or a topic replay
    assert again.status == "compensated", again
    assert await pg_fetch(runtime.settings, "SELECT id FROM documents WHERE id = $1", doc) is None
