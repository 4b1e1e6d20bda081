"""Deadlocks of two that the coordinator's lock table sees close, pure: the request that queues behind a
transaction waiting for it names the cycle (`Transition.cycles`), and the verdict the coordinator gives at
once is the detector's (the lower priority dies; at equal priority the younger with less work)."""

from __future__ import annotations

from typing import Any

from orchestrator.interactive import Interactive
from orchestrator.interactive_model import LockRequested, OpenPhase, VictimChosen, verdict_on
from orchestrator.locks import EXCLUSIVE, SHARED, LockTable
from orchestrator.protocol import Transition
from orchestrator.saga import SagaPolicy, SagaProtocol
from polycommit import operations as ops

POLICY = SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=2)
ROW = ops.lock_keys(ops.upsert_row("t", {"id": 1}, {"v": 1}))[0]
NODE = ops.lock_keys(ops.merge_node("N", {"id": 1}, {"v": 1}))[0]


class Open:
    """Open interactive transactions on one protocol, as the driver keeps their states."""

    def __init__(self) -> None:
        self.p = Interactive(SagaProtocol(POLICY), lock_wait_ms=60_000)
        self.states: dict[str, Any] = {}

    def ask(self, tx_id: str, n: int, keys: list[str], mode: str, now: int, priority: int = 0) -> Transition:
        request: Any = {
            "tx_id": tx_id, "request": n, "keys": keys, "mode": mode, "release": False, "name": "",
            "isolation": "SERIALIZABLE", "priority": priority, "reply_to": "polycommit.replies:0",
            "client_id": "test", "lock_wait_ms": 0, "created_at_ms": now,
        }  # fmt: skip
        state = self.states.get(tx_id)
        t = self.p.open(request, now) if state is None else self.p.decide(state, LockRequested(request), now)
        self.states[tx_id] = t.state
        return t


def test_the_second_reader_to_upgrade_closes_a_cycle_of_two_and_names_it() -> None:
    o = Open()
    o.ask("R1", 1, [ROW], "SHARED", now=10)
    o.ask("R2", 1, [ROW], "SHARED", now=20)
    first = o.ask("R1", 2, [ROW], "EXCLUSIVE", now=30)
    assert first.state["phase"] == OpenPhase.WAITING and first.cycles == []  # R2 waits for nobody yet
    second = o.ask("R2", 2, [ROW], "EXCLUSIVE", now=40)
    assert second.state["phase"] == OpenPhase.WAITING and second.cycles == [("R2", "R1")]


def test_opposite_orders_close_a_cycle_of_two_and_a_plain_wait_closes_none() -> None:
    o = Open()
    o.ask("T1", 1, [ROW], "EXCLUSIVE", now=10)
    o.ask("T2", 1, [NODE], "EXCLUSIVE", now=20)
    o.ask("T3", 1, [NODE], "EXCLUSIVE", now=25)  # waits for T2, which waits for nobody
    assert o.ask("T1", 2, [NODE], "EXCLUSIVE", now=30).cycles == []
    assert o.ask("T2", 2, [ROW], "EXCLUSIVE", now=40).cycles == [("T2", "T1")]


def test_the_verdict_is_the_detectors_younger_with_less_work_or_the_lower_priority() -> None:
    o = Open()
    o.ask("OLD", 1, [ROW, NODE], "SHARED", now=10)  # older, and holds two keys
    o.ask("NEW", 1, [ROW], "SHARED", now=20)
    o.ask("OLD", 2, [ROW], "EXCLUSIVE", now=30)
    (cycle,) = o.ask("NEW", 2, [ROW], "EXCLUSIVE", now=40).cycles
    states = [o.states[tx] for tx in cycle]
    assert verdict_on(cycle, states, now=50)["victim"] == "NEW"
    o.states["OLD"]["intent"]["priority"], o.states["NEW"]["intent"]["priority"] = 0, 1
    assert verdict_on(cycle, [o.states[tx] for tx in cycle], now=50)["victim"] == "OLD"


def test_the_victim_of_the_verdict_ends_and_the_survivor_gets_its_upgrade() -> None:
    o = Open()
    o.ask("R1", 1, [ROW], "SHARED", now=10)
    o.ask("R2", 1, [ROW], "SHARED", now=20)
    o.ask("R1", 2, [ROW], "EXCLUSIVE", now=30)
    (cycle,) = o.ask("R2", 2, [ROW], "EXCLUSIVE", now=40).cycles
    verdict = verdict_on(cycle, [o.states[tx] for tx in cycle], now=40)
    ended = o.p.decide(o.states[verdict["victim"]], VictimChosen(verdict), 40)
    assert ended.state["phase"] == OpenPhase.VICTIM and ended.wake == ["R1"]
    assert o.p.locks.mode_of("R1", ROW) == EXCLUSIVE


def test_mutual_waits_are_only_the_blockers_that_wait_back() -> None:
    table = LockTable()
    table.request("A", [ROW], SHARED)
    table.request("B", [ROW], SHARED)
    table.request("C", [NODE], EXCLUSIVE)
    table.request("A", [ROW, NODE], EXCLUSIVE)  # waits for B (upgrade) and C
    assert table.mutual_waits("A") == []
    table.request("B", [ROW], EXCLUSIVE)
    assert table.mutual_waits("B") == ["A"] and table.mutual_waits("A") == ["B"]
