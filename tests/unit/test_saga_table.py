"""The saga's transition table: impossible events raise ProtocolError, late and duplicate ones change
nothing, and under any sequence of events a step is never both kept and undone, and an ended saga stays
ended."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st
from step_replies import reply

from orchestrator import registry, saga
from orchestrator.protocol import IntentReceived, OutcomeReceived, TimerDue, Transition, dispatch
from orchestrator.saga import SagaEvent, SagaPhase
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.codec import MAGIC, default_codec
from polycommit.errors import ProtocolError
from polycommit.events import SagaSnapshot, StepOutcome, StoreCommand
from projections import tx_state

POLICY = saga.SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=3)
PROTOCOL = saga.SagaProtocol(POLICY)


def intent(steps: int = 3, retries: int = 0, timeout: float = 0.0) -> Any:
    """A saga of `steps` writes across the stores, each declared `after` the one before: one at a time
    (independent steps run in parallel: tests/unit/test_saga_parallel.py)."""
    tx = Saga("test", tx_id="tx-1")
    stores = [
        ops.upsert_row("t", {"id": 1}, {"v": 1}),
        ops.merge_node("N", {"id": 1}),
        ops.upsert_points("c", [ops.point(1, [0.1, 0.2])]),
        ops.upsert_row("t", {"id": 2}, {"v": 2}),
    ]
    for i in range(steps):
        tx.step(stores[i % len(stores)], retries=retries, timeout=timeout, after=[i - 1] if i else [])
    return tx.intent("polycommit.replies:0", "test")


def outcome(state: SagaSnapshot, action: str, status: str, *, step: int | None = None, attempt: int = 1) -> StepOutcome:
    index = state["current"] if step is None else step
    return {
        "tx_id": state["intent"]["tx_id"],
        "step_index": index,
        "action": action,  # type: ignore[typeddict-item]
        "attempt": attempt,
        "store": state["steps"][index]["store"] if index < len(state["steps"]) else "postgres",
        "status": status,  # type: ignore[typeddict-item]
        "before_image": None,
        "error": {"error_class": "StoreError", "message": "boom", "retriable": True} if status == "FAILED" else None,
        "at_ms": 0,
        "duration_us": 0,
    }


def assert_unchanged(before: SagaSnapshot, t: Transition) -> None:
    assert t.state is before
    assert (t.commands, t.decisions, t.lock_requests, t.alerts, t.rejections, t.result) == ([], [], [], [], [], None)


# -- impossible events -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "status", "step"),
    [
        ("PREPARE", "PREPARED", None),  # a two-phase vote: a saga never sends PREPARE
        ("COMMIT", "APPLIED", None),
        ("EXECUTE", "VOTED_NO", None),
        ("EXECUTE", "NOOP", None),  # only a compensation can be a recorded no-op
        ("COMPENSATE", "SKIPPED", None),  # only an execution can be skipped
        ("EXECUTE", "APPLIED", 7),  # a step the saga does not have
        ("EXECUTE", "APPLIED", -1),
    ],
)
def test_an_impossible_outcome_raises_a_protocol_error(action: str, status: str, step: int | None) -> None:
    state = saga.start(intent(2), 0, POLICY).state
    before = copy.deepcopy(state)
    with pytest.raises(ProtocolError):
        PROTOCOL.decide(state, OutcomeReceived(outcome(state, action, status, step=step)), 1)
    assert state == before


def test_events_of_another_transaction_raise_a_protocol_error() -> None:
    state = saga.start(intent(2), 0, POLICY).state
    with pytest.raises(ProtocolError):
        PROTOCOL.decide(state, OutcomeReceived({**outcome(state, "EXECUTE", "APPLIED"), "tx_id": "other"}), 1)
    with pytest.raises(ProtocolError):
        PROTOCOL.decide(state, IntentReceived({**state["intent"], "tx_id": "other"}), 1)


def test_an_unknown_phase_and_a_missing_row_raise_a_protocol_error() -> None:
    state = saga.start(intent(2), 0, POLICY).state
    with pytest.raises(ProtocolError):
        PROTOCOL.decide({**state, "phase": "preparing"}, TimerDue(), 1)
    partial = {k: h for k, h in saga.TABLE.items() if k != (SagaPhase.FORWARD, SagaEvent.EXECUTED)}
    with pytest.raises(ProtocolError, match="step applied in phase forward"):
        dispatch(partial, (SagaPhase.FORWARD, SagaEvent.EXECUTED), state, None, 1, POLICY)


def test_every_phase_has_a_row_for_every_event_kind() -> None:
    assert set(saga.TABLE) == {(phase, kind) for phase in SagaPhase for kind in SagaEvent}


# -- late and duplicate events: explicit rows that change nothing ----------------------------------


def test_a_late_failure_of_an_attempt_given_up_on_changes_nothing() -> None:
    t = saga.start(intent(1, retries=2), 0, POLICY)
    first = t.commands[0]
    t = saga.on_outcome(t.state, reply(first, "FAILED", retriable=True), 10, POLICY)
    t = saga.on_due(t.state, t.state["due_at_ms"], POLICY)
    assert t.commands[0]["attempt"] == 2
    state = t.state
    assert saga.classify(state, OutcomeReceived(reply(first, "FAILED", retriable=True)), 0) is SagaEvent.STALE_OUTCOME
    assert_unchanged(state, saga.on_outcome(state, reply(first, "FAILED", retriable=True), 500, POLICY))


def test_an_outcome_for_a_step_not_in_flight_changes_nothing() -> None:
    t = saga.start(intent(3), 0, POLICY)
    first = t.commands[0]
    t = saga.on_outcome(t.state, reply(first, "APPLIED"), 1, POLICY)
    state = t.state
    for status in ("APPLIED", "FAILED", "SKIPPED"):
        assert_unchanged(state, saga.on_outcome(state, reply(first, status), 2, POLICY))
    assert_unchanged(state, PROTOCOL.decide(state, OutcomeReceived(outcome(state, "COMPENSATE", "APPLIED", step=0)), 2))


def test_a_duplicate_intent_and_an_early_timer_change_nothing() -> None:
    state = saga.start(intent(2), 0, POLICY).state
    assert_unchanged(state, PROTOCOL.decide(state, IntentReceived(state["intent"]), 1))
    assert_unchanged(state, PROTOCOL.decide(state, TimerDue(), state["due_at_ms"] - 1))


def test_a_late_execute_outcome_while_compensating_changes_nothing() -> None:
    t = saga.start(intent(2, timeout=0.1), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 1, POLICY)
    late = t.commands[0]
    t = saga.on_due(t.state, t.state["due_at_ms"], POLICY)  # step 1 timed out: compensating it
    assert t.state["phase"] == SagaPhase.COMPENSATING and t.commands[0]["step_index"] == 1
    for status in ("APPLIED", "FAILED", "SKIPPED"):
        assert_unchanged(t.state, saga.on_outcome(t.state, reply(late, status), 200, POLICY))


def test_every_event_after_the_end_changes_nothing() -> None:
    t = saga.start(intent(1), 0, POLICY)
    command = t.commands[0]
    t = saga.on_outcome(t.state, reply(command, "APPLIED"), 1, POLICY)
    assert t.result is not None and registry.is_terminal(t.state)
    end = t.state
    for event in (
        OutcomeReceived(reply(command, "APPLIED")),
        OutcomeReceived(reply(command, "FAILED")),
        OutcomeReceived(outcome(end, "COMPENSATE", "APPLIED")),
        IntentReceived(end["intent"]),
        TimerDue(),
    ):
        assert_unchanged(end, PROTOCOL.decide(end, event, 10_000))


# -- the seam: rejections, the protocol field, the registry ----------------------------------------


def test_an_invalid_intent_is_rejected_with_its_error() -> None:
    bad = intent(2)
    bad["steps"][1]["operation"]["store"] = "mongodb"
    t = PROTOCOL.start(bad, 0)
    assert [e["error_class"] for e in t.rejections] == ["UnknownStoreError"]
    assert t.state["phase"] == "failed" and t.result is not None and t.result["status"] == "FAILED"


def test_a_refusal_from_the_driver_fails_the_saga_before_any_step() -> None:
    refusal = {"error_class": "InvalidReplyToError", "message": "no such topic", "retriable": False}
    t = PROTOCOL.start(intent(2), 0, refusal)  # type: ignore[arg-type]
    assert t.commands == [] and t.rejections == [refusal]
    assert t.result is not None and t.result["status"] == "FAILED" and t.result["error"] == refusal


def test_snapshots_name_their_protocol_and_v1_snapshots_decode_as_sagas() -> None:
    codec = default_codec()
    state = saga.start(intent(2), 0, POLICY).state
    assert state["protocol"] == "saga"
    intent_bytes = codec.encode("TransactionIntent", state["intent"])
    record = tx_state.to_record(state, intent_bytes)
    decoded, _ = tx_state.decode(codec, codec.encode("SagaSnapshot", record))  # type: ignore[misc]
    assert decoded == state
    (v1,) = [w for w in codec.registry.writers.values() if w.event_type == "SagaSnapshot" and w.version == "1"]
    old = {k: v for k, v in record.items() if k != "protocol"}
    buffer = io.BytesIO()
    buffer.write(MAGIC + v1.fingerprint)
    schemaless_writer(buffer, v1.parsed, old)
    restored, _ = tx_state.decode(codec, buffer.getvalue())  # type: ignore[misc]
    assert restored["protocol"] == "saga" and registry.is_in_flight(restored)
    assert tx_state.fold([("a", restored)]) == {"a": restored}


def test_the_changelog_fold_skips_a_snapshot_of_an_unknown_protocol() -> None:
    codec = default_codec()
    state = saga.start(intent(2), 0, POLICY).state
    record = tx_state.to_record({**state, "protocol": "paxos"}, codec.encode("TransactionIntent", state["intent"]))
    folded = tx_state.fold_changelog(codec, [("a", codec.encode("SagaSnapshot", record))])
    assert folded.states == {} and folded.corrupt_snapshots == 1


# -- property: any sequence of events --------------------------------------------------------------

KINDS = ["APPLIED", "ALREADY_APPLIED", "FAILED_R", "FAILED_P", "SKIPPED", "NOOP", "TIMER", "INTENT", "OLD"]


def _event(state: SagaSnapshot, sent: list[StoreCommand], kind: str, pick: int) -> Any:
    if kind == "TIMER":
        return TimerDue()
    if kind == "INTENT":
        return IntentReceived(state["intent"])
    command = sent[-1] if kind != "OLD" else sent[pick % len(sent)]  # OLD: any command sent so far
    status = {"FAILED_R": "FAILED", "FAILED_P": "FAILED", "OLD": "APPLIED"}.get(kind, kind)
    valid = {"EXECUTE": ("APPLIED", "ALREADY_APPLIED", "FAILED", "SKIPPED")}.get(command["action"])
    if valid is not None and status not in valid:
        status = "APPLIED"
    if command["action"] == "COMPENSATE" and status == "SKIPPED":
        status = "NOOP"
    return OutcomeReceived(reply(command, status, retriable=kind == "FAILED_R"))


@settings(max_examples=400, deadline=None)
@given(
    steps=st.integers(1, 4),
    retries=st.integers(0, 2),
    events=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 50)), max_size=80),
)
def test_no_step_is_both_kept_and_undone_and_an_ended_saga_stays_ended(
    steps: int, retries: int, events: list[tuple[str, int]]
) -> None:
    t = PROTOCOL.start(intent(steps, retries=retries, timeout=0.05), 0)
    state, sent, now = t.state, list(t.commands), 0
    ended: SagaSnapshot | None = None
    for kind, pick in events:
        now += 10 if kind != "TIMER" else max(10, state["due_at_ms"] - now)
        before = copy.deepcopy(state)
        t = PROTOCOL.decide(state, _event(state, sent, kind, pick), now)
        assert state == before, "a transition never mutates the state it was given"
        if ended is not None:
            assert_unchanged(ended, t)
        state = t.state
        sent += t.commands
        if registry.is_terminal(state) and ended is None:
            ended = state
    undone = {c["step_index"] for c in sent if c["action"] == "COMPENSATE"}
    being_undone = state["current"] if state["phase"] in ("compensating", "stuck") else None
    for step in state["steps"]:
        # A step whose compensation was sent is undone or fenced (or is the one being compensated now).
        if step["index"] in undone and step["index"] != being_undone:
            assert step["status"] != "applied", state
    if state["phase"] == "completed":
        assert not undone and all(s["status"] == "applied" for s in state["steps"])
    if state["phase"] == "compensated":
        assert not any(s["status"] in saga.MAY_HAVE_APPLIED for s in state["steps"])
