"""The Neo4j participant against the real server: markers, before-images, compensation, batches, restart.

These tests need the Neo4j that `scripts/services start neo4j` runs; when it is down they fail (the
participant fixture raises StoreUnavailableError), they never skip. Every test uses its own keys (a uuid
suffix), so tests and other sessions sharing the server do not see each other's nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from neo4j.exceptions import Neo4jError

from consumers.neo4j import MARKER_LABEL, Neo4jParticipant, classify
from polycommit import operations as ops
from polycommit.config import Settings, load_settings
from polycommit.errors import StoreError, StoreUnavailableError
from polycommit.events import Operation, StepAction, StepOutcome, StoreCommand, store_command
from polycommit.tooling import services as svc

pytestmark = pytest.mark.servers

LABEL = "PolycommitTestItem"
OTHER = "PolycommitTestOwner"
REL = "POLYCOMMIT_TEST_OWNS"


@pytest.fixture(scope="session")
async def participant(settings: Settings) -> AsyncIterator[Neo4jParticipant]:
    p = Neo4jParticipant(settings)
    await p.start()
    yield p
    await p.close()


def uid() -> str:
    return uuid.uuid4().hex


def command(
    op: Operation,
    action: StepAction = "EXECUTE",
    *,
    tx_id: str | None = None,
    step: int = 0,
    compensation: Operation | None = None,
) -> StoreCommand:
    return store_command(tx_id or f"tx-{uid()}", step, action, op, compensation=compensation)


def undo(cmd: StoreCommand) -> StoreCommand:
    """The COMPENSATE of the same step."""
    return {**cmd, "action": "COMPENSATE"}


async def apply_one(p: Neo4jParticipant, cmd: StoreCommand) -> StepOutcome:
    [result] = await p.apply_batch([cmd])
    return result


async def retried(p: Neo4jParticipant, cmd: StoreCommand, attempts: int = 3) -> list[str]:
    """Apply `cmd` as the consume loop does after StoreUnavailableError: again, up to `attempts` times; the
    status of each attempt ("unavailable" for that error)."""
    statuses: list[str] = []
    for _ in range(attempts):
        try:
            statuses.append((await apply_one(p, cmd))["status"])
            break
        except StoreUnavailableError:
            statuses.append("unavailable")
    return statuses


def image(result: StepOutcome) -> Any:
    assert result["before_image"] is not None, result
    return json.loads(result["before_image"])


async def cypher(p: Neo4jParticipant, statement: str, **params: Any) -> list[dict[str, Any]]:
    """Direct Cypher, outside the participant: another writer, or a look at the raw graph."""
    async with p.driver.session() as session:
        result = await session.run(statement, params)
        return await result.data()


async def marker(p: Neo4jParticipant, cmd: StoreCommand) -> list[dict[str, Any]]:
    step_id = f"{cmd['tx_id']}/{cmd['step_index']}/{cmd['action']}"
    return await cypher(p, f"MATCH (m:{MARKER_LABEL} {{id: $id}}) RETURN m.before AS before", id=step_id)


# -- nodes ----------------------------------------------------------------------------------------------


async def test_health_reports_the_server_version(participant: Neo4jParticipant) -> None:
    health = await participant.health()
    assert health["healthy"] is True
    assert health["version"].startswith("5.")
    assert health["address"] == load_settings().neo4j.address


async def test_merge_node_is_read_back(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    result = await apply_one(participant, command(ops.merge_node(LABEL, key, {"name": "ada", "n": 3})))
    assert result["status"] == "APPLIED", result
    assert await participant.read_node(LABEL, key) == {"id": key["id"], "name": "ada", "n": 3}


async def test_before_image_of_a_new_and_of_an_existing_node(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    first = await apply_one(participant, command(ops.merge_node(LABEL, key, {"name": "ada"})))
    second = await apply_one(participant, command(ops.merge_node(LABEL, key, {"name": "grace", "x": 1})))
    assert image(first) == {"node": None}
    assert image(second) == {"node": {"id": key["id"], "name": "ada"}}
    assert await participant.read_node(LABEL, key) == {"id": key["id"], "name": "grace", "x": 1}


async def test_marker_commits_with_the_effect_or_not_at_all(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    good = command(ops.merge_node(LABEL, key, {"name": "ada"}))
    assert (await apply_one(participant, good))["status"] == "APPLIED"
    assert await marker(participant, good) == [{"before": '{"node":null}'}]

    # A raw step that writes, then fails in the same statement: neither its node nor its marker remains.
    doomed_id = uid()
    doomed = command(ops.cypher(f"CREATE (n:{LABEL} {{id: $id}}) WITH n RETURN 1 / 0", {"id": doomed_id}))
    result = await apply_one(participant, doomed)
    assert result["status"] == "FAILED"
    assert await participant.read_node(LABEL, {"id": doomed_id}) is None
    assert await marker(participant, doomed) == []


async def test_redelivered_execute_is_already_applied_and_changes_nothing(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    cmd = command(ops.merge_node(LABEL, key, {"name": "ada"}))
    first = await apply_one(participant, cmd)
    await cypher(participant, f"MATCH (n:{LABEL} {{id: $id}}) SET n.name = 'changed by another tx'", id=key["id"])

    again = await apply_one(participant, cmd)
    assert again["status"] == "ALREADY_APPLIED"
    assert again["before_image"] == first["before_image"]  # the outcome is as good as the lost first one
    assert await participant.read_node(LABEL, key) == {"id": key["id"], "name": "changed by another tx"}
    assert len(await marker(participant, cmd)) == 1


async def test_compensate_restores_the_exact_property_map(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    await apply_one(participant, command(ops.merge_node(LABEL, key, {"name": "ada", "keep": True})))
    change = command(ops.merge_node(LABEL, key, {"name": "grace", "added": [1, 2]}))
    assert (await apply_one(participant, change))["status"] == "APPLIED"

    result = await apply_one(participant, undo(change))
    assert result["status"] == "APPLIED", result
    assert await participant.read_node(LABEL, key) == {"id": key["id"], "name": "ada", "keep": True}
    assert (await apply_one(participant, undo(change)))["status"] == "ALREADY_APPLIED"


async def test_compensate_deletes_a_node_the_step_created(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    create = command(ops.merge_node(LABEL, key, {"name": "ada"}))
    await apply_one(participant, create)
    assert (await apply_one(participant, undo(create)))["status"] == "APPLIED"
    assert await participant.read_node(LABEL, key) is None


async def test_compensate_without_execute_is_noop_and_the_late_execute_is_skipped(
    participant: Neo4jParticipant,
) -> None:
    key = {"id": uid()}
    cmd = command(ops.merge_node(LABEL, key, {"name": "ada"}))
    assert (await apply_one(participant, undo(cmd)))["status"] == "NOOP"
    assert len(await marker(participant, undo(cmd))) == 1

    assert (await apply_one(participant, cmd))["status"] == "SKIPPED"
    assert await participant.read_node(LABEL, key) is None


async def test_delete_node_with_relationships_fails_and_without_them_is_undone(
    participant: Neo4jParticipant,
) -> None:
    owner, item = {"id": uid()}, {"id": uid()}
    await participant.apply_batch(
        [
            command(ops.merge_node(OTHER, owner, {"name": "o"})),
            command(ops.merge_node(LABEL, item, {"name": "i", "tags": ["a", "b"]})),
            command(ops.merge_relationship(REL, ops.node(OTHER, owner), ops.node(LABEL, item))),
        ]
    )
    refused = await apply_one(participant, command(ops.delete_node(LABEL, item)))
    assert refused["status"] == "FAILED"
    assert refused["error"] is not None
    assert refused["error"]["error_class"] == "InvalidOperationError"
    assert refused["error"]["retriable"] is False
    assert "delete its relationships first" in refused["error"]["message"]

    await apply_one(participant, command(ops.delete_relationship(REL, ops.node(OTHER, owner), ops.node(LABEL, item))))
    delete = command(ops.delete_node(LABEL, item))
    deleted = await apply_one(participant, delete)
    assert deleted["status"] == "APPLIED"
    assert image(deleted) == {"node": {"id": item["id"], "name": "i", "tags": ["a", "b"]}}
    assert await participant.read_node(LABEL, item) is None

    assert (await apply_one(participant, undo(delete)))["status"] == "APPLIED"
    assert await participant.read_node(LABEL, item) == {"id": item["id"], "name": "i", "tags": ["a", "b"]}


# -- relationships --------------------------------------------------------------------------------------


async def test_relationship_merge_and_its_compensation(participant: Neo4jParticipant) -> None:
    owner, item = ops.node(OTHER, {"id": uid()}), ops.node(LABEL, {"id": uid()})
    await participant.apply_batch(
        [
            command(ops.merge_node(OTHER, json.loads(owner["key"]))),
            command(ops.merge_node(LABEL, json.loads(item["key"]))),
        ]
    )
    create = command(ops.merge_relationship(REL, owner, item, {"since": 2020}))
    created = await apply_one(participant, create)
    assert created["status"] == "APPLIED", created
    assert image(created) == {"relationship": None}
    assert await participant.read_relationship(REL, owner, item) == {"since": 2020}

    change = command(ops.merge_relationship(REL, owner, item, {"since": 2024, "role": "admin"}))
    changed = await apply_one(participant, change)
    assert image(changed) == {"relationship": {"since": 2020}}
    assert await participant.read_relationship(REL, owner, item) == {"since": 2024, "role": "admin"}

    assert (await apply_one(participant, undo(change)))["status"] == "APPLIED"
    assert await participant.read_relationship(REL, owner, item) == {"since": 2020}
    assert (await apply_one(participant, undo(create)))["status"] == "APPLIED"
    assert await participant.read_relationship(REL, owner, item) is None
    assert await participant.read_node(LABEL, json.loads(item["key"])) == json.loads(item["key"])


async def test_relationship_to_a_missing_node_fails_permanently(participant: Neo4jParticipant) -> None:
    owner = {"id": uid()}
    await apply_one(participant, command(ops.merge_node(OTHER, owner)))
    missing = ops.node(LABEL, {"id": uid()})
    result = await apply_one(participant, command(ops.merge_relationship(REL, ops.node(OTHER, owner), missing)))
    assert result["status"] == "FAILED"
    assert result["error"] is not None
    assert result["error"]["error_class"] == "InvalidOperationError"
    assert result["error"]["retriable"] is False
    assert "does not exist" in result["error"]["message"]


async def test_delete_relationship_is_undone_by_compensation(participant: Neo4jParticipant) -> None:
    owner, item = ops.node(OTHER, {"id": uid()}), ops.node(LABEL, {"id": uid()})
    await participant.apply_batch(
        [
            command(ops.merge_node(OTHER, json.loads(owner["key"]))),
            command(ops.merge_node(LABEL, json.loads(item["key"]))),
            command(ops.merge_relationship(REL, owner, item, {"w": 1.5})),
        ]
    )
    delete = command(ops.delete_relationship(REL, owner, item))
    deleted = await apply_one(participant, delete)
    assert image(deleted) == {"relationship": {"w": 1.5}}
    assert await participant.read_relationship(REL, owner, item) is None
    assert (await apply_one(participant, undo(delete)))["status"] == "APPLIED"
    assert await participant.read_relationship(REL, owner, item) == {"w": 1.5}


# -- raw Cypher -----------------------------------------------------------------------------------------


async def test_raw_cypher_runs_its_declared_compensation(participant: Neo4jParticipant) -> None:
    key = uid()
    step = command(
        ops.cypher(f"CREATE (:{LABEL} {{id: $id, raw: true}})", {"id": key}),
        compensation=ops.cypher(f"MATCH (n:{LABEL} {{id: $id}}) DELETE n", {"id": key}),
    )
    done = await apply_one(participant, step)
    assert done["status"] == "APPLIED"
    assert done["before_image"] is None
    assert await participant.read_node(LABEL, {"id": key}) == {"id": key, "raw": True}
    assert (await apply_one(participant, undo(step)))["status"] == "APPLIED"
    assert await participant.read_node(LABEL, {"id": key}) is None


async def test_raw_cypher_without_compensation_is_undone_as_a_recorded_noop(participant: Neo4jParticipant) -> None:
    key = uid()
    step = command(ops.cypher(f"CREATE (:{LABEL} {{id: $id}})", {"id": key}))
    await apply_one(participant, step)
    assert (await apply_one(participant, undo(step)))["status"] == "APPLIED"
    assert len(await marker(participant, undo(step))) == 1
    assert await participant.read_node(LABEL, {"id": key}) == {"id": key}


# -- batches --------------------------------------------------------------------------------------------


async def test_one_bad_cypher_fails_alone_and_the_others_apply_once(participant: Neo4jParticipant) -> None:
    a, b = {"id": uid()}, {"id": uid()}
    batch = [
        command(ops.merge_node(LABEL, a, {"v": 1})),
        command(ops.cypher("THIS IS NOT CYPHER")),
        command(ops.merge_node(LABEL, b, {"v": 2})),
    ]
    results = await participant.apply_batch(batch)
    assert [r["status"] for r in results] == ["APPLIED", "FAILED", "APPLIED"]
    error = results[1]["error"]
    assert error is not None
    assert error["retriable"] is False
    assert "SyntaxError" in error["message"]
    assert await participant.read_node(LABEL, a) == {**a, "v": 1}
    assert await participant.read_node(LABEL, b) == {**b, "v": 2}
    # The rolled-back batch left nothing behind: each good step has exactly one marker.
    assert [len(await marker(participant, c)) for c in batch] == [1, 0, 1]


async def test_a_constraint_violation_fails_alone_and_permanently(participant: Neo4jParticipant) -> None:
    taken, fresh = {"id": uid()}, {"id": uid()}
    await apply_one(participant, command(ops.merge_node(LABEL, taken)))
    results = await participant.apply_batch(
        [
            command(ops.cypher(f"CREATE (:{LABEL} {{id: $id}})", taken)),  # the key MERGE relies on is unique
            command(ops.merge_node(LABEL, fresh, {"v": 1})),
        ]
    )
    assert [r["status"] for r in results] == ["FAILED", "APPLIED"]
    error = results[0]["error"]
    assert error is not None
    assert error["error_class"] == "StoreError"
    assert error["retriable"] is False
    assert "ConstraintValidationFailed" in error["message"]


async def test_a_property_neo4j_cannot_store_fails_alone(participant: Neo4jParticipant) -> None:
    a, b = {"id": uid()}, {"id": uid()}
    results = await participant.apply_batch(
        [
            command(ops.merge_node(LABEL, a, {"nested": {"no": "maps"}})),
            command(ops.merge_node(LABEL, a, {"mixed": [1, "a"]})),
            command(ops.merge_node(LABEL, b, {"ok": [1, 2]})),
        ]
    )
    assert [r["status"] for r in results] == ["FAILED", "FAILED", "APPLIED"]
    assert {r["error"]["error_class"] for r in results[:2] if r["error"]} == {"InvalidOperationError"}
    assert await participant.read_node(LABEL, a) is None


async def test_a_deadlock_is_classified_retriable(participant: Neo4jParticipant) -> None:
    a, b = uid(), uid()
    await participant.apply_batch([command(ops.merge_node(LABEL, {"id": k})) for k in (a, b)])
    write = f"MATCH (n:{LABEL} {{id: $id}}) SET n.touched = true"

    async def lock(tx: Any, key: str) -> Neo4jError | None:
        try:
            await (await tx.run(write, id=key)).consume()
        except Neo4jError as exc:
            return exc
        return None

    async with participant.driver.session() as one, participant.driver.session() as two:
        first, second = await one.begin_transaction(), await two.begin_transaction()
        try:
            assert await lock(first, a) is None
            assert await lock(second, b) is None
            async with asyncio.timeout(30):  # each now waits for the other's lock: the server must pick a victim
                verdicts = await asyncio.gather(lock(first, b), lock(second, a))
        finally:
            await first.close()
            await second.close()
    errors = [v for v in verdicts if v is not None]
    assert len(errors) == 1, verdicts
    classified = classify(errors[0])
    assert isinstance(classified, StoreError)
    assert classified.retriable is True
    assert classified.code == "Neo.TransientError.Transaction.DeadlockDetected"


async def test_a_key_twice_in_a_batch_gives_one_by_one_before_images(participant: Neo4jParticipant) -> None:
    key, other = {"id": uid()}, {"id": uid()}
    batch = [
        command(ops.merge_node(LABEL, key, {"v": 1})),
        command(ops.merge_node(LABEL, other, {"v": 10})),
        command(ops.merge_node(LABEL, key, {"v": 2, "w": True})),
        command(ops.delete_node(LABEL, key)),
    ]
    results = await participant.apply_batch(batch)
    assert [r["status"] for r in results] == ["APPLIED"] * 4
    assert [image(r) for r in results] == [
        {"node": None},
        {"node": None},
        {"node": {**key, "v": 1}},
        {"node": {**key, "v": 2, "w": True}},
    ]
    assert await participant.read_node(LABEL, key) is None
    assert await participant.read_node(LABEL, other) == {**other, "v": 10}


async def test_fresh_and_redelivered_executes_in_one_batch_apply_only_the_fresh_ones(
    participant: Neo4jParticipant,
) -> None:
    """A batch of fresh EXECUTEs of one shape is applied by its transaction's first query, guarded by the
    absence of markers; one redelivered command among them turns that off (nothing of the batch is written
    by it) and the batch is planned as usual: the redelivered step changes nothing, the fresh one applies,
    and each key's version moves once per write."""
    old, new = {"id": uid()}, {"id": uid()}
    redelivered = command(ops.merge_node(LABEL, old, {"name": "ada"}))
    fresh = command(ops.merge_node(LABEL, new, {"name": "grace"}))
    first = await apply_one(participant, redelivered)
    await cypher(participant, f"MATCH (n:{LABEL} {{id: $id}}) SET n.name = 'changed by another tx'", id=old["id"])

    results = await participant.apply_batch([redelivered, fresh])
    assert [r["status"] for r in results] == ["ALREADY_APPLIED", "APPLIED"]
    assert results[0]["before_image"] == first["before_image"]
    assert image(results[1]) == {"node": None}
    assert await participant.read_node(LABEL, old) == {**old, "name": "changed by another tx"}
    assert await participant.read_node(LABEL, new) == {**new, "name": "grace"}
    for op in (redelivered["operation"], fresh["operation"]):
        assert [await participant.read_version(k) for k in ops.lock_keys(op)] == [1]
    assert [len(await marker(participant, c)) for c in (redelivered, fresh)] == [1, 1]


