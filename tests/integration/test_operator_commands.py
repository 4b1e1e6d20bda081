"""Operating a stuck saga on the real servers: `polycommit status`, `tx show`, `tx retry`, `tx resolve`.

The stuck saga: step 1's compensation is `SELECT 1/0` and step 2 fails, so compensation of step 1 keeps
failing. The CLI runs as a subprocess against this session's topics; every wait awaits a record.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import read_topic, topics_for
from polycommit.client import Coordinator, Saga, TransactionResult
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.events import OperatorCommand, now_ms
from polycommit.tooling.runtime import Runtime
from polycommit.tooling.tx import send_operator_command

# One failure of a compensation makes the saga stuck, and its next attempt is 30-60 s away: an attempt
# seen within the test's deadline can only be the operator's retry.
POLICY = SagaPolicy(default_timeout_ms=10_000, backoff_base_ms=60_000, backoff_max_ms=120_000, compensation_retries=1)
pytestmark = pytest.mark.servers


# tx id -> the step whose compensation keeps failing, of every stuck saga a test leaves behind
LEFT_STUCK: dict[str, int] = {}


async def resolve_left_stuck(settings: Settings, stuck: dict[str, int]) -> None:
    """End the stuck sagas a module made, so later modules of the session restore none of them."""
    for tx_id, step in stuck.items():
        command: OperatorCommand = {
            "tx_id": tx_id,
            "action": "RESOLVE_STEP",
            "step_index": step,
            "operator": "test cleanup",
            "note": "",
            "at_ms": now_ms(),
        }
        await send_operator_command(settings, command, wait=30)  # a refusal (ended already) is fine too
    stuck.clear()


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(topics, policy=POLICY, batch_size=200, stores=("postgres",))
    await rt.start()
    yield rt
    await resolve_left_stuck(rt.settings, LEFT_STUCK)
    await rt.stop()


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with Coordinator(runtime.settings, timeout=60) as coordinator:
        yield coordinator


async def cli(settings: Settings, *args: str) -> tuple[int, Any]:
    """`polycommit ARGS` as a subprocess on this session's topics: (exit code, its JSON or text)."""
    env = {**os.environ, "POLYCOMMIT_TOPIC_PREFIX": settings.topic_prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "polycommit.tooling.cli", *args, env=env, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 90)
    text = stdout.decode()
    try:
        return process.returncode or 0, json.loads(text)
    except json.JSONDecodeError:
        return process.returncode or 0, text


