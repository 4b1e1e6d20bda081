"""Sagas under the lock manager partitioned by key (orchestrator/partitioned_locking.py): the partitions
asked one at a time in partition order with nothing sent to a store, the saga run once the last grants,
releases to every partition asked when it ends (or its wait times out), a snapshot that goes on where it
stood, two-phase commit refused; and, against the partitions' own protocol (`LockPartition`), sagas on
shared keys never run at once and all complete, whatever order the messages arrive in."""

from __future__ import annotations

from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from step_replies import reply

from orchestrator import registry
from orchestrator.lock_partitions import LockPartition, PartitionGrant, PartitionRelease, PartitionRequest
from orchestrator.locking import LockingPhase, write_keys
from orchestrator.partitioned_locking import PartitionedLocking, Refusing
from orchestrator.protocol import IntentReceived, OutcomeReceived, PartitionGranted, TimerDue, Transition
from orchestrator.saga import SagaPolicy, SagaProtocol
from polycommit import operations as ops
from polycommit.client import Transaction
from polycommit.codec import default_codec
from polycommit.partitioning import partition_of
from projections import tx_state

POLICY = SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=2)
PARTITIONS = (0, 1, 2, 3)


def locked() -> PartitionedLocking:
    return PartitionedLocking(SagaProtocol(POLICY), lock_wait_ms=500, partitions=PARTITIONS)


def intent(tx_id: str, row: int = 1, consistency: str = "EVENTUAL", node: int | None = None) -> Any:
    saga = Transaction(name="locked", tx_id=tx_id, consistency=consistency)  # type: ignore[arg-type]
    saga.add(ops.upsert_row("t", {"id": row}, {"v": tx_id}))
    saga.add(ops.merge_node("N", {"id": row if node is None else node}, {"v": tx_id}))
    saga.add(ops.upsert_points("c", [ops.point(row, [0.1, 0.2], {"v": tx_id})]))
    return saga.intent("polycommit.replies:0", "test")


def partitions_of(tx_intent: Any) -> list[int]:
    return sorted({partition_of(k, PARTITIONS) for k in write_keys(tx_intent)})


def grant(t: Transition, granted: bool = True) -> PartitionGranted:
    request = t.partition_messages[-1]
    return PartitionGranted(PartitionGrant(request.tx_id, request.partition, granted))


def run(protocol: PartitionedLocking, t: Transition, now: int = 10) -> Transition:
    """Answer every command the saga sends until it sends none (every step APPLIED)."""
    pending, last = list(t.commands), t
    while pending:
        last = protocol.decide(last.state, OutcomeReceived(reply(pending.pop(0), "APPLIED")), now)
        pending.extend(last.commands)
    return last


def test_a_saga_asks_its_partitions_in_order_and_runs_once_the_last_grants() -> None:
    protocol, tx = locked(), intent("tx-1")
    wanted = partitions_of(tx)
    assert len(wanted) >= 2, "the keys must fall in several partitions for the test to mean anything"
    t = protocol.start(tx, 0)
    asked = [t.partition_messages[0].partition]
    assert t.state["phase"] == LockingPhase.LOCKING and not t.commands and not t.lock_requests
    while t.state["phase"] == LockingPhase.LOCKING:
        t = protocol.decide(t.state, grant(t), 5)
        if t.state["phase"] == LockingPhase.LOCKING:
            assert not t.commands and len(t.partition_messages) == 1
            asked.append(t.partition_messages[0].partition)
    assert asked == wanted
    assert t.commands and not t.partition_messages
    assert {e["resource"]: e["action"] for e in t.lock_requests} == dict.fromkeys(write_keys(tx), "GRANTED")
    assert isinstance(protocol.start(tx, 0).partition_messages[0], PartitionRequest)


def test_answers_that_do_not_let_it_go_change_nothing() -> None:
    protocol = locked()
    t = protocol.start(intent("tx-1"), 0)
    first = t.partition_messages[0].partition
    other = next(p for p in PARTITIONS if p != first)
    for event in (
        grant(t, granted=False),  # it waits there: its blockers hold the keys
        PartitionGranted(PartitionGrant("tx-1", other, True)),  # not the partition it waits in
        IntentReceived(t.state["intent"]),
        TimerDue(),  # before its deadline
    ):
        assert protocol.decide(t.state, event, 5).state is t.state


