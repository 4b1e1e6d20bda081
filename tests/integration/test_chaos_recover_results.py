"""After a chaos run, the results its clients missed are read from the `results` topic, on the real broker.
A transaction the log never heard of (nothing of it on `intents`: its client was killed first) is not
waited for, since no result can come (it is returned, so chaos can set it aside); one the log has is
waited for until its result arrives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from log_follow import publish

from polycommit import operations as ops
from polycommit.bus import topics_for
from polycommit.client import Saga
from polycommit.config import Settings
from polycommit.events import now_ms
from polycommit.tooling.chaos_workload import recover_results
from polycommit.tooling.checker import History

pytestmark = pytest.mark.servers

NEVER_DONE_S = 600.0  # a wait that would only end at its deadline fails the test's own bound long before


def saga(name: str) -> Saga:
    return Saga(name).step(ops.upsert_row("documents", {"id": name}, {"title": name}))


def completed(tx: Saga) -> dict[str, Any]:
    at = now_ms()
    return {"tx_id": tx.tx_id, "name": tx.name, "status": "COMPLETED", "steps": [], "error": None,
            "started_at_ms": at, "finished_at_ms": at}  # fmt: skip


async def test_a_transaction_the_log_never_heard_of_is_not_waited_for(topics: Settings) -> None:
    history, unsent = History(), saga("never sent")
    history.invoke(unsent)
    never_sent = await asyncio.wait_for(recover_results(topics, history, NEVER_DONE_S), timeout=60)
    assert never_sent == {unsent.tx_id} and history.missing() == [unsent.tx_id]


async def test_a_logged_transaction_is_waited_for_until_its_result_arrives(topics: Settings) -> None:
    history, sent, unsent = History(), saga("sent"), saga("never sent")
    history.invoke(sent)
    history.invoke(unsent)
    names = topics_for(topics)
    await publish(topics, names.intents, sent.tx_id, "TransactionIntent", sent.intent("", "planted"))
    waiting = asyncio.create_task(recover_results(topics, history, NEVER_DONE_S))
    done, _ = await asyncio.wait([waiting], timeout=2)
    assert not done  # its intent is on the log: a result may still come
    await publish(topics, names.results, sent.tx_id, "TransactionResult", completed(sent))
    never_sent = await asyncio.wait_for(waiting, timeout=60)
    assert never_sent == {unsent.tx_id} and history.final(sent.tx_id) == "completed"
    assert history.missing() == [unsent.tx_id]
