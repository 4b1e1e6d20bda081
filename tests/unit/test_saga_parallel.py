"""Independent saga steps run in parallel: the order a saga declares (`after`) or implies (same store,
shared lock key) is kept, failures wait for the steps in flight, compensation runs in reverse order of
dependency. Pure: plain events, no Kafka, no stores, no clock."""

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
from orchestrator.protocol import IntentReceived, OperatorReceived, OutcomeReceived, TimerDue, Transition
from orchestrator.saga import SagaEvent, SagaPhase
from orchestrator.saga_model import command
from orchestrator.saga_order import upgrade
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.codec import MAGIC, default_codec
from polycommit.errors import InvalidOperationError
from polycommit.events import OperatorCommand, SagaSnapshot, StoreCommand
from projections import tx_state

POLICY = saga.SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=3)
PROTOCOL = saga.SagaProtocol(POLICY)
ROW, NODE, POINT = (
    ops.upsert_row("t", {"id": 1}, {"v": 1}),
    ops.merge_node("N", {"id": 1}),
    ops.upsert_points("c", [ops.point(1, [0.1, 0.2])]),
)


def three_stores(**step: Any) -> Any:
    """One write per store, no declared order: the common saga."""
    tx = Saga("parallel", tx_id="tx-p")
    for operation in (ROW, NODE, POINT):
        tx.step(operation, **step)
    return tx.intent("polycommit.replies:0", "test")


def sent(t: Transition) -> list[tuple[int, str]]:
    return sorted((c["step_index"], c["action"]) for c in t.commands)


def by_step(t: Transition) -> dict[int, StoreCommand]:
    return {c["step_index"]: c for c in t.commands}


def test_three_independent_steps_go_out_in_one_transition() -> None:
    t = saga.start(three_stores(), 0, POLICY)
    assert sent(t) == [(0, "EXECUTE"), (1, "EXECUTE"), (2, "EXECUTE")]
    assert t.state["waiting"] and all(f["waiting"] for f in t.state["flights"])
    commands = list(t.commands)
    for i, each in enumerate(commands):
        t = saga.on_outcome(t.state, reply(each, "APPLIED", before=f"b{i}"), 1 + i, POLICY)
        assert not t.commands  # nothing waits for anything: no new command, only the last one completes
    assert t.result is not None and t.result["status"] == "COMPLETED"
    assert t.state["before_images"] == ["b0", "b1", "b2"]


def test_declared_and_same_store_order_is_kept() -> None:
    tx = Saga("ordered", tx_id="tx-o")
    tx.step(ROW, name="row")  # 0
    tx.step(NODE, name="node")  # 1
    tx.step(ops.upsert_row("t", {"id": 2}, {"v": 2}))  # 2: same store as 0, so after it
    tx.step(POINT, after=["node"])  # 3: declared after step 1
    intent = tx.intent("r", "c")
    assert [s["after"] for s in intent["steps"]] == [[], [], [], [1]]
    t = saga.start(intent, 0, POLICY)
    assert t.state["waits_for"] == [[], [], [0], [1]]
    first = by_step(t)
    assert sorted(first) == [0, 1]
    t = saga.on_outcome(t.state, reply(first[0], "APPLIED"), 1, POLICY)
    assert sent(t) == [(2, "EXECUTE")]
    t = saga.on_outcome(t.state, reply(first[1], "APPLIED"), 2, POLICY)
    assert sent(t) == [(3, "EXECUTE")]


def test_steps_sharing_a_lock_key_across_stores_run_one_after_the_other() -> None:
    tx = Saga("shared", tx_id="tx-k")
    tx.step(ops.sql("UPDATE a SET x = 1", lock_keys=["account:7"]), compensate=ops.sql("UPDATE a SET x = 0"))
    tx.step(ops.cypher("MERGE (a:A {id: 7})", lock_keys=["account:7"]), compensate=ops.cypher("MATCH (a:A) DELETE a"))
    tx.step(POINT)
    t = saga.start(tx.intent("r", "c"), 0, POLICY)
    assert sent(t) == [(0, "EXECUTE"), (2, "EXECUTE")]
    t = saga.on_outcome(t.state, reply(by_step(t)[0], "APPLIED"), 1, POLICY)
    assert sent(t) == [(1, "EXECUTE")]


