"""Serializability on the real servers: interactive transactions at SERIALIZABLE, locking at their commit
(the SDK's default: every lock at once, the reads checked under them, a stale read retried) or as they go
(lock_at="access": SHARED locks at each read, strict two-phase locking; deadlocks broken by the detector and
retried).

- Bank transfers: balances mirrored in PostgreSQL, Qdrant and Neo4j; concurrent transfers read two
  balances and write both, in all three stores. The total never changes and the stores agree.
- A list-append history (Elle-style, polycommit/tooling/checker/cycles.py): transactions read two lists
  and append to one by writing it back; at SERIALIZABLE the dependency graph has no cycle (G0, G1c, G2)
  and no append is lost; the same workload at READ_UNCOMMITTED (no read locks) shows an anomaly, so the
  test can fail.

Sizes: POLYCOMMIT_BANK_TRANSFERS (default 2000) at POLYCOMMIT_BANK_CONCURRENCY (default 32).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from runtimes import reading_client, started_runtime

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.events import Consistency, Isolation
from polycommit.interactive import InteractiveScope, LockAt, node_key, point_key, row_key
from polycommit.tooling.checker.cycles import Append, Read, Txn, analyse
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers

POLICY = SagaPolicy(default_timeout_ms=20_000, backoff_base_ms=50, backoff_max_ms=1000, compensation_retries=3)
ACCOUNTS_TABLE, LISTS_TABLE = "ser_accounts", "ser_lists"
COLLECTION, LABEL = "ser_accounts", "SerAccount"
VECTOR = [1.0, 0.0]
TRANSFERS = int(os.environ.get("POLYCOMMIT_BANK_TRANSFERS", "2000"))
CONCURRENCY = int(os.environ.get("POLYCOMMIT_BANK_CONCURRENCY", "32"))
RETRIES = 50  # a transfer is retried as a deadlock victim until it commits


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    tables = [
        f"CREATE TABLE IF NOT EXISTS {ACCOUNTS_TABLE} (id text PRIMARY KEY, balance integer NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {LISTS_TABLE} (id text PRIMARY KEY, items text NOT NULL)",
    ]
    collection = (COLLECTION, len(VECTOR))
    options: dict[str, Any] = {"policy": POLICY, "batch_size": 200, "detector": True, "start_timeout": 120}
    async with started_runtime(topics, tables=tables, collection=collection, **options) as rt:
        yield rt


@pytest.fixture(scope="module")
async def client(runtime: Runtime) -> AsyncIterator[Coordinator]:
    async with reading_client(runtime, timeout=120) as coordinator:
        yield coordinator


async def write_balance(tx: InteractiveScope, account: str, balance: int) -> None:
    await tx.postgres.upsert(ACCOUNTS_TABLE, {"id": account}, {"balance": balance})
    await tx.qdrant.upsert(COLLECTION, [ops.point(account, VECTOR, {"balance": balance})])
    await tx.neo4j.merge_node(LABEL, {"id": account}, {"balance": balance})


def account_keys(account: str) -> list[str]:
    return [row_key(ACCOUNTS_TABLE, {"id": account}), point_key(COLLECTION, account), node_key(LABEL, {"id": account})]


async def balances(client: Coordinator, accounts: list[str]) -> dict[str, tuple[int, int, int]]:
    """Each account's balance in PostgreSQL, Qdrant and Neo4j, read after the workload."""
    found: dict[str, tuple[int, int, int]] = {}
    for account in accounts:
        row = await client.reads.read_row(ACCOUNTS_TABLE, {"id": account})
        point = await client.reads.read_point(COLLECTION, account)
        node = await client.reads.read_node(LABEL, {"id": account})
        assert row.value is not None and point.value is not None and node.value is not None, account
        found[account] = (int(row.value["balance"]), int(point.value["balance"]), int(node.value["balance"]))
    return found


