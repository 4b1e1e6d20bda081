"""`polycommit chaos --mode interactive`: interactive increments on hot keys while the parts are killed.

Each increment reads two hot keys and writes the first one's count + 1 to the three stores
(`bench_contended.increment`) in an interactive SERIALIZABLE transaction. By default it locks as each
access is made (`--lock-at access`): reads take SHARED locks that writes upgrade, so cycles of waits form,
and the coordinator (cycles of two) and the deadlock detector (longer ones; a kill target in this mode)
break them. `coordinator.run` runs a victim, or a transaction whose locks timed out, again as a new
attempt. `--lock-at commit` locks everything at the commit and checks the reads then (a stale read runs
the block again under the locks), and `--consistency STRONG` commits each increment by two-phase commit
(a PostgreSQL prepare, Neo4j and Qdrant held), so the kills also land between prepares and the decision.

What is judged:
- every attempt's result, heard by the client or read back from the `results` topic (a checker History,
  as the other modes keep): a *completed* (saga) or *committed* (two-phase commit) attempt is one
  increment. An attempt that sent nothing to the coordinator (its client was killed first) applied
  nothing and can have no result: it is set aside. Every other attempt must have a result;
- the checker, on those attempts: each one's writes against the stores, each hot key against its last
  writer in lock-grant order, the markers, and the log's own rules;
- each hot key's count in PostgreSQL: their sum is the applied attempts (bounded by the attempts with no
  result, should any be left, which fails the run anyway): no increment lost, none doubled;
- Qdrant and Neo4j hold PostgreSQL's count for every hot key.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polycommit.config import Settings
from polycommit.errors import ClientClosedError
from polycommit.events import Consistency
from polycommit.interactive import InteractiveScope, LockAt
from polycommit.results import SUCCEEDED
from polycommit.tooling import bench_contended
from polycommit.tooling.bench_contended import HotTransaction
from polycommit.tooling.bench_verify import read_values
from polycommit.tooling.bench_workload import keep_in_flight, stores
from polycommit.tooling.chaos_workload import ClientSlot, Progressed
from polycommit.tooling.checker import History

RETRIES = 50  # attempts after the first: victims and lock-wait timeouts under kills
CLIENT_LIVES = 4  # runs of one increment across client kills
LOCK_WAIT_S = 20.0  # a wait behind a holder a kill stalled ends, and is run again


@dataclass(frozen=True)
class IncrementMode:
    """How the increments lock and commit (`--lock-at`, `--consistency`)."""

    lock_at: LockAt = "access"
    consistency: Consistency = "EVENTUAL"

    @classmethod
    def of(cls, args: argparse.Namespace) -> IncrementMode:
        return cls(getattr(args, "lock_at", cls.lock_at), getattr(args, "consistency", cls.consistency))


@dataclass
class Increments:
    """Every attempt of the run as a checker History (its transaction, and the statuses heard or read back
    from the log: `chaos_workload.recover_results`), and the client's errors."""

    history: History = field(default_factory=History)
    errors: list[str] = field(default_factory=list)
    dropped: int = 0  # attempts that never reached the log (`unsent`)

    def add(self, scopes: Sequence[InteractiveScope]) -> None:
        for scope in scopes:
            self.history.invoke(scope.transaction)
            if scope.result is not None:
                self.history.record_result(scope.result)

    def unsent(self, tx_ids: set[str]) -> None:
        """Forget attempts that sent nothing to the coordinator (their client was killed first): they
        applied nothing and will have no result, so the count is judged without them."""
        self.dropped += self.history.forget(tx_ids)

    def count(self, *statuses: str | None) -> int:
        """Attempts whose final status is one of `statuses`; None: no result anywhere."""
        return sum(1 for tx_id in self.history.intents if self.history.final(tx_id) in statuses)

    def applied(self) -> int:
        """Attempts that applied their increment: a saga completed, a two-phase commit committed."""
        return self.count(*SUCCEEDED)

    def statuses(self) -> dict[str, int]:
        """Attempts by final status; "unknown" for those with no result anywhere."""
        return self.history.statuses(absent="unknown")


async def run_increments(
    slot: ClientSlot,
    items: Sequence[HotTransaction],
    concurrency: int,
    progressed: Progressed,
    increments: Increments,
    on_result: Callable[[], None],
    mode: IncrementMode = IncrementMode(),
) -> None:
    """Keep `concurrency` increments in flight; each ends when `coordinator.run` returns or gives up."""

    async def one(item: HotTransaction) -> None:
        scopes: list[InteractiveScope] = []

        async def block(tx: InteractiveScope) -> None:
            await bench_contended.increment(tx, item, for_update=False)

        for _ in range(CLIENT_LIVES):
            if not await _run_on(slot, block, scopes, mode, item.write.key, increments.errors):
                break  # ended (or given up for another reason than its client's death)
        increments.add(scopes)
        await progressed.arrived()
        on_result()

    await keep_in_flight(items, concurrency, one)


async def _run_on(
    slot: ClientSlot,
    block: Callable[[InteractiveScope], Awaitable[None]],
    scopes: list[InteractiveScope],
    mode: IncrementMode,
    key: str,
    errors: list[str],
) -> bool:
    """One `coordinator.run` of an increment on the slot's client; True when that client was killed under
    it, so the increment runs again on the new one, as an application restarted with its work would (the
    killed attempt may still have committed: each attempt is judged by its own result)."""
    client = slot.client
    assert client is not None
    try:
        await client.run(
            block,
            attempts=scopes,
            retries=RETRIES,
            name="chaos-hot",
            isolation="SERIALIZABLE",
            lock_at=mode.lock_at,
            consistency=mode.consistency,
            lock_wait=LOCK_WAIT_S,
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this lane itself is cancelled
        errors.append(f"{key}: the client was killed; run again on the new one")
        return True
    except ClientClosedError:
        errors.append(f"{key}: the client was closed under it; run again on the new one")
        return True
    except Exception as exc:  # the broker refused a request, a result never came: judged from the log
        errors.append(f"{key}: {type(exc).__name__}: {exc}")
    return False


async def judge_counts(settings: Settings, keys: Sequence[str], increments: Increments) -> dict[str, Any]:
    """The counts against the completed attempts, and the stores against each other."""
    async with stores(settings) as (qdrant, neo4j):
        found = await read_values(settings, keys, qdrant.backend, neo4j.driver)
    counted = sum(int(found["postgres"].get(key) or 0) for key in keys)
    completed, unknown = increments.applied(), increments.count(None)
    agreed = bench_contended.agreement(keys, found)
    return {
        "attempts": len(increments.history.intents),
        "completed": completed,
        "unknown": unknown,  # logged, and no result heard or read back
        "never_sent": increments.dropped,
        "counted": counted,
        "counts_ok": completed <= counted <= completed + unknown,
        "stores_agree": agreed.verified == len([k for k in keys if k in found["postgres"]]),
        "disagreeing": {store: n for store, n in agreed.missing.items() if n},
        "client_errors": len(increments.errors),  # runs ended by a client kill (run again) or an error
        "client_error_sample": increments.errors[:10],
    }