@pytest.mark.parametrize("after", [[1], [2], [-1], [7]])
def test_an_after_that_names_no_earlier_step_refuses_the_intent(after: list[int]) -> None:
    intent = three_stores()
    intent["steps"][1]["after"] = after
    t = PROTOCOL.start(intent, 0)
    assert t.commands == [] and t.result is not None and t.result["status"] == "FAILED"
    assert [e["error_class"] for e in t.rejections] == [InvalidOperationError.__name__]
    assert t.result["steps"][1]["error"] is not None


def test_the_sdk_refuses_an_after_name_it_cannot_resolve() -> None:
    tx = Saga("bad").step(ROW, name="a").step(NODE, name="a")
    with pytest.raises(InvalidOperationError):
        tx.step(POINT, after=["missing"])
    with pytest.raises(InvalidOperationError):
        tx.step(POINT, after=["a"])  # two earlier steps have that name


def test_a_failure_waits_for_the_steps_in_flight_then_compensates_in_reverse_dependency_order() -> None:
    tx = Saga("deps", tx_id="tx-d")
    tx.step(ROW)  # 0
    tx.step(NODE, after=[0])  # 1
    tx.step(POINT)  # 2: independent
    tx.step(ops.merge_node("N", {"id": 2}))  # 3: same store as 1, so after it
    t = saga.start(tx.intent("r", "c"), 0, POLICY)
    assert sent(t) == [(0, "EXECUTE"), (2, "EXECUTE")]
    point = by_step(t)[2]
    t = saga.on_outcome(t.state, reply(by_step(t)[0], "APPLIED", before="b0"), 1, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED", before="b1"), 2, POLICY)
    node = t.commands[0]
    assert node["step_index"] == 3
    t = saga.on_outcome(t.state, reply(point, "FAILED"), 3, POLICY)
    assert t.commands == [] and t.state["phase"] == SagaPhase.ABORTING  # step 3 still in flight: awaited
    assert t.state["error"] is not None and t.state["error"]["message"].startswith("step 2:")
    t = saga.on_outcome(t.state, reply(node, "APPLIED", before="b3"), 4, POLICY)
    assert t.state["phase"] == SagaPhase.COMPENSATING
    # 3 and the failed 2 (fenced) depend on nothing still to undo; 1 waits for 3, and 0 for 1.
    assert sent(t) == [(2, "COMPENSATE"), (3, "COMPENSATE")]
    pending = by_step(t)
    t = saga.on_outcome(t.state, reply(pending[2], "NOOP"), 5, POLICY)
    assert t.commands == []
    t = saga.on_outcome(t.state, reply(pending[3], "APPLIED"), 6, POLICY)
    assert sent(t) == [(1, "COMPENSATE")]
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 7, POLICY)
    assert [(c["step_index"], c["before_image"]) for c in t.commands] == [(0, "b0")]
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 8, POLICY)
    assert t.result is not None and t.result["status"] == "COMPENSATED"
    assert [s["status"] for s in t.result["steps"]] == ["compensated", "compensated", "failed", "compensated"]


def test_a_step_never_sent_is_not_compensated() -> None:
    tx = Saga("unsent", tx_id="tx-u").step(ROW).step(NODE, after=[0]).step(POINT)
    t = saga.start(tx.intent("r", "c"), 0, POLICY)
    first = by_step(t)
    t = saga.on_outcome(t.state, reply(first[0], "FAILED"), 1, POLICY)
    assert t.commands == [] and t.state["phase"] == SagaPhase.ABORTING  # step 2 in flight; 1 never sent
    t = saga.on_outcome(t.state, reply(first[2], "APPLIED"), 2, POLICY)
    assert sent(t) == [(0, "COMPENSATE"), (2, "COMPENSATE")]
    assert t.state["steps"][1]["status"] == "pending" and t.state["steps"][1]["attempts"] == 0


