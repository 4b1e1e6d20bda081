"""Chaos runs a saga again, as a new transaction, when it ended with nothing run after a lock wait or as a
deadlock's victim; every other failure is what the run is testing and is never run again."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from polycommit import interactive
from polycommit.client import Coordinator, Transaction, TransactionResult
from polycommit.config import load_settings
from polycommit.tooling.bench_workload import saga_of, writes
from polycommit.tooling.chaos_workload import RERUNS, ClientSlot, Progressed, run_workload
from polycommit.tooling.checker import History


class ScriptedClient:
    """Answers each transaction it is sent with the next (status, error class) of its script."""

    timeout = 5.0

    def __init__(self, script: list[tuple[str, str | None]]) -> None:
        self.script = script
        self.sent: list[Transaction] = []

    async def submit(self, transaction: Transaction) -> asyncio.Future[TransactionResult]:
        status, error_class = self.script[min(len(self.sent), len(self.script) - 1)]
        self.sent.append(transaction)
        error = None if error_class is None else {"error_class": error_class, "message": "scripted", "retriable": True}
        event: dict[str, Any] = {"tx_id": transaction.tx_id, "status": status, "steps": [], "error": error}
        future: asyncio.Future[TransactionResult] = asyncio.get_running_loop().create_future()
        future.set_result(TransactionResult.from_event({**event, "started_at_ms": 0, "finished_at_ms": 1}))
        return future


async def run_one(script: list[tuple[str, str | None]]) -> tuple[ScriptedClient, History, list[str], Progressed]:
    client = ScriptedClient(script)
    slot = ClientSlot(load_settings(), 5.0, client=cast(Coordinator, client))
    history, reruns, progressed = History(), list[str](), Progressed()
    saga = saga_of(writes("rerun", 1)[0])
    await run_workload(slot, history, [saga], 1, progressed, [], reruns=reruns)
    return client, history, reruns, progressed


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interactive, "retry_delay", lambda attempt: 0.0)


async def test_a_saga_timed_out_waiting_for_its_keys_runs_again_as_a_new_transaction() -> None:
    client, history, reruns, progressed = await run_one(
        [("FAILED", "LockTimeoutError"), ("FAILED", "DeadlockVictimError"), ("COMPLETED", None)]
    )

    ids = [t.tx_id for t in client.sent]
    assert len(ids) == 3 and len(set(ids)) == 3  # each run a transaction of its own
    assert [t.steps for t in client.sent[1:]] == [client.sent[0].steps] * 2  # the same business action
    assert reruns == ids[1:]
    assert [history.final(t) for t in ids] == ["failed", "failed", "completed"]  # every attempt judged
    assert progressed.results == 1  # one saga of the workload, however many runs


@pytest.mark.parametrize(
    "ended",
    [
        ("COMPENSATED", "InvalidOperationError"),
        ("FAILED", "InvalidOperationError"),
        ("ABORTED", "TransactionAbortedError"),
    ],
)
async def test_other_failures_are_never_run_again(ended: tuple[str, Any]) -> None:
    client, history, reruns, _ = await run_one([ended])

    assert len(client.sent) == 1 and reruns == []
    assert history.final(client.sent[0].tx_id) == ended[0].lower()


async def test_a_saga_that_keeps_timing_out_is_run_again_at_most_reruns_times() -> None:
    client, history, reruns, progressed = await run_one([("FAILED", "LockTimeoutError")])

    assert len(client.sent) == RERUNS + 1
    assert len(reruns) == RERUNS
    assert history.statuses() == {"failed": RERUNS + 1}
    assert progressed.results == 1