@pytest.mark.parametrize(("consistency", "transfers"), [("EVENTUAL", TRANSFERS), ("STRONG", max(1, TRANSFERS // 4))])
async def test_concurrent_transfers_at_serializable_keep_the_total_and_the_stores_agree(
    client: Coordinator, consistency: Consistency, transfers: int
) -> None:
    """Sagas, and two-phase commits (an interactive STRONG transaction: its intent is run by two-phase
    commit under the locks its block took; a quarter as many, it is the slower protocol)."""
    run = uuid.uuid4().hex[:8]
    accounts = [f"acct-{run}-{i}" for i in range(8 * CONCURRENCY)]  # two per transfer: some contend
    initial = 1000

    async def open_account(tx: InteractiveScope, account: str) -> None:
        await write_balance(tx, account, initial)

    for account in accounts:
        opened = await client.run(functools.partial(open_account, account=account), name="open")
        assert opened.ok, opened
    rng = random.Random(run)
    plan: list[tuple[str, str, int]] = []
    for _ in range(transfers):
        source, target = rng.sample(accounts, 2)
        plan.append((source, target, rng.randint(1, 50)))

    async def transfer(tx: InteractiveScope, source: str, target: str, amount: int) -> None:
        # Like SELECT ... FOR UPDATE: both accounts' keys in every store, EXCLUSIVE, in one request (one
        # canonical order: transfers never deadlock); the reads and writes below then ask for nothing.
        await tx.lock(sorted(account_keys(source) + account_keys(target)), "EXCLUSIVE")
        paid = (await tx.postgres.get(ACCOUNTS_TABLE, {"id": source})).value
        got = (await tx.postgres.get(ACCOUNTS_TABLE, {"id": target})).value
        assert paid is not None and got is not None
        moved = min(amount, int(paid["balance"]))  # never below zero
        await write_balance(tx, source, int(paid["balance"]) - moved)
        await write_balance(tx, target, int(got["balance"]) + moved)

    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(source: str, target: str, amount: int) -> str | None:
        async with gate:
            result = await client.run(
                lambda tx: transfer(tx, source, target, amount),
                name="transfer",
                consistency=consistency,
                isolation="SERIALIZABLE",
                retries=RETRIES,
                backoff=0.01,
                max_backoff=0.5,
            )
            return None if result.ok else f"{result.status}: {result.error}"

    failed = [f for f in await asyncio.gather(*(one(s, t, a) for s, t, a in plan)) if f is not None]
    assert not failed, f"{len(failed)} of {len(plan)} transfers did not commit: {failed[:3]}"
    found = await balances(client, accounts)
    disagree = {a: b for a, b in found.items() if len(set(b)) != 1}
    assert not disagree, f"the stores disagree on {len(disagree)} accounts: {list(disagree.items())[:5]}"
    assert sum(b[0] for b in found.values()) == initial * len(accounts)


@dataclass
class ListHistory:
    """The list-append history a workload produced: what each attempt read and appended."""

    attempts: dict[str, tuple[Append | Read, ...]] = field(default_factory=dict)
    committed: set[str] = field(default_factory=set)
    values: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def transactions(self) -> list[Txn]:
        return [Txn(tx, ops_, tx in self.committed) for tx, ops_ in self.attempts.items()]


def items_of(value: dict[str, Any] | None) -> tuple[int, ...]:
    return tuple(json.loads(value["items"])) if value is not None else ()


async def list_append_workload(
    client: Coordinator, isolation: Isolation, size: int, concurrency: int, lock_at: LockAt = "commit"
) -> ListHistory:
    """`size` transactions, each reading two of three lists and appending a unique value to one of them by
    writing it back (read-modify-write), at `concurrency`; then one read of every list once all ended."""
    run = uuid.uuid4().hex[:8]
    keys = [f"list-{run}-{k}" for k in "xyz"]
    history = ListHistory()
    rng = random.Random(f"{run}{isolation}")
    gate = asyncio.Semaphore(concurrency)

    async def block(tx: InteractiveScope, read: list[str], target: str) -> None:
        seen = {k: items_of((await tx.postgres.get(LISTS_TABLE, {"id": k})).value) for k in read}
        value = next(history.values)
        await tx.postgres.upsert(LISTS_TABLE, {"id": target}, {"items": json.dumps([*seen[target], value])})
        history.attempts[tx.tx_id] = (*(Read(k, seen[k]) for k in read), Append(target, value))

    async def one() -> None:
        read = rng.sample(keys, 2)
        target = rng.choice(read)
        async with gate:
            result = await client.run(
                lambda tx: block(tx, read, target),
                name="append",
                isolation=isolation,
                lock_at=lock_at,
                retries=RETRIES,
                backoff=0.01,
            )
        if result.ok:
            history.committed.add(result.tx_id)

    await asyncio.gather(*(one() for _ in range(size)))
    final: list[Append | Read] = []
    for k in keys:
        final.append(Read(k, items_of((await client.reads.read_row(LISTS_TABLE, {"id": k})).value)))
    history.attempts["final"] = tuple(final)
    history.committed.add("final")
    return history


@pytest.mark.parametrize("lock_at", ["commit", "access"])
async def test_a_list_append_history_at_serializable_has_no_dependency_cycle(
    client: Coordinator, lock_at: LockAt
) -> None:
    history = await list_append_workload(client, "SERIALIZABLE", size=150, concurrency=16, lock_at=lock_at)
    assert len(history.committed) == 151, "every transaction commits, deadlock victims after their retries"
    analysis = analyse(history.transactions(), final_reads=True)
    assert analysis.anomalies == [], analysis.anomalies[:5]


async def test_the_same_workload_at_read_uncommitted_shows_an_anomaly(client: Coordinator) -> None:
    history = await list_append_workload(client, "READ_UNCOMMITTED", size=150, concurrency=16)
    analysis = analyse(history.transactions(), final_reads=True)
    assert analysis.anomalies, "reads without locks let a read-modify-write lose another's append"
    assert analysis.kinds() <= {"G2", "G1c", "G0", "incompatible-order", "lost-append"}
