"""`polycommit bench --hot-keys K [--interactive]`: transactions that contend for K hot keys, and what the
contention cost (deadlock victims, conflicts, lock waits), with the hot keys' final state checked.

Without `--interactive` each saga writes one hot key (its three stores) with a value of its own. With
`--interactive` each transaction is a counter increment: it reads two hot keys through the SDK
(`tx.postgres.get`), then writes the first one's count + 1 to the three stores. Locking at the commit (the
SDK's default, `--lock-at commit`) the reads take no lock; the commit asks every lock at once and checks
the reads at REPEATABLE_READ and SERIALIZABLE, so two increments of one key race: one commits, the other
finds its read stale (StaleReadError, counted in `conflict_rate`) and `coordinator.run(..., retries=N)`
runs it again; no cycle can form. Locking as it goes (`--lock-at access`) each read takes SHARED at once:
two transactions that read the same key both hold SHARED and both ask EXCLUSIVE, an upgrade deadlock
broken by the detector (`deadlock_rate`), and the victim runs again. `--for-update` takes the locks up
front instead, key by key in one global order (EXCLUSIVE on the written key's three lock keys, the read
lock on the other), so no cycle can form. `--read-for-update` reads the written key for update instead
(EXCLUSIVE at the read, in the code's order, as an application using SELECT ... FOR UPDATE does): no
upgrade deadlock, but two transactions taking two keys in opposite orders still close a cycle.

The hot keys are verified by agreement, not by a per-transaction value (a hot key's final value is the last
committed writer's): every store must hold the same value for each hot key. An interactive run also counts
lost updates: the hot keys' counts must add up to the committed transactions when reads are locked (at
REPEATABLE_READ, SERIALIZABLE or with `--for-update`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress

from polycommit import operations as ops
from polycommit.client import Coordinator, TransactionResult
from polycommit.errors import DeadlockVictimError, PolycommitError, StaleReadError, VersionConflict
from polycommit.interactive import READ_LOCKING_LEVELS, InteractiveScope, row_key
from polycommit.tooling.bench_verify import Verification
from polycommit.tooling.bench_workload import COLLECTION, DIMENSIONS, LABEL, TABLE, Write, keep_in_flight, percentile
from polycommit.tooling.workload import embed

ISOLATIONS = ("READ_UNCOMMITTED", "READ_COMMITTED", "REPEATABLE_READ", "SERIALIZABLE")
UNSEEN = "UnseenRetry"  # an attempt that ended with no result and no error of polycommit's (cancelled, say)


@dataclass(frozen=True)
class HotTransaction:
    """One contending transaction: it writes `write.key` (a hot key) after reading it and `other`."""

    write: Write
    other: str


def hot_keys(run: str, count: int) -> list[str]:
    return [f"{run}-h{i}" for i in range(count)]


def hot_transactions(run: str, count: int, keys: int, seed: int = 0) -> list[HotTransaction]:
    """`count` transactions over `keys` hot keys: each picks two distinct keys at random (the same key twice
    when there is only one), writes the first and reads both; its value is its own number."""
    if keys < 1:
        raise ValueError("hot transactions need at least one hot key")
    names, rng = hot_keys(run, keys), random.Random(seed)
    chosen = [rng.sample(names, 2) if keys > 1 else names * 2 for _ in range(count)]
    return [HotTransaction(Write(a, i, embed(a, DIMENSIONS)), b) for i, (a, b) in enumerate(chosen)]


def write_operations(write: Write) -> list[Any]:
    """The three writes of `write` (as `saga_of` makes them), for their lock keys."""
    return [
        ops.upsert_row(TABLE, {"id": write.key}, {"v": write.value}),
        ops.upsert_points(COLLECTION, [ops.point(write.key, write.vector, {"v": write.value})]),
        ops.merge_node(LABEL, {"id": write.key}, {"v": write.value}),
    ]


async def increment(
    tx: InteractiveScope, item: HotTransaction, for_update: bool, read_for_update: bool = False
) -> None:
    """Read both keys, then write the first one's count + 1 to the three stores."""
    key, other = item.write.key, item.other
    if for_update:
        # One global order (the key names), each key in the mode it will end in: no upgrade, no cycle.
        written = sorted({k for op in write_operations(item.write) for k in ops.lock_keys(op)})
        for name in sorted({key, other}):
            if name == key:
                await tx.lock(written, "EXCLUSIVE")
            else:
                await tx.lock_for_read([row_key(TABLE, {"id": name})])
    mine = await tx.postgres.get(TABLE, {"id": key}, for_update=read_for_update)
    await tx.postgres.get(TABLE, {"id": other})
    count = int(mine.value["v"]) + 1 if mine.value is not None else 1
    await tx.postgres.upsert(TABLE, {"id": key}, {"v": count})
    await tx.qdrant.upsert(COLLECTION, [ops.point(key, item.write.vector, {"v": count})])
    await tx.neo4j.merge_node(LABEL, {"id": key}, {"v": count})


