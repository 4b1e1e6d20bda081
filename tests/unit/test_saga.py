"""The saga state machine, driven by plain lists of events: no Kafka, no stores, no clock."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from step_replies import reply

from orchestrator import saga
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.events import SagaSnapshot, StoreCommand

POLICY = saga.SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=3)


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


def test_a_saga_runs_its_steps_in_order_and_completes() -> None:
    t = saga.start(intent(3), 0, POLICY)
    seen = []
    while t.commands:
        (command,) = t.commands
        seen.append((command["step_index"], command["action"]))
        t = saga.on_outcome(t.state, reply(command, "APPLIED", before=f"b{command['step_index']}"), 1, POLICY)
    assert seen == [(0, "EXECUTE"), (1, "EXECUTE"), (2, "EXECUTE")]
    assert t.result is not None and t.result["status"] == "COMPLETED"
    assert t.state["before_images"] == ["b0", "b1", "b2"]
    assert [s["status"] for s in t.result["steps"]] == ["applied"] * 3


def test_third_step_failing_compensates_step_two_then_step_one() -> None:
    t = saga.start(intent(3), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED", before="b0"), 1, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED", before="b1"), 2, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "FAILED"), 3, POLICY)
    order = []
    while t.commands:
        (command,) = t.commands
        order.append((command["step_index"], command["action"], command["before_image"]))
        status = "NOOP" if command["step_index"] == 2 else "APPLIED"  # the failed step changed nothing
        t = saga.on_outcome(t.state, reply(command, status), 4, POLICY)
    # The failed step is fenced first (its store records a no-op compensation), then 2, then 1 are undone.
    assert order == [(2, "COMPENSATE", None), (1, "COMPENSATE", "b1"), (0, "COMPENSATE", "b0")]
    assert t.result is not None and t.result["status"] == "COMPENSATED"
    assert [s["status"] for s in t.result["steps"]] == ["compensated", "compensated", "failed"]


def test_retriable_failures_are_retried_with_growing_delays_then_succeed() -> None:
    t = saga.start(intent(1, retries=3), 0, POLICY)
    now, delays = 0, []
    for _ in range(2):
        t = saga.on_outcome(t.state, reply(t.commands[0], "FAILED", retriable=True), now, POLICY)
        assert not t.commands and not t.state["waiting"]
        delays.append(t.state["due_at_ms"] - now)
        assert saga.on_due(t.state, t.state["due_at_ms"] - 1, POLICY).commands == []  # not before it is due
        now = t.state["due_at_ms"]
        t = saga.on_due(t.state, now, POLICY)
        assert t.commands[0]["attempt"] == len(delays) + 1
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), now, POLICY)
    assert t.result is not None and t.result["status"] == "COMPLETED"
    assert t.result["steps"][0]["attempts"] == 3
    assert delays[1] > delays[0] >= POLICY.backoff_base_ms // 2


def test_permanent_failure_is_not_retried() -> None:
    t = saga.start(intent(2, retries=5), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 1, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "FAILED", retriable=False), 2, POLICY)
    assert [(c["step_index"], c["action"]) for c in t.commands] == [(1, "COMPENSATE")]  # fence, not retry
    t = saga.on_outcome(t.state, reply(t.commands[0], "NOOP"), 3, POLICY)
    assert [(c["step_index"], c["action"]) for c in t.commands] == [(0, "COMPENSATE")]


def test_a_step_past_its_timeout_counts_as_failed_and_is_itself_compensated() -> None:
    t = saga.start(intent(2, timeout=0.5), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 10, POLICY)
    assert t.state["due_at_ms"] == 10 + 500
    t = saga.on_due(t.state, 510, POLICY)
    # The timed-out step may have applied after all: it is compensated first, then step 0.
    assert [(c["step_index"], c["action"]) for c in t.commands] == [(1, "COMPENSATE")]
    assert t.state["steps"][1]["status"] == "timed_out"
    assert t.state["error"] is not None and t.state["error"]["error_class"] == "StepTimeout"
    t = saga.on_outcome(t.state, reply(t.commands[0], "NOOP"), 520, POLICY)
    assert [(c["step_index"], c["action"]) for c in t.commands] == [(0, "COMPENSATE")]
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 530, POLICY)
    assert t.result is not None and t.result["status"] == "COMPENSATED"
    assert t.result["steps"][1]["status"] == "not_applied"


def test_a_late_success_after_a_timeout_retry_still_counts() -> None:
    t = saga.start(intent(1, retries=1, timeout=0.1), 0, POLICY)
    first = t.commands[0]
    t = saga.on_due(t.state, 100, POLICY)  # timeout: retry scheduled
    t = saga.on_due(t.state, t.state["due_at_ms"], POLICY)
    assert t.commands[0]["attempt"] == 2
    t = saga.on_outcome(t.state, reply(first, "APPLIED"), 200, POLICY)
    assert t.result is not None and t.result["status"] == "COMPLETED"


def test_a_compensation_that_always_fails_ends_stuck_and_keeps_being_retried() -> None:
    t = saga.start(intent(2), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "FAILED"), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "NOOP"), 0, POLICY)  # the failed step, fenced
    results, alerts, now = [], [], 0
    for _ in range(6):
        (command,) = t.commands
        assert command["action"] == "COMPENSATE"
        t = saga.on_outcome(t.state, reply(command, "FAILED"), now, POLICY)
        results += [t.result] if t.result else []
        alerts += t.alerts
        assert t.state["due_at_ms"] > now
        now = t.state["due_at_ms"]
        t = saga.on_due(t.state, now, POLICY)
    assert [r["status"] for r in results] == ["STUCK"]  # reported once, never dropped
    assert [a["kind"] for a in alerts] == ["stuck"]
    assert t.state["phase"] == "stuck" and t.commands  # still retrying
    t = saga.on_outcome(t.state, reply(t.commands[0], "APPLIED"), now, POLICY)
    assert t.result is not None and t.result["status"] == "COMPENSATED"
    assert [a["kind"] for a in t.alerts] == ["resolved"]


def test_an_invalid_intent_fails_before_any_step_runs() -> None:
    bad = intent(3)
    bad["steps"][2]["operation"]["store"] = "mongodb"
    t = saga.start(bad, 0, POLICY)
    assert t.commands == []
    assert t.result is not None and t.result["status"] == "FAILED"
    assert t.result["error"] is not None and t.result["error"]["error_class"] == "UnknownStoreError"
    assert t.result["steps"][2]["error"] is not None


def test_execute_skipped_because_already_compensated_compensates_the_rest() -> None:
    t = saga.start(intent(2), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "ALREADY_APPLIED"), 0, POLICY)
    t = saga.on_outcome(t.state, reply(t.commands[0], "SKIPPED"), 0, POLICY)
    assert [(c["step_index"], c["action"]) for c in t.commands] == [(0, "COMPENSATE")]


def test_stale_and_duplicate_outcomes_change_nothing() -> None:
    t = saga.start(intent(2), 0, POLICY)
    first = t.commands[0]
    t = saga.on_outcome(t.state, reply(first, "APPLIED"), 0, POLICY)
    again = saga.on_outcome(t.state, reply(first, "APPLIED"), 0, POLICY)
    assert again.commands == [] and again.state is t.state


def test_backoff_is_deterministic_and_capped() -> None:
    assert POLICY.backoff_ms("a", 3) == POLICY.backoff_ms("a", 3)
    assert all(POLICY.backoff_ms("a", n) <= POLICY.backoff_max_ms for n in range(1, 40))


# -- property: random interleavings of outcomes, timeouts and duplicates ---------------------------

EVENTS = st.lists(st.sampled_from(["APPLIED", "FAILED_R", "FAILED_P", "TIMEOUT", "DUP", "NOOP"]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 4), retries=st.integers(0, 2), events=EVENTS)
def test_invariants_hold_under_any_interleaving(steps: int, retries: int, events: list[str]) -> None:
    t = saga.start(intent(steps, retries=retries), 0, POLICY)
    state: SagaSnapshot = t.state
    in_flight = list(t.commands)
    history: list[StoreCommand] = list(in_flight)
    final = None
    now = 0
    for kind in events:
        now += 10
        if kind == "TIMEOUT":
            now = max(now, state["due_at_ms"])
            t = saga.on_due(state, now, POLICY)
        elif not in_flight:
            continue
        else:
            command = in_flight[-1]
            status = {"FAILED_R": "FAILED", "FAILED_P": "FAILED", "DUP": "APPLIED"}.get(kind, kind)
            if status == "NOOP" and command["action"] == "EXECUTE":
                status = "APPLIED"
            t = saga.on_outcome(state, reply(command, status, retriable=kind == "FAILED_R"), now, POLICY)
        state = t.state
        in_flight += t.commands
        history += t.commands
        if t.result is not None and t.result["status"] != "STUCK":
            assert final is None, "a transaction ends once"
            final = t.result["status"]
    # A compensation is only ever sent for a step that was sent for execution, in reverse order.
    executed = {c["step_index"] for c in history if c["action"] == "EXECUTE"}
    compensated = [c["step_index"] for c in history if c["action"] == "COMPENSATE"]
    assert set(compensated) <= executed
    firsts = list(dict.fromkeys(compensated))
    assert firsts == sorted(firsts, reverse=True)
    if final == "COMPLETED":
        assert not compensated
        assert all(s["status"] == "applied" for s in state["steps"])
    if final == "COMPENSATED":
        assert not any(s["status"] in saga.MAY_HAVE_APPLIED for s in state["steps"])
