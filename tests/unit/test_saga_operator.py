"""Operator commands in the saga's table: retry now, resolve the step being compensated, refuse the rest.

Pure: the saga driven by plain events; the refusals are alerts, never exceptions.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from step_replies import reply

from orchestrator import registry, saga
from orchestrator.protocol import OperatorReceived, OutcomeReceived, TimerDue, Transition
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.errors import ProtocolError
from polycommit.events import OperatorCommand, SagaSnapshot, StoreCommand

POLICY = saga.SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=3)
PROTOCOL = saga.SagaProtocol(POLICY)


def intent(steps: int) -> Any:
    tx = Saga("test", tx_id="tx-1")
    for i in range(steps):
        tx.step(ops.upsert_row("t", {"id": i}, {"v": i}))
    return tx.intent("polycommit.replies:0", "test")


def order(action: Any, step: int = -1, tx_id: str = "tx-1") -> OperatorReceived:
    command: OperatorCommand = {
        "tx_id": tx_id,
        "action": action,
        "step_index": step,
        "operator": "ada",
        "note": "fixed by hand",
        "at_ms": 5,
    }
    return OperatorReceived(command)


def stuck_saga() -> Transition:
    """Three steps: 0 and 1 applied, 2 fails; step 1's compensation keeps failing with its own error."""
    t = saga.start(intent(3), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "FAILED", "wrong vector size"), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "NOOP"), 0, POLICY)  # step 2 fenced
    now = 0
    while t.state["phase"] != "stuck":
        t = saga.on_outcome(t.state, reply(t.commands[0], "FAILED", "division by zero"), now, POLICY)
        if t.state["phase"] != "stuck":
            now = t.state["due_at_ms"]
            t = saga.on_due(t.state, now, POLICY)
    return t


def test_a_failing_compensation_keeps_its_own_error_apart_from_the_steps() -> None:
    state = stuck_saga().state
    assert state["current"] == 1 and state["steps"][1]["status"] == "compensation_failed"
    assert state["steps"][1]["compensation_error"]["message"] == "division by zero"  # type: ignore[index]
    assert state["steps"][1]["error"] is None
    assert state["steps"][2]["error"]["message"] == "wrong vector size"  # type: ignore[index]


def test_retry_sends_the_waiting_compensation_now_and_is_audited() -> None:
    stuck = stuck_saga()
    assert stuck.state["due_at_ms"] > 100
    t = PROTOCOL.decide(stuck.state, order("RETRY"), 100)
    (command,) = t.commands
    assert (command["action"], command["step_index"]) == ("COMPENSATE", 1)
    assert command["attempt"] == stuck.state["attempt"] + 1
    assert [a["kind"] for a in t.alerts] == ["operator"] and "RETRY by ada" in t.alerts[0]["message"]


def test_resolve_marks_the_step_and_compensation_goes_on_to_the_end() -> None:
    stuck = stuck_saga()
    t = PROTOCOL.decide(stuck.state, order("RESOLVE_STEP", 1), 100)
    assert [a["kind"] for a in t.alerts] == ["operator"] and "fixed by hand" in t.alerts[0]["message"]
    assert t.state["steps"][1]["status"] == "resolved_by_operator" and t.state["steps"][1]["resolved_by"] == "ada"
    (command,) = t.commands
    assert (command["action"], command["step_index"]) == ("COMPENSATE", 0)
    late = PROTOCOL.decide(t.state, OperatorReceived(order("RESOLVE_STEP", 1).command), 101)
    assert [a["kind"] for a in late.alerts] == ["operator_refused"] and late.state is t.state
    t = PROTOCOL.decide(t.state, OutcomeReceived(reply(command, "APPLIED")), 200)
    assert t.result is not None and t.result["status"] == "COMPENSATED"
    assert [s["status"] for s in t.result["steps"]] == ["compensated", "resolved_by_operator", "failed"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (order("RESOLVE_STEP", 0), "step 1 is being compensated, not step 0"),
        (order("RESOLVE_STEP", 7), "not step 7"),
    ],
)
def test_a_command_for_another_step_is_refused_with_its_reason(event: OperatorReceived, reason: str) -> None:
    stuck = stuck_saga()
    t = PROTOCOL.decide(stuck.state, event, 100)
    assert t.state is stuck.state and not t.commands and t.result is None
    assert [a["kind"] for a in t.alerts] == ["operator_refused"] and reason in t.alerts[0]["message"]


def test_commands_a_saga_cannot_carry_out_are_refused_in_every_phase() -> None:
    t = saga.start(intent(2), 0, POLICY)  # going forward, the step's command in flight
    for event in (order("RETRY"), order("RESOLVE_STEP", 0)):
        refused = PROTOCOL.decide(t.state, event, 1)
        assert [a["kind"] for a in refused.alerts] == ["operator_refused"] and not refused.commands
    done = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 0, POLICY)
    done = saga.on_outcome(done.state, reply(done.commands[0], "APPLIED"), 0, POLICY)
    assert done.state["phase"] == "completed"
    refused = PROTOCOL.decide(done.state, order("RETRY"), 1)
    assert "ended (completed)" in refused.alerts[0]["message"]


def test_a_command_for_another_transaction_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        PROTOCOL.decide(stuck_saga().state, order("RETRY", tx_id="tx-2"), 1)


# -- property: operator commands mixed into any sequence of events ----------------------------------

KINDS = ["APPLIED", "FAILED", "NOOP", "TIMER", "RETRY", "RESOLVE"]


def _random_event(state: SagaSnapshot, sent: list[StoreCommand], kind: str, pick: int) -> Any:
    if kind == "TIMER":
        return TimerDue()
    if kind == "RETRY":
        return order("RETRY")
    if kind == "RESOLVE":
        return order("RESOLVE_STEP", pick % (len(state["steps"]) + 1))
    command = sent[-1]
    status = "APPLIED" if kind == "NOOP" and command["action"] == "EXECUTE" else kind
    return OutcomeReceived(reply(command, status))


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 4), events=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 9)), max_size=60))
def test_operator_commands_never_crash_never_mutate_and_never_reopen_an_ended_saga(
    steps: int, events: list[tuple[str, int]]
) -> None:
    t = PROTOCOL.start(intent(steps), 0)
    state, sent, now, ended = t.state, list(t.commands), 0, False
    for kind, pick in events:
        now += 10 if kind != "TIMER" else max(10, state["due_at_ms"] - now)
        before = copy.deepcopy(state)
        t = PROTOCOL.decide(state, _random_event(state, sent, kind, pick), now)
        assert state == before, "a transition never mutates the state it was given"
        if ended:  # an ended saga only answers operators with refusals
            assert t.state is state and not t.commands and t.result is None
            assert {a["kind"] for a in t.alerts} <= {"operator_refused"}
        if kind in ("RETRY", "RESOLVE") and not t.commands and t.result is None:
            assert [a["kind"] for a in t.alerts] in (["operator_refused"], ["operator"])
        state, sent = t.state, sent + t.commands
        ended = ended or registry.is_terminal(state)
    if state["phase"] == "compensated":
        assert not any(s["status"] in saga.MAY_HAVE_APPLIED for s in state["steps"])
    if state["phase"] == "completed":
        assert all(s["status"] == "applied" for s in state["steps"])
