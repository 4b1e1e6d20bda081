"""`polycommit chaos --mode interactive`: interactive increments on hot keys while the parts are killed.

Each increment reads two hot keys and writes the first one's count + 1 to the three stores
(`bench_contended.increment`) in an interactive SERIALIZABLE transaction that locks as each access is made
(`lock_at="access"`): reads take SHARED locks that writes upgrade, so cycles of waits form, and the
coordinator (cycles of two) and the deadlock detector (longer ones; a kill target in this mode) break
them. `coordinator.run` runs a victim, or a transaction whose locks timed out, again as a new attempt.

What is judged, besides the checker's verdict on the log and the stores:
- every attempt's result, heard by the client or read back from the `results` topic: a *completed*
  attempt is one increment;
- each hot key's count in PostgreSQL: their sum lies between the completed attempts and those plus the
  attempts whose fate is unknown (no result anywhere: the client was killed before its commit went out,
  or its publish failed), and with no unknown attempt it is exact: no increment lost, none doubled;
- Qdrant and Neo4j hold PostgreSQL's count for every hot key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polycommit.bus import read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.interactive import InteractiveScope
from polycommit.tooling import bench_contended
from polycommit.tooling.bench_contended import HotTransaction
from polycommit.tooling.bench_verify import read_values
from polycommit.tooling.bench_workload import keep_in_flight, stores
from polycommit.tooling.chaos_workload import ClientSlot, Progressed

RETRIES = 50  # attempts after the first: victims and lock-wait timeouts under kills
LOCK_WAIT_S = 20.0  # a wait behind a holder a kill stalled ends, and is run again


@dataclass
class Increments:
    """Every attempt of the run: its status (None until heard), and the client's errors."""

    attempts: dict[str, str | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, scopes: Sequence[InteractiveScope]) -> None:
        for scope in scopes:
            self.attempts[scope.tx_id] = scope.result.status if scope.result is not None else None

    def count(self, status: str | None) -> int:
        return sum(1 for s in self.attempts.values() if s == status)

    def statuses(self) -> dict[str, int]:
        """Attempts by status; "unknown" for those with no result anywhere."""
        found: dict[str, int] = {}
        for status in self.attempts.values():
            found[status or "unknown"] = found.get(status or "unknown", 0) + 1
        return dict(sorted(found.items()))


async def run_increments(
    slot: ClientSlot,
    items: Sequence[HotTransaction],
    concurrency: int,
    progressed: Progressed,
    increments: Increments,
    on_result: Callable[[], None],
) -> None:
    """Keep `concurrency` increments in flight; each ends when `coordinator.run` returns or gives up."""

    async def one(item: HotTransaction) -> None:
        scopes: list[InteractiveScope] = []

        async def block(tx: InteractiveScope) -> None:
            await bench_contended.increment(tx, item, for_update=False)

        client = slot.client
        assert client is not None
        try:
            await client.run(
                block,
                attempts=scopes,
                retries=RETRIES,
                name="chaos-hot",
                isolation="SERIALIZABLE",
                lock_at="access",
                lock_wait=LOCK_WAIT_S,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this lane itself is cancelled
            increments.errors.append(f"{item.write.key}: the client was killed")
        except Exception as exc:  # the broker refused a request, a result never came: judged from the log
            increments.errors.append(f"{item.write.key}: {type(exc).__name__}: {exc}")
        increments.add(scopes)
        await progressed.arrived()
        on_result()

    await keep_in_flight(items, concurrency, one)


async def recover_statuses(settings: Settings, increments: Increments, deadline_s: float) -> None:
    """Read the results of attempts the client did not hear from the `results` topic, until none is
    missing or the deadline (an attempt that never reached the coordinator has none)."""
    codec, topic = default_codec(), topics_for(settings).results
    deadline = time.monotonic() + deadline_s
    while True:
        unheard = {tx for tx, status in increments.attempts.items() if status is None}

        def take(record: Any, unheard: set[str] = unheard) -> None:
            key = record.key.decode() if record.key else ""
            if key in unheard and record.value is not None:
                status = codec.decode_as(record.value, "TransactionResult")["status"]
                increments.attempts[key] = str(status).lower()  # as the client names it

        await read_topic(settings, topic, take)
        if increments.count(None) == 0 or time.monotonic() >= deadline:
            return


async def judge_counts(settings: Settings, keys: Sequence[str], increments: Increments) -> dict[str, Any]:
    """The counts against the completed attempts, and the stores against each other."""
    async with stores(settings) as (qdrant, neo4j):
        found = await read_values(settings, keys, qdrant.backend, neo4j.driver)
    counted = sum(int(found["postgres"].get(key) or 0) for key in keys)
    completed, unknown = increments.count("completed"), increments.count(None)
    agreed = bench_contended.agreement(keys, found)
    return {
        "attempts": len(increments.attempts),
        "completed": completed,
        "unknown": unknown,
        "counted": counted,
        "counts_ok": completed <= counted <= completed + unknown,
        "stores_agree": agreed.verified == len([k for k in keys if k in found["postgres"]]),
        "disagreeing": {store: n for store, n in agreed.missing.items() if n},
        "client_errors": len(increments.errors),  # increments given up (the rest of their attempts judged)
        "client_error_sample": increments.errors[:10],
    }
