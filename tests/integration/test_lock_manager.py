"""The lock manager partitioned by resource key (orchestrator/lock_manager.py) on the real broker: the
coordinators' side is played by tests/lock_driver.py (ordered acquisition, hold, release).

- Transactions of up to four keys spread over the partitions, all at once: every one acquires and ends,
  no two ever hold conflicting locks, each partition answers GRANTED exactly once per transaction asking
  it (nothing crashed: nothing is answered twice), and nothing is left locked.
- A restarted manager restores a partition's holders and queues from the log: a waiter queued before the
  restart is granted by the new one when the holder releases.
- kill -9 between a loop's acknowledged answers and the commit of the offsets it read: the restarted
  manager folds up to the committed offset and answers the rest again (repeats the driver ignores, as the
  coordinator does); still no conflicting holders, every transaction acquires and ends.
- Bad records (undecodable, a request on a partition it does not name) are dead letters; the partition
  goes on answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lock_driver import LockDriver, lock_driver, random_transactions, run_transactions

from orchestrator.lock_manager import LockManagerService
from orchestrator.lock_partitions import PartitionRequest, request_record
from orchestrator.locks import EXCLUSIVE
from polycommit.bus import Outgoing, create_topics, delete_topics, read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.events import now_ms
from polycommit.tooling.chaos import run_settings
from polycommit.tooling.processes import PartProcess

pytestmark = pytest.mark.servers

KEYS = [f"postgres:documents:k{i}" for i in range(8)]
WORKLOAD_BOUND_S = 120.0  # a workload not done by then hangs: a failure


@pytest.fixture
async def run(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="locks", edge_path=tmp_path / "qdrant-edge")
    await create_topics(run, {"lock-requests": 4})  # keys spread over several partitions
    try:
        yield run
    finally:
        await delete_topics(run)


@contextlib.asynccontextmanager
async def manager(run: Settings) -> AsyncIterator[LockManagerService]:
    service = LockManagerService(run)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(service.run(stop, ready))
    await asyncio.wait_for(ready.wait(), 60)
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def spread(driver: LockDriver) -> set[int]:
    return {driver.partition_of(k) for k in KEYS}


async def nothing_left(driver: LockDriver) -> None:
    """Every key can be locked exclusively by a newcomer, twice in a row: every earlier transaction's
    release was read (FIFO queues: the newcomer would wait behind anything left)."""
    for probe in ("probe-1", "probe-2"):
        acquisition = await driver.acquire(probe, dict.fromkeys(KEYS, EXCLUSIVE))
        await driver.release(acquisition)


def exactly_once(driver: LockDriver, plans: dict[str, dict[str, object]], at_least: bool = False) -> None:
    counts = driver.granted_counts()
    for tx_id, wanted in plans.items():
        for partition in {driver.partition_of(k) for k in wanted}:
            count = counts[(tx_id, partition)]
            assert count >= 1 if at_least else count == 1, (tx_id, partition, count)


def at_least_once(driver: LockDriver, plans: dict[str, dict[str, object]]) -> None:
    exactly_once(driver, plans, at_least=True)


async def test_transactions_over_partitions_hold_no_conflict_and_end(run: Settings) -> None:
    async with manager(run) as service, lock_driver(run) as driver:
        assert len(spread(driver)) >= 3, "the keys must cross partitions for the test to mean anything"
        plans = random_transactions(seed=7, count=24, keys=KEYS)
        await asyncio.wait_for(run_transactions(driver, plans), WORKLOAD_BOUND_S)
        assert driver.conflicts == []
        exactly_once(driver, plans)  # type: ignore[arg-type]
        assert any(not a.granted for a in driver.answers), "no transaction ever waited: the test proved little"
        await nothing_left(driver)
        for partition in spread(driver):  # at most the last probe, whose release may not be read yet
            table = service.partition(partition)
            assert table is not None and len(table.table) == int("probe-2" in table.table)


async def test_a_restarted_manager_grants_a_waiter_queued_before(run: Settings) -> None:
    async with lock_driver(run) as driver:
        key = KEYS[0]
        async with manager(run):
            holder = await driver.acquire("holder", {key: EXCLUSIVE})
            await driver.send(PartitionRequest("waiter", driver.partition_of(key), ((key, EXCLUSIVE),)))
            answer = await asyncio.wait_for(driver.inbox("waiter").get(), 60)
            assert not answer.granted and answer.blockers == ("holder",)
        async with manager(run) as restarted:
            await driver.release(holder)
            answer = await asyncio.wait_for(driver.inbox("waiter").get(), 60)
            assert answer.granted
            assert restarted.stats.restored_records >= 2  # the holder's request and the waiter's


async def test_kill_between_answers_and_offsets_answers_again_and_every_transaction_ends(
    run: Settings, tmp_path: Path
) -> None:
    part = PartProcess("lock-manager", run, log_path=tmp_path / "lock-manager.log")
    await part.start(failpoint="lock_manager.before_offsets:3")  # the third loop that answered something
    try:
        async with lock_driver(run) as driver:
            plans = random_transactions(seed=11, count=16, keys=KEYS)
            workload = asyncio.create_task(run_transactions(driver, plans))
            assert await part.exited(timeout=60) == -9, "the failpoint was not reached"
            killed_at = now_ms()
            await part.start()
            await asyncio.wait_for(workload, WORKLOAD_BOUND_S)
            assert driver.conflicts == []
            assert any(at < killed_at for at in driver.answered_at), "the killed process had answered nothing"
            at_least_once(driver, plans)  # type: ignore[arg-type]
            await nothing_left(driver)
    finally:
        if part.running:
            part.kill()
            await part.exited()


async def test_bad_records_are_dead_letters_and_the_partition_goes_on(run: Settings) -> None:
    topics = topics_for(run)
    async with manager(run) as service, lock_driver(run) as driver:
        key = KEYS[0]
        here = driver.partition_of(key)
        elsewhere = next(p for p in driver.partitions if p != here)
        assert driver.publisher is not None
        await driver.publisher.producer.send_and_wait(topics.lock_requests, b"not avro", key=b"junk", partition=here)
        misplaced = request_record(PartitionRequest("misplaced", elsewhere, ((key, EXCLUSIVE),)), now_ms())
        item = Outgoing(topics.lock_requests, "misplaced", "LockPartitionRequest", misplaced, here)
        await driver.publisher.send(item)
        acquisition = await driver.acquire("after", {key: EXCLUSIVE})  # answered: the partition went on
        await driver.release(acquisition)
        assert service.stats.dead_letters == 2
    codec = default_codec()
    letters: list[dict[str, object]] = []
    await read_topic(run, topics.dead_letters, lambda r: letters.append(codec.decode_as(r.value, "DeadLetter")))
    assert sorted(str(letter["error_class"]) for letter in letters if letter["consumer"] == "lock-manager") == [
        "CorruptEventError",
        "InvalidEventError",
    ]