async def test_a_relationship_after_its_nodes_in_one_batch(participant: Neo4jParticipant) -> None:
    owner, item = ops.node(OTHER, {"id": uid()}), ops.node(LABEL, {"id": uid()})
    tx_id = f"tx-{uid()}"
    results = await participant.apply_batch(
        [
            command(ops.merge_node(OTHER, json.loads(owner["key"])), tx_id=tx_id, step=0),
            command(ops.merge_node(LABEL, json.loads(item["key"])), tx_id=tx_id, step=1),
            command(ops.merge_relationship(REL, owner, item, {"p": "x"}), tx_id=tx_id, step=2),
        ]
    )
    assert [r["status"] for r in results] == ["APPLIED"] * 3
    assert await participant.read_relationship(REL, owner, item) == {"p": "x"}


async def test_execute_then_compensate_in_one_batch_is_undone(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    step = command(ops.merge_node(LABEL, key, {"v": 1}))
    results = await participant.apply_batch([step, step, undo(step), step])
    assert [r["status"] for r in results] == ["APPLIED", "ALREADY_APPLIED", "APPLIED", "SKIPPED"]
    assert await participant.read_node(LABEL, key) is None


async def test_invalid_operation_fails_alone(participant: Neo4jParticipant) -> None:
    key = {"id": uid()}
    bad = ops.merge_node(LABEL, key, {"v": 1})
    bad["target"] = "Not A Label"
    results = await participant.apply_batch([command(bad), command(ops.merge_node(LABEL, key, {"v": 2}))])
    assert [r["status"] for r in results] == ["FAILED", "APPLIED"]
    assert results[0]["error"] is not None
    assert results[0]["error"]["error_class"] == "InvalidOperationError"


async def test_unreachable_server_raises_store_unavailable() -> None:
    settings = load_settings()
    dead = dataclasses.replace(settings.neo4j, uri="bolt://127.0.0.1:9")
    p = Neo4jParticipant(dataclasses.replace(settings, neo4j=dead), connection_timeout_s=1.0)
    with pytest.raises(StoreUnavailableError):
        await p.start()
    assert (await p.health())["healthy"] is False


async def test_a_server_that_stops_answering_is_unavailable_after_the_call_deadline(settings: Settings) -> None:
    """The driver's per-read timeout is replaced by one deadline per call: a batch on a connection to a
    server that accepts bytes but never answers (SIGSTOP) ends as StoreUnavailableError, the consume loop's
    cue to retry it, not as a hang or a FAILED outcome; once the server answers, the batch applies."""
    patient = Neo4jParticipant(settings, call_deadline_s=1.0)
    await patient.start()
    key = {"id": uid()}
    step = command(ops.merge_node(LABEL, key, {"v": 1}))
    try:
        assert (await apply_one(patient, command(ops.merge_node(LABEL, {"id": uid()}))))["status"] == "APPLIED"
        svc.kill_server(settings, "neo4j", signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailableError, match="deadline"):
                await apply_one(patient, step)
        finally:
            svc.kill_server(settings, "neo4j", signal.SIGCONT)
        statuses = await retried(patient, step)  # the connection the deadline cut is closed: a new one serves
        # The call the deadline abandoned may still have committed once the server woke (the client only
        # stopped waiting): its retry then finds the marker. Either way the write is there, once.
        assert statuses[-1] in ("APPLIED", "ALREADY_APPLIED"), statuses
        assert await patient.read_node(LABEL, key) == {**key, "v": 1}
    finally:
        await patient.close()


# -- durability -----------------------------------------------------------------------------------------


async def test_a_committed_write_survives_a_neo4j_crash_and_restart(
    participant: Neo4jParticipant, settings: Settings
) -> None:
    """Runs last in this file: it SIGKILLs the shared Neo4j and waits until it answers again."""
    key = {"id": uid()}
    step = command(ops.merge_node(LABEL, key, {"durable": True}))
    assert (await apply_one(participant, step))["status"] == "APPLIED"

    svc.kill_server(settings, "neo4j")  # SIGKILL: no clean shutdown, only the transaction log survives
    await svc.stop_servers(settings, ["neo4j"])  # returns once the killed process is gone
    await svc.start_servers(settings, ["neo4j"])  # returns once Neo4j answers a query

    fresh = Neo4jParticipant(settings)
    await fresh.start()
    try:
        assert await fresh.read_node(LABEL, key) == {**key, "durable": True}
        assert (await apply_one(fresh, step))["status"] == "ALREADY_APPLIED"
    finally:
        await fresh.close()

    # The participant connected before the crash holds dead connections: a batch may raise
    # StoreUnavailableError (the consume loop's cue to retry it), never a FAILED outcome, then recovers.
    statuses = await retried(participant, command(ops.merge_node(LABEL, {"id": uid()})))
    assert statuses[-1] == "APPLIED", statuses


# -- nodes that existed before the saga (issue 9, defect 1) ----------------------------------------------


@pytest.mark.parametrize("same_batch", [True, False], ids=["one batch", "separate batches"])
async def test_compensate_restores_a_node_that_existed_before_the_saga(
    participant: Neo4jParticipant, same_batch: bool
) -> None:
    key = {"id": uid()}
    await apply_one(participant, command(ops.merge_node(LABEL, key, {"v": "old", "kept": 1})))
    tx = f"tx-{uid()}"
    update = command(ops.merge_node(LABEL, key, {"v": "new", "added": True}), tx_id=tx)
    delete = command(ops.delete_node(LABEL, key), tx_id=tx, step=1)
    steps = [update, undo(update), delete, undo(delete)]
    if same_batch:
        results = await participant.apply_batch(steps)
    else:
        results = [await apply_one(participant, s) for s in steps]
    assert [r["status"] for r in results] == ["APPLIED"] * 4
    assert await participant.read_node(LABEL, key) == {**key, "v": "old", "kept": 1}