@dataclass
class Contention:
    """Every attempt of a run's transactions: how each ended (error class; "" when it committed or ended
    without error) and how long each granted lock request waited."""

    outcomes: list[str] = field(default_factory=list)
    lock_waits_s: list[float] = field(default_factory=list)

    def add_attempts(self, scopes: Sequence[InteractiveScope]) -> None:
        """The transactions `coordinator.run(..., attempts=...)` listed, each once."""
        for scope in scopes:
            self.lock_waits_s.extend(scope.lock_waits_s)
            self.outcomes.extend([StaleReadError.__name__] * scope.reruns)  # attempts run again in it
            if scope.result is not None:
                self.outcomes.append(scope.result.error_class or "")
            else:
                self.outcomes.append(scope.failed or UNSEEN)


def contention_summary(contention: Contention) -> dict[str, Any]:
    """`attempts`, `deadlock_rate` and `conflict_rate` per attempt, and the lock waits' percentiles (ms)."""
    attempts = len(contention.outcomes)
    waits_ms = [s * 1000 for s in contention.lock_waits_s]

    def rate(error: str) -> float:
        return round(contention.outcomes.count(error) / attempts, 5) if attempts else 0.0

    by_error: dict[str, int] = {}
    for outcome in contention.outcomes:
        if outcome:
            by_error[outcome] = by_error.get(outcome, 0) + 1
    return {
        "attempts": attempts,
        "deadlock_rate": rate(DeadlockVictimError.__name__),
        "conflict_rate": round(rate(VersionConflict.__name__) + rate(StaleReadError.__name__), 5),
        "failed_attempts_by_error": by_error,
        "lock_wait_ms": {
            "requests": len(waits_ms),
            "p50": round(percentile(waits_ms, 0.50), 1),
            "p99": round(percentile(waits_ms, 0.99), 1),
            "max": round(max(waits_ms), 1) if waits_ms else 0.0,
        },
    }


async def run_interactive(
    client: Coordinator,
    items: Sequence[HotTransaction],
    concurrency: int,
    progress: Progress | None,
    options: Mapping[str, Any],
) -> tuple[list[float], list[TransactionResult | Exception], float, Contention]:
    """Keep `concurrency` interactive increments in flight, each through `client.run` (`options`: retries,
    isolation, lock_at, for_update, read_for_update); latencies (ms) span every attempt of a transaction."""
    latencies: list[float] = []
    results: list[TransactionResult | Exception] = []
    contention = Contention()
    for_update, read_for_update = bool(options.get("for_update")), bool(options.get("read_for_update"))
    task = (
        progress.add_task(f"interactive transactions, {concurrency} in flight", total=len(items)) if progress else None
    )

    async def one(item: HotTransaction) -> None:
        scopes: list[InteractiveScope] = []

        async def block(tx: InteractiveScope) -> None:
            await increment(tx, item, for_update, read_for_update)

        started = time.perf_counter()
        try:
            results.append(
                await client.run(
                    block,
                    attempts=scopes,
                    retries=options["retries"],
                    name="bench-hot",
                    isolation=options["isolation"],
                    lock_at=options.get("lock_at", "commit"),
                    consistency=options.get("consistency", "EVENTUAL"),
                )
            )
        except PolycommitError as exc:
            results.append(exc)
        latencies.append((time.perf_counter() - started) * 1000)
        contention.add_attempts(scopes)
        if progress is not None and task is not None:
            progress.advance(task)

    started = time.perf_counter()
    await keep_in_flight(items, concurrency, one)
    return latencies, results, time.perf_counter() - started, contention


def agreement(keys: Sequence[str], found: Mapping[str, Mapping[str, Any]]) -> Verification:
    """Hot keys: a key is verified when every store in `found` holds a value for it and all agree; a store
    counts a miss for a key when it lacks it or differs from PostgreSQL (the first store)."""
    missing = {store: 0 for store in found}
    reference = next(iter(found.values()), {})
    verified = 0
    for key in keys:
        values = [found[store].get(key) for store in found]
        verified += None not in values and len(set(values)) == 1
        for store in found:
            value = found[store].get(key)
            missing[store] += value is None or value != reference.get(key)
    return Verification(verified, missing, tuple(found))


def lost_updates(keys: Sequence[str], postgres: Mapping[str, Any], committed: int) -> int:
    """Increments committed but missing from the counts (negative: counted more than committed)."""
    return committed - sum(int(postgres.get(key) or 0) for key in keys)


def reads_locked(isolation: str, for_update: bool) -> bool:
    """Whether the increments' reads hold locks to their commit (then no update may be lost)."""
    return for_update or isolation in READ_LOCKING_LEVELS
