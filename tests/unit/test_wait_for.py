"""The wait-for graph: edges follow lock events, every cycle gets exactly one victim, chosen by score."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from polycommit.events import LockEvent
from projections.wait_for import REJUDGE_AFTER_MS, WaitForGraph


def event(
    tx: str,
    action: str,
    resource: str,
    blockers: tuple[str, ...] = (),
    *,
    priority: int = 0,
    started: int = 0,
    work: int = 0,
    at: int = 0,
) -> LockEvent:
    return {
        "tx_id": tx,
        "resource": resource,
        "mode": "EXCLUSIVE",
        "action": action,  # type: ignore[typeddict-item]
        "blockers": list(blockers),
        "priority": priority,
        "started_at_ms": started,
        "work_done": work,
        "at_ms": at,
    }


def test_two_transactions_waiting_on_each_other_are_one_cycle_and_the_lower_priority_dies() -> None:
    g = WaitForGraph().apply_all(
        [
            event("a", "GRANTED", "r1", priority=5, started=1_000),
            event("b", "GRANTED", "r2", priority=1, started=500),  # older and more work, but lower priority
            event("a", "WAITING", "r2", ("b",), priority=5, started=1_000),
            event("b", "WAITING", "r1", ("a",), priority=1, started=500, work=50),
        ]
    )
    [verdict] = g.verdicts(now_ms=10_000)
    assert set(verdict.cycle) == {"a", "b"}
    assert verdict.victim == "b"
    assert verdict.scores["a"] > verdict.scores["b"]


def test_at_equal_priority_the_younger_with_less_work_dies() -> None:
    g = WaitForGraph().apply_all(
        [
            event("old", "WAITING", "r2", ("young",), started=1_000, work=3),
            event("young", "WAITING", "r1", ("old",), started=9_000, work=1),
        ]
    )
    assert [v.victim for v in g.verdicts(now_ms=10_000)] == ["young"]


def test_three_transactions_in_a_ring_get_one_victim() -> None:
    g = WaitForGraph().apply_all(
        [
            event("a", "WAITING", "rb", ("b",), started=1),
            event("b", "WAITING", "rc", ("c",), started=2),
            event("c", "WAITING", "ra", ("a",), started=3),
        ]
    )
    verdicts = g.verdicts(now_ms=100)
    assert len(verdicts) == 1 and set(verdicts[0].cycle) == {"a", "b", "c"}
    assert verdicts[0].victim == "c"  # the youngest
    assert g.verdicts(now_ms=200) == []  # the victim is doomed: the same deadlock is not judged twice


def test_a_redelivered_event_changes_nothing() -> None:
    events = [event("a", "WAITING", "r2", ("b",)), event("b", "WAITING", "r1", ("a",))]
    once = WaitForGraph().apply_all(events)
    twice = WaitForGraph().apply_all(events + events)
    assert once.waits == twice.waits
    assert [v.victim for v in once.verdicts(1)] == [v.victim for v in twice.verdicts(1)]


def test_a_grant_or_a_release_removes_the_wait_and_breaks_the_cycle() -> None:
    base = [event("a", "WAITING", "r2", ("b",)), event("b", "WAITING", "r1", ("a",))]
    assert WaitForGraph().apply_all([*base, event("a", "GRANTED", "r2")]).cycles() == []
    assert WaitForGraph().apply_all([*base, event("b", "RELEASED", "r2")]).cycles() == []


def test_a_victim_that_released_everything_can_be_judged_again_in_a_new_deadlock() -> None:
    g = WaitForGraph().apply_all([event("a", "WAITING", "r2", ("b",)), event("b", "WAITING", "r1", ("a",))])
    [first] = g.verdicts(1)
    g.apply_all([event(first.victim, "RELEASED", "r1"), event(first.victim, "RELEASED", "r2")])
    assert first.victim not in g.doomed
    g.apply_all([event("a", "WAITING", "r3", ("b",)), event("b", "WAITING", "r4", ("a",))])
    assert len(g.verdicts(2)) == 1


def test_idle_transactions_are_forgotten_but_not_while_someone_waits_for_them() -> None:
    g = WaitForGraph().apply_all([event("a", "GRANTED", "r1", at=0), event("b", "WAITING", "r1", ("a",), at=0)])
    g.forget_idle(now_ms=10_000, idle_ms=1_000)
    assert "a" in g.members  # b still waits for it
    g.apply(event("a", "RELEASED", "r1", at=10_000))
    g.apply(event("b", "GRANTED", "r1", at=10_000))
    g.forget_idle(now_ms=20_000, idle_ms=1_000)
    assert g.members == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=12))
def test_verdicts_break_every_cycle_with_one_victim_each(edges: list[tuple[int, int]]) -> None:
    """Against a brute-force model: after the verdicts, the graph without the victims has no cycle, and
    every victim was on a cycle of the graph it was judged in."""
    g = WaitForGraph()
    for waiter, holder in edges:
        if waiter != holder:
            g.apply(event(f"t{waiter}", "WAITING", f"r{holder}-{waiter}", (f"t{holder}",)))
    adjacency = {(f"t{w}", f"t{h}") for w, h in edges if w != h}
    victims: set[str] = set()
    while True:
        verdicts = g.verdicts(now_ms=1)
        if not verdicts:
            break
        for verdict in verdicts:
            assert verdict.victim in verdict.cycle
            victims.add(verdict.victim)
    alive = {n for pair in adjacency for n in pair} - victims
    assert not _has_cycle({(u, v) for u, v in adjacency if u in alive and v in alive})


def _has_cycle(edges: set[tuple[str, str]]) -> bool:
    nodes = sorted({n for e in edges for n in e})
    for size in range(2, len(nodes) + 1):
        for combo in itertools.permutations(nodes, size):
            if all((combo[i], combo[(i + 1) % size]) in edges for i in range(size)):
                return True
    return False


def test_a_victim_still_in_its_cycle_is_named_again_after_the_rejudge_delay() -> None:
    """A verdict the coordinator found stale (or lost) must not leave the deadlock forever."""
    graph = WaitForGraph()
    graph.apply_all([event("t1", "WAITING", "a", ("t2",), at=1), event("t2", "WAITING", "b", ("t1",), at=2)])
    (first,) = graph.verdicts(1_000)
    assert graph.verdicts(1_000 + REJUDGE_AFTER_MS - 1) == []  # a redelivery changes nothing meanwhile
    (again,) = graph.verdicts(1_000 + REJUDGE_AFTER_MS)
    assert again.victim == first.victim
