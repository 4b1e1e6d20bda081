"""Lock events on the log (polycommit/lock_log.py): several resources per record, and back.

What readers rely on: every event comes back (`expand`), each resource's events in the lock table's order,
all in the partition its own key sends it to; and a saga's grant and release are one record each on the
default single partition."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from polycommit.events import LockEvent
from polycommit.lock_log import expand, expand_all, merged
from polycommit.partitioning import partition_of
from projections.wait_for import WaitForGraph


def event(tx: str, resource: str, action: str = "GRANTED", blockers: tuple[str, ...] = (), at: int = 1) -> LockEvent:
    record: dict[str, Any] = {
        "tx_id": tx,
        "resource": resource,
        "mode": "EXCLUSIVE",
        "action": action,
        "blockers": list(blockers),
        "priority": 0,
        "started_at_ms": 0,
        "work_done": 0,
        "at_ms": at,
    }
    return record  # type: ignore[return-value]


def stripped(events: list[LockEvent]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "also"} for e in events]


def test_a_sagas_grant_and_release_are_one_record_each_on_one_partition() -> None:
    keys = ["postgres:docs:1", "qdrant:docs:1", "neo4j:Doc:1"]
    events = [event("t1", k) for k in keys] + [event("t1", k, "RELEASED", at=2) for k in keys]
    records = merged(events, [0])
    assert [(r["action"], r["resource"], r["also"]) for r in records] == [
        ("GRANTED", keys[0], keys[1:]),
        ("RELEASED", keys[0], keys[1:]),
    ]
    assert stripped(list(expand_all(records))) == stripped(events)


def test_events_that_differ_in_more_than_their_resource_stay_apart() -> None:
    events = [
        event("t1", "a"),
        event("t2", "b"),  # another transaction
        event("t2", "c", "WAITING", ("t1",)),  # another action
        event("t2", "d", "WAITING", ("t3",)),  # other blockers
        event("t2", "e", "WAITING", ("t3",), at=5),  # another instant
    ]
    assert [r["also"] for r in merged(events, [0])] == [[], [], [], [], []]


def test_a_v1_record_expands_to_itself() -> None:
    v1 = event("t1", "a")
    assert stripped(expand(v1)) == stripped([v1])


resources = st.sampled_from([f"r{i}" for i in range(6)])
actions = st.sampled_from(["GRANTED", "WAITING", "RELEASED"])
txs = st.sampled_from(["t1", "t2", "t3"])


@given(
    st.lists(st.tuples(txs, resources, actions, st.integers(0, 2)), max_size=40),
    st.integers(1, 5),
)
def test_merging_keeps_every_event_each_resources_order_and_its_partition(
    raw: list[tuple[str, str, str, int]], count: int
) -> None:
    partitions = list(range(count))
    events = [event(tx, r, action, ("t9",) if action == "WAITING" else (), at) for tx, r, action, at in raw]
    records = merged(events, partitions)
    back = stripped(list(expand_all(records)))
    assert sorted(map(repr, back)) == sorted(map(repr, stripped(events)))  # nothing lost, nothing added
    for resource in {e["resource"] for e in events}:
        assert [e for e in back if e["resource"] == resource] == [
            e for e in stripped(events) if e["resource"] == resource
        ]
    for record in records:  # every resource of a record lives in the partition its key is sent to
        key_partition = partition_of(record["resource"], partitions)
        assert {partition_of(r, partitions) for r in record["also"]} <= {key_partition}
    assert len(records) <= len(events)


def test_the_wait_for_graph_is_the_same_from_merged_records() -> None:
    events = [
        event("t1", "a"),
        event("t1", "b"),
        event("t2", "a", "WAITING", ("t1",), at=2),
        event("t2", "b", "WAITING", ("t1",), at=2),
        event("t1", "c", "WAITING", ("t2",), at=3),
    ]
    one_by_one = WaitForGraph().apply_all(events)
    from_records = WaitForGraph().apply_all(expand_all(merged(events, [0])))
    assert len(merged(events, [0])) == 3
    assert from_records.waits == one_by_one.waits
    assert from_records.cycles() == one_by_one.cycles() == [("t1", "t2")]


def test_the_checker_reads_each_resources_grants_from_merged_records() -> None:
    from polycommit.tooling.checker.log import fold

    first = [event("a", r) for r in ("x", "y", "z")] + [event("a", r, "RELEASED", at=2) for r in ("x", "y", "z")]
    second = [event("b", r, at=3) for r in ("y", "z")]
    records = merged(first, [0]) + merged(second, [0])
    assert len(records) == 3
    _, facts = fold([], [], [], [], locks=records)
    assert facts.grants == {"x": ["a"], "y": ["a", "b"], "z": ["a", "b"]}
