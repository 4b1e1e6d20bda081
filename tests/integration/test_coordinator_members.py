"""Several coordinator members in one group, on the real broker. By default one is active and owns every
transaction partition (so one lock table sees every transaction) and the others stand by; when the active
one dies, a standby takes every partition over, restores the state from the changelog and finishes what
was in flight. Split among members (`partitioned`), each warns that its lock table covers only its own
transactions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from runtimes import reading_client, started_runtime

from orchestrator.deferred import Taken
from orchestrator.service import CoordinatorService
from polycommit.bus import Outgoing, create_topics, delete_topics, topics_for
from polycommit.client import Transaction
from polycommit.config import Settings
from polycommit.log_reader import read_topic
from polycommit.results import TransactionResult
from polycommit.tooling import workload
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.checker import History, check
from polycommit.tooling.inspect import coordinator_members
from polycommit.tooling.runtime import Runtime

pytestmark = pytest.mark.servers

WAIT_S = 90.0  # a dead static member's partitions move after the session timeout (6 s), then a restore


class MemberLog(logging.Handler):
    """The coordinator's log lines about partition ownership, with a wait for the first one matching."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.loop = asyncio.get_running_loop()
        self.messages: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "transaction partitions" in record.getMessage():
            self.messages.append(record.getMessage())
            self.loop.call_soon_threadsafe(self.changed.set)

    async def said(self, text: str, after: int = 0, times: int = 1) -> list[str]:
        """The messages from index `after` on that contain `text`, once there are `times` of them."""
        async with asyncio.timeout(WAIT_S):
            while True:
                found = [m for m in self.messages[after:] if text in m]
                if len(found) >= times:
                    return found
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def listening() -> AsyncIterator[MemberLog]:
    caught = MemberLog()
    logger = logging.getLogger("orchestrator.members")
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(caught)
    try:
        yield caught
    finally:
        logger.removeHandler(caught)
        logger.setLevel(previous)


def ingest(run: str, i: int) -> Transaction:
    doc = f"member-{run}-{i}"
    return workload.ingest_document(doc, f"title {i}", f"body {i}", f"cust-{run}-{i % 3}")


async def test_one_member_is_active_and_a_standby_takes_over_when_it_dies(settings: Settings, tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:8]
    run = run_settings(settings, run_id, prefix="members", edge_path=tmp_path / "edge")
    await create_topics(run, {"intents": 2})
    stops = {name: asyncio.Event() for name in ("a", "b")}
    members = {name: CoordinatorService(run, instance=name) for name in stops}
    tasks: dict[str, asyncio.Task[None]] = {}
    try:
        async with listening() as log, started_runtime(run, coordinator=False) as runtime:
            tasks["a"] = asyncio.create_task(members["a"].run(stops["a"]))
            await log.said("member a: active, owns all 2")
            joined = len(log.messages)
            tasks["b"] = asyncio.create_task(members["b"].run(stops["b"]))
            await log.said("member b: standing by, owns none", joined)  # b's join did not move the work
            await log.said("member a: active, owns all 2", joined)
            members_now = await coordinator_members(run)  # what `polycommit status` shows
            assert not isinstance(members_now, str), members_now
            assert [(m["instance"], m["active"], m["partitions"]) for m in members_now] == [
                ("a", True, [0, 1]),
                ("b", False, []),
            ]
            async with reading_client(runtime, timeout=WAIT_S) as client:
                customers = [workload.create_customer(f"cust-{run_id}-{i}", f"customer {i}") for i in range(3)]
                assert [r.status for r in await client.execute_many(customers)] == ["completed"] * 3
                before = [ingest(run_id, i) for i in range(10)]
                done = await asyncio.gather(*(client.execute(t) for t in before))
                in_flight = [ingest(run_id, i) for i in range(10, 30)]
                pending = [asyncio.create_task(client.execute(t)) for t in in_flight]
                crashed = len(log.messages)
                tasks["a"].cancel()  # like a crash: nothing flushed, the group notices after its session timeout
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks["a"]
                await log.said("member b: active, owns all 2", crashed)
                after = [ingest(run_id, i) for i in range(30, 40)]
                done += await asyncio.gather(*pending, *(client.execute(t) for t in after))
            assert [r.status for r in done] == ["completed"] * 40
            assert members["b"].stats.intents >= len(after)  # b coordinated them: it took the work over
            assert await violations(runtime, [*before, *in_flight, *after], done) == []
    finally:
        for name, stop in stops.items():
            stop.set()
            if name in tasks and not tasks[name].done():
                await tasks[name]
        await delete_topics(run)


async def violations(runtime: Runtime, transactions: list[Transaction], results: list[TransactionResult]) -> list[str]:
    history = History()
    for transaction, result in zip(transactions, results, strict=True):
        history.invoke(transaction)
        history.record(transaction.tx_id, result.status)
    qdrant = runtime.workers["qdrant"].participant
    report = await check(runtime.settings, history, qdrant=qdrant, keys_owned=False)  # type: ignore[arg-type]
    return [str(v) for v in report.violations]