def test_one_parallel_step_timing_out_waits_for_the_others_then_compensates_all() -> None:
    intent = three_stores()
    intent["steps"][1]["timeout_ms"] = 500
    t = saga.start(intent, 0, POLICY)
    first = by_step(t)
    assert t.state["due_at_ms"] == 500  # the earliest of the steps' timeouts: the driver's one timer
    t = saga.on_outcome(t.state, reply(first[0], "APPLIED"), 10, POLICY)
    t = saga.on_due(t.state, 500, POLICY)
    assert t.commands == [] and t.state["steps"][1]["status"] == "timed_out"
    assert t.state["phase"] == SagaPhase.ABORTING and t.state["due_at_ms"] == 1000  # step 2's timeout
    t = saga.on_outcome(t.state, reply(first[2], "APPLIED"), 600, POLICY)
    assert sent(t) == [(0, "COMPENSATE"), (1, "COMPENSATE"), (2, "COMPENSATE")]
    assert t.state["error"] is not None and t.state["error"]["error_class"] == "StepTimeout"


def test_a_retry_of_one_parallel_step_leaves_the_others_alone() -> None:
    t = saga.start(three_stores(retries=2), 0, POLICY)
    first = by_step(t)
    t = saga.on_outcome(t.state, reply(first[1], "FAILED", retriable=True), 10, POLICY)
    assert t.commands == [] and t.state["phase"] == SagaPhase.FORWARD
    due = t.state["flights"][1]["due_at_ms"]
    assert t.state["due_at_ms"] == due < 1000
    t = saga.on_due(t.state, due, POLICY)
    assert [(c["step_index"], c["attempt"]) for c in t.commands] == [(1, 2)]
    again = t.commands[0]
    for each in (first[0], first[2], again):
        t = saga.on_outcome(t.state, reply(each, "APPLIED"), due + 1, POLICY)
    assert t.result is not None and t.result["status"] == "COMPLETED"


def test_a_failure_gives_up_the_retries_waiting_for_their_backoff() -> None:
    t = saga.start(three_stores(retries=2), 0, POLICY)
    first = by_step(t)
    t = saga.on_outcome(t.state, reply(first[1], "FAILED", retriable=True), 10, POLICY)  # retry scheduled
    t = saga.on_outcome(t.state, reply(first[2], "FAILED", retriable=False), 11, POLICY)
    assert t.state["phase"] == SagaPhase.ABORTING and t.state["steps"][1]["status"] == "failed"
    t = saga.on_outcome(t.state, reply(first[0], "APPLIED"), 12, POLICY)
    assert sent(t) == [(0, "COMPENSATE"), (1, "COMPENSATE"), (2, "COMPENSATE")]


def test_the_rows_of_aborting() -> None:
    t = saga.start(three_stores(), 0, POLICY)
    first = by_step(t)
    t = saga.on_outcome(t.state, reply(first[0], "FAILED"), 1, POLICY)
    state = t.state
    assert state["phase"] == SagaPhase.ABORTING
    late = OutcomeReceived(reply(first[0], "FAILED"))
    compensation = OutcomeReceived({**reply(first[1], "APPLIED"), "action": "COMPENSATE"})
    unchanged_events: list[tuple[Any, SagaEvent]] = [
        (IntentReceived(state["intent"]), SagaEvent.INTENT_AGAIN),
        (late, SagaEvent.STALE_OUTCOME),
        (compensation, SagaEvent.COMPENSATED),
        (OutcomeReceived({**reply(first[1], "FAILED"), "action": "COMPENSATE"}), SagaEvent.COMPENSATE_FAILED),
        (TimerDue(), SagaEvent.TIMER_EARLY),
    ]
    for event, kind in unchanged_events:
        assert saga.classify(state, event, 2) is kind
        after = PROTOCOL.decide(state, event, 2)
        assert after.state is state and not after.commands and after.result is None
    for action in ("RETRY", "RESOLVE_STEP"):
        refused = PROTOCOL.decide(state, OperatorReceived(_order(action, 1)), 2)
        assert [a["kind"] for a in refused.alerts] == ["operator_refused"] and refused.state is state
    skipped = PROTOCOL.decide(state, OutcomeReceived(reply(first[1], "SKIPPED")), 3)
    assert skipped.state["steps"][1]["status"] == "skipped" and not skipped.commands
    failed = PROTOCOL.decide(state, OutcomeReceived(reply(first[1], "FAILED", retriable=True)), 3)
    assert failed.state["steps"][1]["status"] == "failed" and not failed.commands  # no retry once aborting
    timed_out = PROTOCOL.decide(state, TimerDue(), 1000)
    assert [s["status"] for s in timed_out.state["steps"]] == ["failed", "timed_out", "timed_out"]
    assert sent(timed_out) == [(0, "COMPENSATE"), (1, "COMPENSATE"), (2, "COMPENSATE")]


