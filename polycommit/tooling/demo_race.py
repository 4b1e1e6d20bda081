"""The demo's race: two clerks top up one customer's credit at the same moment, each in an interactive
SERIALIZABLE transaction that reads the credit and writes it back raised, to PostgreSQL and Neo4j.

Both read before either commits, which is the read-then-write that deadlocks on the lock upgrade when
reads lock as they are made. Locking at the commit (the SDK's default), one commits first; the other finds
its read stale under its locks, runs its block again in the same transaction and commits. No top-up is
lost, and the two stores agree."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from polycommit.client import Coordinator
from polycommit.interactive import InteractiveScope
from polycommit.tooling import workload


@dataclass
class Race:
    customer: str
    amount: int
    before: int
    statuses: list[str]
    reruns: int  # blocks run again after a stale read
    after_postgres: int | None = None
    after_neo4j: int | None = None

    @property
    def ok(self) -> bool:
        expected = self.before + self.amount * len(self.statuses)
        return self.statuses == ["completed"] * len(self.statuses) and (
            self.after_postgres == self.after_neo4j == expected
        )

    def describe(self) -> str:
        return (
            f"race: {len(self.statuses)} clerks topped up {self.customer} by {self.amount} at once: "
            f"{', '.join(self.statuses)}; {self.reruns} ran again after a stale read, none deadlocked; "
            f"credit {self.before} -> {self.after_postgres} in PostgreSQL, {self.after_neo4j} in Neo4j"
        )


async def top_up_race(client: Coordinator, customer: str, amount: int, clerks: int = 2) -> Race:
    key = {"id": customer}
    before = (await client.reads.read_row(workload.CUSTOMERS, key)).value or {}
    everyone_read = [asyncio.Event() for _ in range(clerks)]
    scopes: list[InteractiveScope] = []

    def top_up(clerk: int) -> Callable[[InteractiveScope], Awaitable[None]]:
        async def block(tx: InteractiveScope) -> None:
            row = (await tx.postgres.get(workload.CUSTOMERS, key)).value or {}
            everyone_read[clerk].set()
            await asyncio.gather(*(e.wait() for e in everyone_read))  # set once: a run again goes straight on
            credit = int(row.get("credit") or 0) + amount
            await tx.postgres.upsert(workload.CUSTOMERS, key, {"name": row.get("name", ""), "credit": credit})
            await tx.neo4j.merge_node("Customer", key, {"credit": credit})

        return block

    results = await asyncio.gather(
        *(
            client.run(top_up(c), attempts=scopes, name=f"top up {customer}", isolation="SERIALIZABLE")
            for c in range(clerks)
        )
    )
    reruns = sum(s.reruns for s in scopes)
    race = Race(customer, amount, int(before.get("credit") or 0), [r.status for r in results], reruns)
    race.after_postgres = _credit((await client.reads.read_row(workload.CUSTOMERS, key)).value)
    race.after_neo4j = _credit((await client.reads.read_node("Customer", key)).value)
    return race


def _credit(value: dict[str, Any] | None) -> int | None:
    return None if value is None or value.get("credit") is None else int(value["credit"])
