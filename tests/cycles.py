"""Interactive transactions that lock keys in opposite orders across the stores (lock_at="access"): the
cycles the deadlock tests close, synchronised on the grants, never on time."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from polycommit import operations as ops
from polycommit.client import Coordinator
from polycommit.errors import DeadlockVictimError
from polycommit.interactive import InteractiveScope
from polycommit.tooling import workload

Lock = Callable[[InteractiveScope], Awaitable[None]]
Plan = tuple[list[Lock], Lock]  # the locks a member takes first, then the one that closes the cycle


def row(doc: str, title: str) -> Lock:
    async def write(tx: InteractiveScope) -> None:
        await tx.postgres.upsert(workload.DOCUMENTS, {"id": doc}, {"title": title})

    return write


def node(doc: str, title: str) -> Lock:
    async def write(tx: InteractiveScope) -> None:
        await tx.neo4j.merge_node("Document", {"id": doc}, {"title": title})

    return write


def point(doc: str, title: str) -> Lock:
    async def write(tx: InteractiveScope) -> None:
        await tx.qdrant.upsert(workload.DOCUMENTS, [ops.point(doc, workload.embed(title), {"title": title})])

    return write


def extra_lock(name: str) -> Lock:
    async def take(tx: InteractiveScope) -> None:
        await tx.lock([f"test:extra:{name}"])

    return take


class Cycle:
    """Transactions that each take their first locks, wait until every one holds them, then ask the next
    one's: a cycle of waits, closed by whichever asks last. Synchronised on the grants, never on time."""

    def __init__(self, size: int) -> None:
        self.holding = [asyncio.Event() for _ in range(size)]
        self.asking = [asyncio.Event() for _ in range(size)]  # set as the closing request leaves
        self.tx_ids: list[str] = [""] * size
        self.asked_at: list[float] = [0.0] * size
        self.ended_at: list[float] = [0.0] * size

    async def member(self, i: int, tx: InteractiveScope, first: list[Lock], then: Lock) -> None:
        self.tx_ids[i] = tx.tx_id
        for lock in first:
            await lock(tx)
        self.holding[i].set()
        for other in self.holding:
            await other.wait()
        self.asked_at[i] = time.perf_counter()
        self.asking[i].set()
        try:
            await then(tx)
        finally:
            self.ended_at[i] = time.perf_counter()


async def run_cycle(
    client: Coordinator,
    plans: list[Plan],
    priorities: list[int] | None = None,
    *,
    cycle: Cycle | None = None,
    lock_wait: float = 0.0,
) -> tuple[list[Any], Cycle]:
    """Run the members (opened in order, each after the previous one's first locks are held) and return
    each one's outcome: its TransactionResult, or the exception that ended it. `cycle`: one the caller
    watches; `lock_wait`: each member's lock-wait timeout in seconds (0: the coordinator's default)."""
    cycle = cycle or Cycle(len(plans))
    priorities = priorities or [0] * len(plans)

    async def one(i: int) -> Any:
        if i:
            await cycle.holding[i - 1].wait()  # arrival order: member i is younger than member i - 1
        scope = client.transaction(
            name=f"cycle-{i}", interactive=True, lock_at="access", priority=priorities[i], lock_wait=lock_wait
        )
        async with scope as tx:
            await cycle.member(i, tx, *plans[i])
        return scope.result

    outcomes = await asyncio.gather(*(one(i) for i in range(len(plans))), return_exceptions=True)
    return list(outcomes), cycle


def victims(outcomes: list[Any]) -> list[int]:
    return [i for i, o in enumerate(outcomes) if isinstance(o, DeadlockVictimError)]


def committed(outcomes: list[Any]) -> list[int]:
    return [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException) and o.status == "completed"]


def docs(n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"dl-{run}-{i}" for i in range(n)]


def cycle_plans(length: int) -> list[Plan]:
    """A cycle of `length` (2 or 3) across the stores, each member older and with more work than the next."""
    if length == 2:
        a, b = docs(2)
        return [([row(a, "t0"), extra_lock(a)], node(b, "t0")), ([node(b, "t1")], row(a, "t1"))]
    a, b, c = docs(3)
    return [
        ([row(a, "t0"), extra_lock(a)], node(b, "t0")),
        ([node(b, "t1"), extra_lock(b)], point(c, "t1")),
        ([point(c, "t2")], row(a, "t2")),
    ]