def _order(action: Any, step: int) -> OperatorCommand:
    return {"tx_id": "tx-p", "action": action, "step_index": step, "operator": "ada", "note": "", "at_ms": 1}


def test_operator_resolves_one_of_two_compensations_and_retries_the_other() -> None:
    t = saga.start(three_stores(), 0, POLICY)
    first = by_step(t)
    t = saga.on_outcome(t.state, reply(first[0], "APPLIED"), 1, POLICY)
    t = saga.on_outcome(t.state, reply(first[1], "APPLIED"), 1, POLICY)
    t = saga.on_outcome(t.state, reply(first[2], "FAILED"), 1, POLICY)
    undo = by_step(t)
    t = saga.on_outcome(t.state, reply(undo[0], "FAILED"), 2, POLICY)
    t = saga.on_outcome(t.state, reply(undo[1], "FAILED"), 2, POLICY)
    assert saga.classify(t.state, OperatorReceived(_order("RESOLVE_STEP", 0)), 3) is SagaEvent.OPERATOR_RESOLVE
    t = PROTOCOL.decide(t.state, OperatorReceived(_order("RESOLVE_STEP", 0)), 3)
    assert t.state["steps"][0]["status"] == "resolved_by_operator" and not t.commands
    t = PROTOCOL.decide(t.state, OperatorReceived(_order("RETRY", -1)), 4)
    assert [(c["step_index"], c["attempt"]) for c in t.commands] == [(1, 2)]
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 5, POLICY)
    t = saga.on_outcome(t.state, reply(undo[2], "NOOP"), 6, POLICY)
    assert t.result is not None and t.result["status"] == "COMPENSATED"


def _v3_snapshot(state: dict[str, Any], codec: Any) -> bytes:
    (v3,) = [w for w in codec.registry.writers.values() if w.event_type == "SagaSnapshot" and w.version == "3"]
    old = {k: v for k, v in state.items() if k not in ("flights", "waits_for")}
    buffer = io.BytesIO()
    buffer.write(MAGIC + v3.fingerprint)
    schemaless_writer(buffer, v3.parsed, {**old, "intent": codec.encode("TransactionIntent", state["intent"])})
    return buffer.getvalue()


def test_a_v3_snapshot_of_a_saga_going_forward_is_restored_and_finishes() -> None:
    codec = default_codec()
    intent = three_stores()
    # What the sequential coordinator wrote: step 0 applied, step 1 in flight (attempt 1), step 2 not sent.
    old: dict[str, Any] = {**saga.start(intent, 0, POLICY).state, "current": 1, "attempt": 1, "waiting": True}
    old["steps"] = [{**s} for s in old["steps"]]
    old["steps"][0].update(status="applied", attempts=1)
    old["steps"][2]["attempts"] = 0
    restored, _ = tx_state.decode(codec, _v3_snapshot(old, codec))  # type: ignore[misc]
    assert restored["flights"] == [] and registry.is_in_flight(restored)
    in_flight = command(_upgraded(restored), 1, "EXECUTE", 0)
    t = PROTOCOL.decide(restored, OutcomeReceived(reply(in_flight, "APPLIED")), 10)
    assert sent(t) == [(2, "EXECUTE")]  # the rest runs on the new rules
    t = PROTOCOL.decide(t.state, OutcomeReceived(reply(t.commands[0], "APPLIED")), 11)
    assert t.result is not None and t.result["status"] == "COMPLETED"


