"""The wait-for graph as a pure fold of lock events: who waits for whom, its cycles, and each cycle's victim.

The deadlock detector (a faust-streaming agent over `polycommit.locks`) feeds every LockEvent through
`WaitForGraph.apply` and asks `verdicts(now)` after each batch; everything here is deterministic, so the
same events replayed give the same victims, and a redelivered event changes nothing.

An edge waiter -> holder exists while the waiter's request for a resource is queued behind the holder.
A cycle is a deadlock: nobody in it can move until one of them aborts. The victim is the member with the
lowest score (the brief's: older, more work done and higher priority all make a transaction more worth
keeping); priority dominates, so a transaction of lower priority is always chosen before a higher one,
and at equal priority the younger transaction with less work dies. Ties go to the larger tx id, so the
choice never depends on iteration order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx

from polycommit.events import LockEvent

# Weights of the brief's score: seconds of age + 10 per unit of work + a priority that outweighs both
# (a transaction would need to run for over a day to outrank one priority level).
WORK_WEIGHT = 10.0
PRIORITY_WEIGHT = 100_000.0
REJUDGE_AFTER_MS = 1_000
# The coordinator announces every current wait again this often, so a detector that starts (reading the
# topic from its end) holds every wait there is within one period; an event stamped more than CATCH_UP_MS
# before the detector started (a producer's clock far behind, a write delivered late) is over and skipped.
REANNOUNCE_MS = 2_000
CATCH_UP_MS = 5 * REANNOUNCE_MS  # a few periods: room for clocks a few seconds apart


@dataclass(frozen=True)
class Member:
    """What the score needs to know of a transaction in the graph."""

    tx_id: str
    priority: int = 0
    started_at_ms: int = 0
    work_done: int = 0

    def score(self, now_ms: int) -> float:
        age_s = max(0, now_ms - self.started_at_ms) / 1000 if self.started_at_ms else 0.0
        return age_s + WORK_WEIGHT * self.work_done + PRIORITY_WEIGHT * self.priority


@dataclass(frozen=True)
class Verdict:
    """One cycle and the member that must abort to break it."""

    cycle: tuple[str, ...]
    victim: str
    scores: dict[str, float]


@dataclass
class WaitForGraph:
    # waiter -> resource -> the transactions it waits for on that resource
    waits: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    # Victims already named (-> when): left out of further cycles until they release, so one deadlock
    # gets one verdict even when the detector sees its events again (at-least-once delivery) -- but
    # only for REJUDGE_AFTER_MS: a victim the coordinator did not abort (its verdict was stale when it
    # arrived, or lost) and that is still in a cycle then is named again, so no deadlock outlives it.
    doomed: dict[str, int] = field(default_factory=dict)
    last_seen_ms: dict[str, int] = field(default_factory=dict)

    def apply(self, event: LockEvent) -> None:
        tx, resource, action = event["tx_id"], event["resource"], event["action"]
        self._remember(event)
        self.last_seen_ms[tx] = max(event["at_ms"], self.last_seen_ms.get(tx, 0))
        if action == "WAITING":
            blockers = frozenset(b for b in event["blockers"] if b != tx)
            if blockers:
                self.waits.setdefault(tx, {})[resource] = blockers
        elif action == "GRANTED":
            self._stop_waiting(tx, resource)
        elif action == "RELEASED":
            self._release(tx, resource)

    def apply_all(self, events: Iterable[LockEvent]) -> WaitForGraph:
        for event in events:
            self.apply(event)
        return self

    def graph(self, now_ms: int | None = None) -> nx.DiGraph:
        """The waits, without the victims named less than REJUDGE_AFTER_MS before `now_ms` (all named
        victims when `now_ms` is None)."""
        doomed = {tx for tx, at in self.doomed.items() if now_ms is None or now_ms - at < REJUDGE_AFTER_MS}
        g = nx.DiGraph()
        for waiter, resources in self.waits.items():
            if waiter in doomed:
                continue
            for blockers in resources.values():
                g.add_edges_from((waiter, b) for b in blockers if b not in doomed)
        return g

    def cycles(self, now_ms: int | None = None) -> list[tuple[str, ...]]:
        """One cycle per strongly connected component: breaking it may break the component, and the next
        call finds what is left (a victim's edges are gone by then, so no member is judged twice)."""
        g = self.graph(now_ms)
        found: list[tuple[str, ...]] = []
        for component in nx.strongly_connected_components(g):
            if len(component) < 2:
                continue
            start = min(component)
            edges = nx.find_cycle(g.subgraph(component), source=start)
            found.append(tuple(u for u, _ in edges))
        return sorted(found)

    def verdicts(self, now_ms: int) -> list[Verdict]:
        """Name a victim for every cycle there is now, and remember it (see `doomed`)."""
        out: list[Verdict] = []
        for cycle in self.cycles(now_ms):
            verdict = judge(cycle, [self.members.get(tx, Member(tx)) for tx in cycle], now_ms)
            self.doomed[verdict.victim] = now_ms
            out.append(verdict)
        return out

    def _remember(self, event: LockEvent) -> None:
        known = self.members.get(event["tx_id"])
        self.members[event["tx_id"]] = Member(
            event["tx_id"],
            priority=event["priority"],
            started_at_ms=event["started_at_ms"] or (known.started_at_ms if known else 0),
            work_done=max(event["work_done"], known.work_done if known else 0),
        )

    def _stop_waiting(self, tx: str, resource: str) -> None:
        resources = self.waits.get(tx)
        if resources is not None:
            resources.pop(resource, None)
            if not resources:
                del self.waits[tx]

    def _release(self, tx: str, resource: str) -> None:
        """A release frees the resource: whoever waited on it for `tx` no longer does (the lock manager
        will say GRANTED or WAITING again with the new blockers), and `tx` stops waiting there too."""
        self._stop_waiting(tx, resource)
        for waiter in list(self.waits):
            blockers = self.waits[waiter].get(resource)
            if blockers is not None and tx in blockers:
                remaining = blockers - {tx}
                if remaining:
                    self.waits[waiter][resource] = remaining
                else:
                    self._stop_waiting(waiter, resource)
        if tx in self.doomed and tx not in self.waits and not self._blocks_anyone(tx):
            self.doomed.pop(tx, None)  # the victim has let go: a later deadlock of the same tx is a new one

    def forget_idle(self, now_ms: int, idle_ms: int) -> None:
        """Drop what is known of transactions with no event for `idle_ms` that nobody waits for: lock
        events do not say when a transaction ends, so this bounds the memory of a long-running detector."""
        for tx, seen in list(self.last_seen_ms.items()):
            if now_ms - seen > idle_ms and tx not in self.waits and not self._blocks_anyone(tx):
                del self.last_seen_ms[tx]
                self.members.pop(tx, None)
                self.doomed.pop(tx, None)

    def _blocks_anyone(self, tx: str) -> bool:
        return any(tx in blockers for resources in self.waits.values() for blockers in resources.values())


def judge(cycle: tuple[str, ...], members: Iterable[Member], now_ms: int) -> Verdict:
    """The cycle's victim: the lowest score, ties to the larger tx id (the detector's rule, and the
    coordinator's for the two-transaction deadlocks its lock table sees close)."""
    scores = {m.tx_id: m.score(now_ms) for m in members}
    victim = min(cycle, key=lambda tx: (scores[tx], _descending(tx)))
    return Verdict(cycle, victim, scores)


def _descending(tx_id: str) -> tuple[int, ...]:
    """Sort key that puts the larger tx id first among equal scores."""
    return tuple(-ord(c) for c in tx_id)