def test_the_end_releases_every_partition_and_its_keys() -> None:
    protocol, tx = locked(), intent("tx-1")
    t = protocol.start(tx, 0)
    while t.state["phase"] == LockingPhase.LOCKING:
        last_request, t = t, protocol.decide(t.state, grant(t), 5)
    assert protocol.decide(t.state, grant(last_request), 6).state is t.state  # a repeat, once running
    done = run(protocol, t)
    assert done.state["phase"] == "completed" and done.result is not None
    assert done.partition_messages == [PartitionRelease("tx-1", p) for p in partitions_of(tx)]
    assert {e["resource"]: e["action"] for e in done.lock_requests} == dict.fromkeys(write_keys(tx), "RELEASED")


def test_a_lock_wait_past_its_deadline_fails_with_nothing_run_and_releases_what_it_asked() -> None:
    protocol, tx = locked(), intent("tx-1")
    t = protocol.start(tx, 0)
    t = protocol.decide(t.state, grant(t), 5)  # the first granted; waits in the second
    ended = protocol.decide(t.state, TimerDue(), t.state["due_at_ms"])
    assert ended.state["phase"] == LockingPhase.TIMED_OUT and ended.result is not None
    error = ended.result["error"]
    assert ended.result["status"] == "FAILED" and error is not None and error["error_class"] == "LockTimeoutError"
    assert ended.partition_messages == [PartitionRelease("tx-1", p) for p in partitions_of(tx)[:2]]
    assert not ended.commands and not ended.lock_requests  # it never held them all: nothing to announce
    assert protocol.decide(ended.state, grant(t), 600).state is ended.state  # a grant too late


def test_a_locking_snapshot_goes_on_where_it_stood() -> None:
    protocol = locked()
    t = protocol.start(intent("tx-1"), 0)
    t = protocol.decide(t.state, grant(t), 5)
    codec = default_codec()
    intent_bytes = codec.encode("TransactionIntent", t.state["intent"])
    record = codec.decode_as(codec.encode("SagaSnapshot", tx_state.to_record(t.state, intent_bytes)), "SagaSnapshot")
    restored, _ = tx_state.from_record(codec, record)
    assert registry.is_in_flight(restored) and restored["current"] == 1
    assert protocol.acquisition(restored).request() == t.partition_messages[0]  # waits where it stood


def test_a_coordinator_on_the_partitioned_lock_manager_refuses_two_phase_commit() -> None:
    built = registry.protocols(POLICY, "partitioned")
    assert isinstance(built["saga"], PartitionedLocking) and isinstance(built["twopc"], Refusing)
    t = built["twopc"].start(intent("tx-1", consistency="STRONG"), 0)
    error = t.result["error"] if t.result is not None else None
    assert error is not None and error["error_class"] == "UnsupportedError" and not t.commands


@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=2, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_sagas_on_shared_keys_never_run_at_once_and_all_complete(keys: list[tuple[int, int]], order: Any) -> None:
    """The sagas (a row and a point of one id, a node of another: key sets that overlap without being
    equal) and the partitions exchange messages: each partition reads its requests and releases in the
    order they were sent (its log), anything else arrives in any order. No two running sagas share a key,
    and every saga completes; the partitions end empty."""
    protocol = locked()
    tables = {p: LockPartition(p) for p in PARTITIONS}
    logs: dict[int, deque[PartitionRequest | PartitionRelease]] = {p: deque() for p in PARTITIONS}
    states: dict[str, Transition] = {}
    inbox: list[tuple[str, Any]] = []  # (tx, event) to deliver to a saga

    def sent(tx: str, t: Transition) -> None:
        states[tx] = t
        inbox.extend((tx, OutcomeReceived(reply(c, "APPLIED"))) for c in t.commands)
        for message in t.partition_messages:
            logs[message.partition].append(message)

    for i, (row, node) in enumerate(keys):
        sent(f"tx-{i}", protocol.start(intent(f"tx-{i}", row=row, node=node), i))
    while inbox or any(logs.values()):
        partitions = [p for p in PARTITIONS if logs[p]]
        if partitions and (not inbox or order.random() < 0.5):
            p = order.choice(partitions)
            inbox.extend((g.tx_id, PartitionGranted(g)) for g in tables[p].on_message(logs[p].popleft()))
            continue
        tx, event = inbox.pop(order.randrange(len(inbox)))
        sent(tx, protocol.decide(states[tx].state, event, 100))
        running = [s.state for s in states.values() if s.state["phase"] not in (*LockingPhase, "completed")]
        held = [k for state in running for k in write_keys(state["intent"])]
        assert len(held) == len(set(held)), f"two running sagas share a key: {sorted(held)}"
    assert all(s.state["phase"] == "completed" for s in states.values())
    assert all(len(table.table) == 0 for table in tables.values())