def test_a_v3_snapshot_of_a_compensating_saga_is_restored_and_finishes() -> None:
    codec = default_codec()
    old: dict[str, Any] = {**saga.start(three_stores(), 0, POLICY).state, "phase": "compensating", "current": 1}
    old.update(attempt=2, waiting=True, due_at_ms=3000)
    old["steps"] = [{**s} for s in old["steps"]]
    for step, status in zip(old["steps"], ["applied", "applied", "failed"], strict=True):
        step.update(status=status, attempts=1)
    restored, _ = tx_state.decode(codec, _v3_snapshot(old, codec))  # type: ignore[misc]
    assert PROTOCOL.decide(restored, TimerDue(), 2999).commands == []  # the old timer still holds
    compensation = command(_upgraded(restored), 1, "COMPENSATE", 0)
    assert compensation["attempt"] == 2
    t = PROTOCOL.decide(restored, OutcomeReceived(reply(compensation, "APPLIED")), 10)
    assert sent(t) == [(0, "COMPENSATE")]  # step 2 was fenced already (above the current step)
    t = PROTOCOL.decide(t.state, OutcomeReceived(reply(t.commands[0], "APPLIED")), 11)
    assert t.result is not None and t.result["status"] == "COMPENSATED"


def _upgraded(state: SagaSnapshot) -> SagaSnapshot:
    """The restored state as the saga sees it, to build the command the old coordinator had in flight."""
    return upgrade(state)


# -- properties: any interleaving of the parallel steps' outcomes -----------------------------------

EVENTS = st.lists(
    st.tuples(st.sampled_from(["APPLIED", "FAILED_R", "FAILED_P", "TIMER", "NOOP", "DUP"]), st.integers(0, 20)),
    max_size=60,
)


def _run(intent: Any, events: list[tuple[str, int]]) -> tuple[list[SagaSnapshot], list[list[StoreCommand]]]:
    t = PROTOCOL.start(intent, 0)
    states, batches, now = [t.state], [list(t.commands)], 0
    open_commands: list[StoreCommand] = list(t.commands)
    for kind, pick in events:
        now += 10
        if kind == "TIMER":
            now = max(now, t.state["due_at_ms"])
            event: Any = TimerDue()
        elif not open_commands:
            continue
        else:
            command = open_commands[pick % len(open_commands)]
            status = {"FAILED_R": "FAILED", "FAILED_P": "FAILED", "DUP": "APPLIED"}.get(kind, kind)
            if status == "NOOP" and command["action"] == "EXECUTE":
                status = "APPLIED"
            if kind != "DUP":
                open_commands.remove(command)
            event = OutcomeReceived(reply(command, status, retriable=kind == "FAILED_R"))
        t = PROTOCOL.decide(t.state, event, now)
        open_commands += t.commands
        states.append(t.state)
        batches.append(list(t.commands))
    return states, batches


@settings(max_examples=300, deadline=None)
@given(retries=st.integers(0, 1), events=EVENTS)
def test_replay_of_the_same_events_gives_the_same_states(retries: int, events: list[tuple[str, int]]) -> None:
    intent = three_stores(retries=retries, timeout=0.05)
    assert _run(intent, events) == _run(copy.deepcopy(intent), events)


@settings(max_examples=300, deadline=None)
@given(retries=st.integers(0, 1), events=EVENTS)
def test_no_compensation_while_a_step_executes_and_dependents_are_undone_first(
    retries: int, events: list[tuple[str, int]]
) -> None:
    tx = Saga("deps", tx_id="tx-d").step(ROW, retries=retries, timeout=0.05).step(NODE, after=[0]).step(POINT)
    states, batches = _run(tx.intent("r", "c"), events)
    executing: set[int] = set()
    for state, batch in zip(states, batches, strict=True):
        actions = {c["action"] for c in batch}
        if "COMPENSATE" in actions:
            assert "EXECUTE" not in actions
            assert state["phase"] in ("compensating", "stuck")
            assert all(s["status"] != "pending" or not s["attempts"] for s in state["steps"])  # none in flight
        executing |= {c["step_index"] for c in batch if c["action"] == "EXECUTE"}
    compensated = [c["step_index"] for batch in batches for c in batch if c["action"] == "COMPENSATE"]
    assert set(compensated) <= executing
    firsts = list(dict.fromkeys(compensated))
    if 0 in firsts and 1 in firsts:
        assert firsts.index(1) < firsts.index(0)  # 1 runs after 0: it is undone first
    final = states[-1]
    if final["phase"] == "compensated":
        assert not any(s["status"] in saga.MAY_HAVE_APPLIED for s in final["steps"])