async def first_record(settings: Settings, topic: str, keep: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first record of `topic` that `keep` selects, reading the topic again until one is there."""
    codec = default_codec()
    found: list[dict[str, Any]] = []

    def handle(record: Any) -> None:
        try:
            value = codec.decode(record.value).record
        except CodecError:
            return
        if keep(value):
            found.append(value)

    while not found:
        await read_topic(settings, topic, handle)
    return found[0]


async def stuck_saga(client: Coordinator) -> tuple[Saga, TransactionResult]:
    saga = Saga("cannot undo step 1")
    saga.step(ops.sql("SELECT 1"), compensate=ops.sql("SELECT 2"))
    saga.step(ops.sql("SELECT 1"), compensate=ops.sql("SELECT 1/0"))
    saga.step(ops.sql("SELECT * FROM no_such_table_for_operators"))
    result = await client.execute(saga)
    assert result.status == "stuck", result
    LEFT_STUCK[saga.tx_id] = 1
    return saga, result


async def test_status_shows_the_compensations_own_error_and_attempts(runtime: Runtime, client: Coordinator) -> None:
    saga, result = await stuck_saga(client)
    assert result.steps[1].error is None  # the step itself succeeded
    assert "no_such_table_for_operators" in (result.steps[2].error or "")
    assert "division by zero" in (result.steps[1].compensation_error or "")
    code, report = await cli(runtime.settings, "status", "--json")
    assert code == 1
    (row,) = [r for r in report["stuck"] if r["tx_id"] == saga.tx_id]
    assert row["step"] == 1 and row["compensation_attempts"] == 1
    assert "division by zero" in row["compensation_error"] and "no_such_table" in row["error"]


async def test_tx_show_lists_the_transactions_events_in_order(runtime: Runtime, client: Coordinator) -> None:
    saga, _ = await stuck_saga(client)
    code, shown = await cli(runtime.settings, "tx", "show", saga.tx_id, "--json")
    assert code == 0 and shown["stores"] == ["postgres"]
    events = shown["events"]
    assert events[0]["event"] == "TransactionIntent"
    commands = [(e["action"], e["step"]) for e in events if e["event"] == "StoreCommand"]
    assert commands == [("EXECUTE", 0), ("EXECUTE", 1), ("EXECUTE", 2), ("COMPENSATE", 2), ("COMPENSATE", 1)]
    outcomes = [(e["action"], e["step"], e["status"]) for e in events if e["event"] == "StepOutcome"]
    assert outcomes[-1] == ("COMPENSATE", 1, "FAILED")
    failed = [e for e in events if e["event"] == "StepOutcome" and e["status"] == "FAILED"]
    assert "no_such_table" in failed[0]["error"] and "division by zero" in failed[1]["error"]
    for index, event in enumerate(events):  # every outcome comes after the command it answers
        if event["event"] == "StepOutcome":
            sent = [e for e in events[:index] if e["event"] == "StoreCommand" and e["step"] == event["step"]]
            assert any(e["action"] == event["action"] for e in sent), event
    assert [e["kind"] for e in events if e["event"] == "Alert"] == ["stuck"]
    assert [e["status"] for e in events if e["event"] == "TransactionResult"] == ["STUCK"]
    assert (await cli(runtime.settings, "tx", "show", "no-such-transaction", "--json"))[0] == 1


async def test_tx_retry_makes_the_next_attempt_happen_at_once(runtime: Runtime, client: Coordinator) -> None:
    saga, _ = await stuck_saga(client)
    code, answer = await cli(runtime.settings, "tx", "retry", saga.tx_id, "--operator", "ada", "--json")
    assert code == 0 and answer["answer"]["kind"] == "operator", answer
    outcomes = topics_for(runtime.settings).outcomes
    second = await asyncio.wait_for(
        first_record(
            runtime.settings,
            outcomes,
            lambda o: (
                o["tx_id"] == saga.tx_id and o["action"] == "COMPENSATE" and o["step_index"] == 1 and o["attempt"] == 2
            ),
        ),
        20,  # well before the backoff (>= 30 s) would have sent it
    )
    assert second["status"] == "FAILED"


async def test_tx_resolve_lets_a_stuck_saga_end_compensated(runtime: Runtime, client: Coordinator) -> None:
    saga, _ = await stuck_saga(client)
    code, answer = await cli(runtime.settings, "tx", "resolve", saga.tx_id, "--step", "0", "--json")
    assert code == 1 and answer["answer"]["kind"] == "operator_refused"  # step 1 is the one being compensated
    assert "step 1 is being compensated" in answer["answer"]["message"]
    code, answer = await cli(
        runtime.settings,
        "tx",
        "resolve",
        saga.tx_id,
        "--step",
        "1",
        "--note",
        "undid it by hand",
        "--operator",
        "ada",
        "--json",
    )
    assert code == 0 and "undid it by hand" in answer["answer"]["message"]
    results = topics_for(runtime.settings).results
    final = await asyncio.wait_for(
        first_record(runtime.settings, results, lambda r: r["tx_id"] == saga.tx_id and r["status"] != "STUCK"), 30
    )
    assert final["status"] == "COMPENSATED"
    assert [s["status"] for s in final["steps"]] == ["compensated", "resolved_by_operator", "failed"]
    assert final["steps"][1]["resolved_by"] == "ada"
    code, answer = await cli(runtime.settings, "tx", "retry", saga.tx_id, "--json")
    assert code == 1 and "no such transaction in flight" in answer["answer"]["message"]
