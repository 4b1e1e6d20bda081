"""The coordinator's timers (orchestrator/transactions.py): one heap entry per due time a transaction
takes, not one per transition, and each timer fires once, for the state that still holds it."""

from __future__ import annotations

from typing import Any

from orchestrator.saga_model import initial_state
from orchestrator.transactions import OwnedTransactions
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.codec import default_codec
from polycommit.config import load_settings


def state(tx_id: str, due: int, phase: str = "forward") -> Any:
    tx = Saga("timers", tx_id=tx_id)
    tx.step(ops.upsert_row("t", {"id": 1}, {"v": 1}))
    s = initial_state(tx.intent("polycommit.replies:0", "test"), 0)
    s["due_at_ms"], s["phase"] = due, phase
    return s


def owned() -> OwnedTransactions:
    return OwnedTransactions(load_settings(), "px.tx-state", default_codec())


def test_transitions_that_keep_the_due_time_push_no_second_timer() -> None:
    txs = owned()
    for _ in range(3):  # a saga's outcomes leave its earliest step timeout where it was
        txs.keep(state("a", 100))
    assert len(txs.timers) == 1
    txs.keep(state("a", 150))  # moved: a new entry (the old one is dropped when it comes due)
    assert len(txs.timers) == 2
    assert [s["intent"]["tx_id"] for s in txs.due(120)] == []  # 100 is superseded
    assert [(s["intent"]["tx_id"], s["due_at_ms"]) for s in txs.due(150)] == [("a", 150)]
    assert txs.timers == [] and txs.timer_of == {}


def test_each_transaction_fires_once_when_due_and_an_ended_one_never() -> None:
    txs = owned()
    txs.keep(state("a", 100))
    txs.keep(state("b", 100))
    txs.keep(state("b", 100, phase="completed"))  # ended: dropped, its timer with it
    assert [s["intent"]["tx_id"] for s in txs.due(100)] == ["a"]
    assert list(txs.due(1_000)) == []
    txs.keep(state("a", 200))  # due again later: a new timer
    assert [s["intent"]["tx_id"] for s in txs.due(200)] == ["a"]
