"""Intents the coordinator must refuse up front, before any step runs: each gets a typed error in a failed
result and a rejection (the driver's dead letter), and the client SDK refuses what it can before publishing."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import registry, saga
from polycommit import operations as ops
from polycommit.client import Coordinator, Saga, Transaction
from polycommit.config import load_settings
from polycommit.errors import UnsupportedError

POLICY = saga.SagaPolicy()


def failed_with(intent: Any) -> tuple[str, str]:
    t = saga.SagaProtocol(POLICY).start(intent, 0)
    assert t.commands == [], "nothing may run"
    assert t.result is not None and t.result["status"] == "FAILED"
    assert t.result["error"] is not None and [t.result["error"]] == t.rejections
    return t.result["error"]["error_class"], t.result["error"]["message"]


# -- 4: a compensation for another store than its step ---------------------------------------------


def test_a_compensation_for_another_store_than_its_step_is_refused_naming_the_step() -> None:
    tx = Saga("mismatch")
    tx.step(ops.upsert_row("t", {"id": 1}, {"v": 1}))
    tx.step(ops.sql("UPDATE t SET v = 2"), compensate=ops.cypher("MATCH (n) SET n.v = 1"))
    error_class, message = failed_with(tx.intent("", "test"))
    assert error_class == "InvalidOperationError"
    assert message.startswith("step 1:") and "neo4j" in message and "postgres" in message


def test_a_compensation_for_the_same_store_is_accepted() -> None:
    tx = Saga("same store").step(ops.sql("UPDATE t SET v = 2"), compensate=ops.sql("UPDATE t SET v = 1"))
    t = saga.SagaProtocol(POLICY).start(tx.intent("", "test"), 0)
    assert [c["action"] for c in t.commands] == ["EXECUTE"] and t.rejections == []


# -- 8: modes that need two-phase commit or the lock manager ---------------------------------------

UNSUPPORTED = [
    # REPEATABLE_READ and SERIALIZABLE left the table with interactive transactions (issue 11): what is
    # refused now is asking for them without the locks they are built on.
    ({"isolation": "REPEATABLE_READ", "locks": False}, "isolation=REPEATABLE_READ with locks=False"),
    ({"isolation": "SERIALIZABLE", "locks": False}, "isolation=SERIALIZABLE with locks=False"),
]


def transaction(**modes: Any) -> Transaction:
    return Transaction(name="modes", **modes).add(ops.upsert_row("t", {"id": 1}, {"v": 1}))


@pytest.mark.parametrize(("modes", "named"), UNSUPPORTED)
def test_the_coordinator_refuses_an_unsupported_mode_naming_it(modes: dict[str, Any], named: str) -> None:
    error_class, message = failed_with(transaction(**modes).intent("", "any producer"))
    assert error_class == "UnsupportedError"
    assert named in message


def test_strong_consistency_runs_as_two_phase_commit() -> None:
    # consistency=STRONG left the table of refusals when two-phase commit was built (issue 10).
    intent = transaction(consistency="STRONG").intent("", "test")
    t = registry.protocols(POLICY)[registry.protocol_name(intent)].start(intent, 0)
    assert [c["action"] for c in t.commands] == ["PREPARE"] and t.rejections == []


def test_a_priority_runs() -> None:
    # priority left the table of refusals with interactive transactions (issue 11): it weighs in the choice
    # of a deadlock victim, and the lock events carry it to the detector.
    intent = transaction(priority=3).intent("", "test")
    t = registry.protocols(POLICY)[registry.protocol_name(intent)].start(intent, 0)
    assert [c["action"] for c in t.commands] == ["EXECUTE"] and t.rejections == []
    assert {e["priority"] for e in t.lock_requests} == {3}


@pytest.mark.parametrize("isolation", ["READ_COMMITTED", "READ_UNCOMMITTED", "REPEATABLE_READ", "SERIALIZABLE"])
def test_the_supported_isolation_levels_run(isolation: Any) -> None:
    t = saga.SagaProtocol(POLICY).start(transaction(isolation=isolation).intent("", "test"), 0)
    assert [c["action"] for c in t.commands] == ["EXECUTE"] and t.rejections == []


@pytest.mark.parametrize(("modes", "named"), UNSUPPORTED)
async def test_the_client_refuses_an_unsupported_mode_before_publishing(modes: dict[str, Any], named: str) -> None:
    client = Coordinator(load_settings())  # never started: refusing must not need Kafka
    try:
        with pytest.raises(UnsupportedError, match=named):
            await client.execute(transaction(**modes))
        with pytest.raises(UnsupportedError, match=named):
            client.transaction(**modes)
    finally:
        await client.close()
