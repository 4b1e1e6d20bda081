"""Sagas under the `Locking` wrapper: exclusive locks on every write key before the first command, FIFO
waits that end with the holder (completed or compensated, never while stuck), a lock-wait timeout that
fails the saga with nothing run, the opt-out, and a restore that rebuilds the table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from step_replies import reply

from orchestrator import registry
from orchestrator.locking import TABLE, Locking, LockingEvent, LockingPhase, write_keys
from orchestrator.protocol import IntentReceived, LocksGranted, OperatorReceived, OutcomeReceived, TimerDue, Transition
from orchestrator.saga import SagaPolicy, SagaProtocol
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.codec import default_codec
from polycommit.events import OperatorCommand, StoreCommand
from projections import tx_state

POLICY = SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=2)
ROW, NODE, POINT = 'postgres:t:{"id":1}', 'neo4j:N:{"id":1}', "qdrant:c:1"


def locked() -> Locking:
    return Locking(SagaProtocol(POLICY), lock_wait_ms=500)


def intent(tx_id: str, row: int = 1, **options: Any) -> Any:
    saga = Saga("locked", tx_id=tx_id, **options)
    saga.step(ops.upsert_row("t", {"id": row}, {"v": tx_id}))
    saga.step(ops.merge_node("N", {"id": row}, {"v": tx_id}))
    saga.step(ops.upsert_points("c", [ops.point(row, [0.1, 0.2], {"v": tx_id})]))
    return saga.intent("polycommit.replies:0", "test")


Reply = Callable[[StoreCommand], str]


def run(protocol: Locking, t: Transition, status: Reply = lambda c: "APPLIED", now: int = 10) -> Transition:
    """Answer every command the saga sends (whatever order it sends them in) until it sends none."""
    pending = list(t.commands)
    last = t
    while pending:
        command = pending.pop(0)
        last = protocol.decide(last.state, OutcomeReceived(reply(command, status(command))), now)
        pending.extend(last.commands)
    return last


def actions(t: Transition) -> dict[str, str]:
    return {e["resource"]: e["action"] for e in t.lock_requests}


def test_write_keys_are_every_step_and_compensation_key_sorted() -> None:
    saga = Saga("raw", tx_id="tx-raw")
    undo = ops.sql("DELETE FROM t WHERE id = 9", lock_keys=["postgres:t:9", "postgres:t:undo"])
    saga.step(ops.sql("INSERT INTO t VALUES (9)", lock_keys=["postgres:t:9"]), compensate=undo)
    saga.step(ops.merge_node("N", {"id": 1}))
    assert write_keys(saga.intent("", "test")) == [NODE, "postgres:t:9", "postgres:t:undo"]


def test_free_keys_are_granted_and_the_saga_starts_in_the_same_transition() -> None:
    protocol = locked()
    t = protocol.start(intent("tx-1"), 0)
    assert [c["action"] for c in t.commands][:1] == ["EXECUTE"]
    assert actions(t) == {ROW: "GRANTED", NODE: "GRANTED", POINT: "GRANTED"}
    assert all(e["mode"] == "EXCLUSIVE" and e["tx_id"] == "tx-1" for e in t.lock_requests)
    assert protocol.locks.holds_all("tx-1")
    other = protocol.start(intent("tx-2", row=2), 1)  # disjoint keys: no wait
    assert other.commands and set(actions(other).values()) == {"GRANTED"}


def test_a_saga_on_a_held_key_waits_with_nothing_sent_and_goes_on_when_the_holder_completes() -> None:
    protocol = locked()
    first = protocol.start(intent("tx-1"), 0)
    second = protocol.start(intent("tx-2"), 5)
    assert second.state["phase"] == LockingPhase.LOCKING and not second.commands and second.result is None
    assert actions(second) == {ROW: "WAITING", NODE: "WAITING", POINT: "WAITING"}
    assert all(e["blockers"] == ["tx-1"] for e in second.lock_requests)
    assert protocol.decide(second.state, LocksGranted(), 6).state is second.state  # not its turn yet
    assert protocol.decide(second.state, TimerDue(), 6).state is second.state  # its deadline is later
    done = run(protocol, first)
    assert done.result is not None and done.result["status"] == "COMPLETED"
    assert actions(done) == {ROW: "RELEASED", NODE: "RELEASED", POINT: "RELEASED"}
    assert done.wake == ["tx-2"]
    woken = protocol.decide(second.state, LocksGranted(), 20)
    assert [c["action"] for c in woken.commands][:1] == ["EXECUTE"] and woken.commands[0]["tx_id"] == "tx-2"
    assert set(actions(woken).values()) == {"GRANTED"}
    assert woken.state["started_at_ms"] == 5  # the wait counts in its duration and keeps its arrival order
    assert run(protocol, woken).result["status"] == "COMPLETED"  # type: ignore[index]
    assert len(protocol.locks) == 0


def test_the_current_waits_are_announced_again_until_granted() -> None:
    protocol = locked()
    first = protocol.start(intent("tx-1"), 0)
    second = protocol.start(intent("tx-2"), 5)
    again = protocol.waits.current(2005)
    assert {(e["tx_id"], e["resource"], e["action"], e["at_ms"]) for e in again} == {
        ("tx-2", key, "WAITING", 2005) for key in (ROW, NODE, POINT)
    }
    assert all(e["blockers"] == ["tx-1"] for e in again)
    run(protocol, first)
    protocol.decide(second.state, LocksGranted(), 20)
    assert protocol.waits.current(4005) == []


def test_a_compensated_holder_releases_its_locks_but_a_stuck_one_keeps_them() -> None:
    protocol = locked()
    first = protocol.start(intent("tx-1"), 0)
    protocol.start(intent("tx-2"), 1)
    # The last step fails; compensations of the others keep failing: the saga is stuck, still holding.
    last = first.state["intent"]["steps"][-1]["index"]

    def failing(command: StoreCommand) -> str:
        return "FAILED" if command["step_index"] == last or command["action"] == "COMPENSATE" else "APPLIED"

    t = run(protocol, first, failing)
    for _ in range(100):  # compensation retries with backoff until the saga is reported stuck
        if t.state["phase"] == "stuck":
            break
        t = protocol.decide(t.state, TimerDue(), t.state["due_at_ms"])
        t = run(protocol, t, failing) if t.commands else t
    assert t.state["phase"] == "stuck"
    assert protocol.locks.holds_all("tx-1") and not protocol.locks.holds_all("tx-2") and not t.wake
    # The operator fixes the store; the compensations now succeed: the saga ends compensated and lets tx-2 in.
    t = protocol.decide(t.state, TimerDue(), t.state["due_at_ms"])
    t = run(protocol, t)
    assert t.result is not None and t.result["status"] == "COMPENSATED"
    assert t.wake == ["tx-2"]


def test_a_lock_wait_past_its_deadline_fails_with_nothing_run() -> None:
    protocol = locked()
    protocol.start(intent("tx-1"), 0)
    second = protocol.start(intent("tx-2", lock_wait=0.2), 10)  # the intent's own lock wait wins
    assert second.state["due_at_ms"] == 210
    early = protocol.decide(second.state, TimerDue(), 209)
    assert early.state is second.state
    over = protocol.decide(second.state, TimerDue(), 210)
    assert over.result is not None and over.result["status"] == "FAILED" and not over.commands
    assert over.state["phase"] == LockingPhase.TIMED_OUT and protocol.is_terminal(over.state["phase"])
    error = over.result["error"]
    assert error is not None and error["error_class"] == "LockTimeoutError" and error["retriable"]
    assert "tx-1" in error["message"]
    assert all(s["attempts"] == 0 and s["status"] == "pending" for s in over.result["steps"])
    assert set(actions(over).values()) == {"RELEASED"} and "tx-2" not in protocol.locks
    assert protocol.decide(over.state, LocksGranted(), 300).state is over.state  # terminal: nothing moves


def test_an_expired_waiter_that_held_some_keys_lets_the_next_one_in() -> None:
    protocol = locked()
    protocol.start(intent("tx-1", row=1), 0)
    both = Saga("both", tx_id="tx-2", lock_wait=0.1)
    both.step(ops.upsert_row("t", {"id": 1}, {"v": 2})).step(ops.upsert_row("t", {"id": 2}, {"v": 2}))
    waiting = protocol.start(both.intent("", "test"), 1)
    assert actions(waiting) == {ROW: "WAITING", 'postgres:t:{"id":2}': "GRANTED"}
    third = protocol.start(intent("tx-3", row=2), 2)
    assert third.state["phase"] == LockingPhase.LOCKING
    over = protocol.decide(waiting.state, TimerDue(), 101)
    assert over.wake == ["tx-3"]


def test_an_opted_out_saga_bypasses_the_table() -> None:
    protocol = locked()
    protocol.start(intent("tx-1"), 0)
    free = protocol.start(intent("tx-2", locks=False), 1)
    assert free.commands and not free.lock_requests and "tx-2" not in protocol.locks
    assert not run(protocol, free).lock_requests


def test_an_invalid_intent_fails_before_anything_is_locked() -> None:
    protocol = locked()
    bad = intent("tx-1")
    bad["steps"][0]["operation"]["key"] = "not json"
    t = protocol.start(bad, 0)
    assert t.result is not None and t.result["status"] == "FAILED" and t.rejections
    assert not t.lock_requests and "tx-1" not in protocol.locks


def test_while_locking_outcomes_and_intents_change_nothing_and_operator_commands_are_refused() -> None:
    protocol = locked()
    first = protocol.start(intent("tx-1"), 0)
    second = protocol.start(intent("tx-2"), 1)
    assert protocol.decide(second.state, IntentReceived(second.state["intent"]), 2).state is second.state
    stale = reply({**first.commands[0], "tx_id": "tx-2"}, "APPLIED")
    assert protocol.decide(second.state, OutcomeReceived(stale), 2).state is second.state
    command: OperatorCommand = {
        "tx_id": "tx-2",
        "action": "RETRY",
        "step_index": 0,
        "note": "",
        "operator": "op",
        "at_ms": 2,
    }
    refused = protocol.decide(second.state, OperatorReceived(command), 2)
    assert refused.state is second.state and [a["kind"] for a in refused.alerts] == ["operator_refused"]


def test_every_own_phase_has_a_row_for_every_event_kind() -> None:
    for phase in LockingPhase:
        for kind in LockingEvent:
            assert (phase, kind) in TABLE


def test_a_restore_rebuilds_holders_first_then_waiters_in_arrival_order() -> None:
    protocol = locked()
    first = protocol.start(intent("tx-1"), 0)
    second = protocol.start(intent("tx-2"), 1)
    third = protocol.start(intent("tx-3"), 2)
    fresh = locked()
    assert fresh.restored([third.state, second.state, first.state]) == []
    assert fresh.locks.holds_all("tx-1") and fresh.locks.queued(ROW) == ["tx-2", "tx-3"]
    alone = locked()
    assert alone.restored([third.state, second.state]) == ["tx-2"]  # its holder ended meanwhile
    assert alone.forgotten(["tx-2"]) == ["tx-3"]
    assert locked().restored([intent_state(protocol, "tx-4", locks=False)]) == []


def intent_state(protocol: Locking, tx_id: str, **options: Any) -> Any:
    return protocol.start(intent(tx_id, **options), 3).state


def test_the_registry_wraps_sagas_and_a_locking_snapshot_round_trips_through_the_changelog() -> None:
    sagas = registry.protocols(POLICY)["saga"]
    assert isinstance(sagas, Locking)
    protocol = locked()
    protocol.start(intent("tx-1"), 0)
    waiting = protocol.start(intent("tx-2"), 1).state
    assert registry.is_in_flight(waiting) and not registry.is_terminal(waiting) and not registry.is_stuck(waiting)
    codec = default_codec()
    intent_bytes = codec.encode("TransactionIntent", waiting["intent"])
    record = codec.decode_as(codec.encode("SagaSnapshot", tx_state.to_record(waiting, intent_bytes)), "SagaSnapshot")
    restored, _ = tx_state.from_record(codec, record)
    assert restored["phase"] == LockingPhase.LOCKING and restored["intent"]["locks"] is True
    assert restored["due_at_ms"] == waiting["due_at_ms"]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.integers(min_value=1, max_value=3), min_size=2, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_sagas_on_shared_keys_never_run_at_once_and_all_complete(rows: list[int], order: Any) -> None:
    """Any interleaving of outcomes and wake-ups: at most one saga past its locks per key, and every saga
    ends completed once those before it ended."""
    protocol = locked()
    states: dict[str, Transition] = {}
    inbox: list[tuple[str, Any]] = []  # (tx, event) still to deliver
    for i, row in enumerate(rows):
        t = protocol.start(intent(f"tx-{i}", row=row), i)
        states[f"tx-{i}"] = t
        inbox.extend((f"tx-{i}", OutcomeReceived(reply(c, "APPLIED"))) for c in t.commands)
    now = 100
    while inbox:
        tx, event = inbox.pop(order.randrange(len(inbox)))
        t = protocol.decide(states[tx].state, event, now)
        states[tx] = t
        inbox.extend((tx, OutcomeReceived(reply(c, "APPLIED"))) for c in t.commands)
        inbox.extend((woken, LocksGranted()) for woken in t.wake)
        running = [s.state for s in states.values() if s.state["phase"] not in (*LockingPhase, "completed")]
        for row in set(rows):
            assert sum(1 for s in running if s["intent"]["steps"][0]["operation"]["key"] == f'{{"id":{row}}}') <= 1
    assert all(s.state["phase"] == "completed" for s in states.values())
    assert len(protocol.locks) == 0


def test_the_wait_for_graph_sees_a_saga_wait_and_its_end() -> None:
    from projections.wait_for import WaitForGraph

    protocol = locked()
    first = protocol.start(intent("tx-1"), 0)
    second = protocol.start(intent("tx-2"), 1)
    graph = WaitForGraph().apply_all([*first.lock_requests, *second.lock_requests])
    assert set(graph.graph().edges) == {("tx-2", "tx-1")}
    done = run(protocol, first)
    woken = protocol.decide(second.state, LocksGranted(), 20)
    graph.apply_all([*done.lock_requests, *woken.lock_requests])
    assert not graph.graph().edges


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.integers(min_value=1, max_value=2), min_size=2, max_size=5),
    failing=st.sets(st.integers(min_value=0, max_value=4)),
    order=st.randoms(use_true_random=False),
)
def test_compensating_sagas_keep_their_keys_until_undone_and_every_saga_ends(
    rows: list[int], failing: set[int], order: Any
) -> None:
    """Sagas whose last step fails compensate while still holding their keys: no other saga on those keys
    runs before the compensation is done, whatever the interleaving; all end, the table empties."""
    protocol = locked()
    states: dict[str, Transition] = {}
    inbox: list[tuple[str, Any]] = []

    def answer(tx: str, t: Transition) -> None:
        last = len(t.state["intent"]["steps"]) - 1
        for c in t.commands:
            fails = int(tx.removeprefix("tx-")) in failing and c["step_index"] == last and c["action"] == "EXECUTE"
            inbox.append((tx, OutcomeReceived(reply(c, "FAILED" if fails else "APPLIED"))))
        inbox.extend((woken, LocksGranted()) for woken in t.wake)

    for i, row in enumerate(rows):
        t = protocol.start(intent(f"tx-{i}", row=row), i)
        states[f"tx-{i}"] = t
        answer(f"tx-{i}", t)
    while inbox:
        tx, event = inbox.pop(order.randrange(len(inbox)))
        t = protocol.decide(states[tx].state, event, 100)
        states[tx] = t
        answer(tx, t)
        running = [s.state for s in states.values() if protocol.is_in_flight(s.state["phase"])]
        running = [s for s in running if s["phase"] != LockingPhase.LOCKING]
        keys = [k for s in running for k in write_keys(s["intent"])]
        assert len(keys) == len(set(keys))  # no key held by two running (or compensating) sagas
    ends = {tx: s.state["phase"] for tx, s in states.items()}
    assert ends == {f"tx-{i}": "compensated" if i in failing else "completed" for i in range(len(rows))}
    assert len(protocol.locks) == 0