async def test_split_among_members_each_warns_that_its_lock_table_covers_only_its_transactions(
    settings: Settings, tmp_path: Path
) -> None:
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="members", edge_path=tmp_path / "edge")
    run = dataclasses.replace(run, coordinator_members="partitioned")
    await create_topics(run, {"intents": 2})
    stop = asyncio.Event()
    members = [CoordinatorService(run, instance=f"member-{i}") for i in range(2)]
    try:
        async with listening() as log:
            tasks = [asyncio.create_task(member.run(stop)) for member in members]
            try:
                await log.said("owns 1 of 2 transaction partitions", times=2)  # the second join split them
            finally:
                stop.set()
                await asyncio.gather(*tasks)
        assert all("lock table covers only" in m for m in log.messages if "owns 1 of 2" in m), log.messages
    finally:
        await delete_topics(run)


async def commands_of(settings: Settings, tx_id: str) -> dict[str, int]:
    """How many commands each store's topic holds for `tx_id` (committed ones)."""
    counts = dict.fromkeys(("postgres", "qdrant", "neo4j"), 0)
    for store in counts:

        def count(record: Any, store: str = store) -> None:
            counts[store] += record.key == tx_id.encode()

        await read_topic(settings, topics_for(settings).commands(store), count)
    return counts


class HeldCoordinator(CoordinatorService):
    """A member whose loop, about to commit the first records of `held_tx`, waits for `resume` where it
    waits for the previous Kafka transaction: so a rebalance runs, start to end, while the loop holds a
    folded batch (aiokafka runs the rebalance callbacks in a task of its own, at any await of the loop)."""

    def __init__(self, settings: Settings, held_tx: str, **options: Any) -> None:
        super().__init__(settings, **options)
        self.held_tx: str | None = held_tx
        self.hold_next_drain = False
        self.holding = asyncio.Event()
        self.resume = asyncio.Event()
        self.restores = 0
        self.restored = asyncio.Event()

    async def _start_commit(self, out: list[Outgoing], taken: Taken, epoch: int | None = None) -> None:
        self.hold_next_drain = epoch is not None and any(o.key == self.held_tx for o in out)
        await super()._start_commit(out, taken, epoch)

    async def drain(self, *, reraise: bool = True) -> None:
        if self.hold_next_drain:  # the loop's wait for the commit before, its records built
            self.hold_next_drain, self.held_tx = False, None
            self.holding.set()
            await self.resume.wait()
        await super().drain(reraise=reraise)

    async def restore(self, partitions: set[int]) -> None:
        await super().restore(partitions)
        self.restores += 1
        self.restored.set()


async def test_a_batch_held_across_a_rebalance_is_read_again_not_committed_over_the_restored_state(
    settings: Settings, tmp_path: Path
) -> None:
    """The active member folds an intent and, before its Kafka transaction starts, the group rebalances
    (a member joins): the member gives its partitions up and restores them from the changelog, which
    does not hold that transaction. Committing the held batch then would publish its commands while the
    restored state knows nothing of it, and the new assignment reads the intent again: the transaction
    would be folded twice, its commands sent twice. The held batch is dropped instead, read again once."""
    run_id = uuid.uuid4().hex[:8]
    run = run_settings(settings, run_id, prefix="members", edge_path=tmp_path / "edge")
    await create_topics(run, {"intents": 2})
    customers = [workload.create_customer(f"cust-{run_id}-{i}", f"customer {i}") for i in range(3)]
    held = ingest(run_id, 0)
    a = HeldCoordinator(run, held.tx_id, instance="a")
    b = CoordinatorService(run, instance="b")
    stops = {"a": asyncio.Event(), "b": asyncio.Event()}
    tasks: list[asyncio.Task[None]] = []
    try:
        async with listening() as log, started_runtime(run, coordinator=False) as runtime:
            tasks.append(asyncio.create_task(a.run(stops["a"])))
            await log.said("member a: active, owns all 2")
            async with reading_client(runtime, timeout=WAIT_S) as client:
                assert [r.status for r in await client.execute_many(customers)] == ["completed"] * 3
                pending = asyncio.create_task(client.execute(held))
                await a.holding.wait()
                restores, a.restored = a.restores, asyncio.Event()
                tasks.append(asyncio.create_task(b.run(stops["b"])))  # its join makes the group rebalance
                await log.said("member b: standing by, owns none")
                while a.restores == restores:  # a restored its partitions again for the new generation
                    await a.restored.wait()
                    a.restored.clear()
                a.resume.set()
                done = [await pending]
                after = [ingest(run_id, i) for i in range(1, 6)]
                done += await asyncio.gather(*(client.execute(t) for t in after))
            assert [r.status for r in done] == ["completed"] * 6
            assert a.stats.loops_started_over == 1
            # One command per step (row, embedding; node, authorship): its intent was folded once.
            assert await commands_of(run, held.tx_id) == {"postgres": 1, "qdrant": 1, "neo4j": 2}
            assert await violations(runtime, [held, *after], done) == []
    finally:
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*tasks)
        await delete_topics(run)
