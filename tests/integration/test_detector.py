"""The deadlock detector on the real broker: lock events in on `locks`, one verdict per cycle out on `deadlocks`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.detector import Detector
from polycommit.bus import Outgoing, Publisher, make_consumer, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.events import LockEvent, now_ms
from projections.wait_for import CATCH_UP_MS

pytestmark = pytest.mark.servers

VERDICT_DEADLINE_S = 30.0


@pytest.fixture
async def detector(topics: Settings, tmp_path: Any) -> AsyncIterator[Detector]:
    found = Detector(topics, data_dir=tmp_path / "detector")
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(found.run(stop, ready))
    await asyncio.wait_for(ready.wait(), 60)
    yield found
    stop.set()
    await asyncio.wait_for(task, 60)


def waiting(tx: str, resource: str, blocker: str, priority: int, started: int) -> LockEvent:
    return {
        "tx_id": tx,
        "resource": resource,
        "mode": "EXCLUSIVE",
        "action": "WAITING",
        "blockers": [blocker],
        "priority": priority,
        "started_at_ms": started,
        "work_done": 0,
        "at_ms": now_ms(),
    }


async def test_a_cycle_published_as_lock_events_gets_one_verdict_naming_the_lower_priority(
    topics: Settings, detector: Detector
) -> None:
    names = topics_for(topics)
    run = uuid.uuid4().hex[:8]
    high, low = f"high-{run}", f"low-{run}"
    consumer = make_consumer(topics, names.deadlocks, group_id=f"verdicts-{run}")
    await consumer.start()
    publisher = Publisher(topics)
    await publisher.start()
    try:
        # A corrupt record first: the detector must skip it and go on.
        await publisher.publish_and_wait([Outgoing(names.locks, "probe", "Alert", None, encoded=b"not avro")])
        started = now_ms()
        events = [
            waiting(high, f"r1-{run}", low, priority=5, started=started),
            waiting(low, f"r2-{run}", high, priority=1, started=started - 60_000),
        ]
        await publisher.publish_and_wait([Outgoing(names.locks, e["resource"], "LockEvent", e) for e in events])
        verdicts = await _verdicts_about({high, low}, consumer)
    finally:
        await publisher.stop()
        await consumer.stop()
    assert len(verdicts) == 1
    assert verdicts[0]["victim"] == low
    assert set(verdicts[0]["cycle"]) == {high, low}
    assert detector.stats.corrupt >= 1


async def _verdicts_about(members: set[str], consumer: Any) -> list[dict[str, Any]]:
    codec = default_codec()
    found: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + VERDICT_DEADLINE_S
    while not found:
        assert asyncio.get_running_loop().time() < deadline, "no verdict within the deadline"
        batch = await consumer.getmany(timeout_ms=1000)
        for records in batch.values():
            for record in records:
                verdict = codec.decode_as(record.value, "DeadlockVerdict")
                if set(verdict["cycle"]) & members:
                    found.append(verdict)
    # Anything else about the same cycle would arrive with it (one fold, one send per cycle).
    batch = await consumer.getmany(timeout_ms=500)
    for records in batch.values():
        for record in records:
            verdict = codec.decode_as(record.value, "DeadlockVerdict")
            if set(verdict["cycle"]) & members:
                found.append(verdict)
    return found


async def test_a_detector_reads_from_its_start_and_judges_what_is_announced_since(
    topics: Settings, tmp_path: Any
) -> None:
    """The locks topic keeps its history (`polycommit check` reads it): a detector that starts reads
    from the end, not the whole topic. A cycle whose waits were published before it started and never
    again (its transactions ended) gets no verdict; a wait still current reaches it when its coordinator
    announces it again (every REANNOUNCE_MS; here by hand)."""
    names = topics_for(topics)
    run = uuid.uuid4().hex[:8]
    ended, current = [f"ended-a-{run}", f"ended-b-{run}"], [f"now-a-{run}", f"now-b-{run}"]
    publisher = Publisher(topics)
    await publisher.start()
    consumer = make_consumer(topics, names.deadlocks, group_id=f"verdicts-{run}")
    await consumer.start()
    found = Detector(topics, data_dir=tmp_path / "late-detector")
    stop, ready = asyncio.Event(), asyncio.Event()
    try:
        await publisher.publish_and_wait(records(names.locks, cycle(ended, run)))
        task = asyncio.create_task(found.run(stop, ready))
        await asyncio.wait_for(ready.wait(), 60)  # positioned at the end of every partition
        await publisher.publish_and_wait(records(names.locks, cycle(current, run)))
        verdicts = await _verdicts_about({*ended, *current}, consumer)
        stop.set()
        await asyncio.wait_for(task, 60)
    finally:
        stop.set()
        await publisher.stop()
        await consumer.stop()
    assert [set(v["cycle"]) for v in verdicts] == [set(current)]  # none for the cycle before its start
    assert found.stats.events == 2 and found.stats.skipped == 0  # not the topic's history: only these two


def cycle(members: list[str], run: str) -> list[LockEvent]:
    """Two transactions, each waiting for a resource the other holds."""
    a, b, started = members[0], members[1], now_ms()
    return [waiting(a, f"r1-{run}", b, 0, started), waiting(b, f"r2-{run}", a, 0, started)]


def records(topic: str, events: list[LockEvent]) -> list[Outgoing]:
    return [Outgoing(topic, e["resource"], "LockEvent", e) for e in events]


async def test_waits_stamped_before_the_catch_up_window_are_skipped_and_fresh_ones_judged(
    topics: Settings, detector: Detector
) -> None:
    """An event delivered long after it was stamped (a producer's clock far behind, a write delayed) is
    skipped: a wait still current is announced again since, with a fresh stamp."""
    names = topics_for(topics)
    run = uuid.uuid4().hex[:8]
    r1, r2 = f"r1-{run}", f"r2-{run}"
    old = [f"old-a-{run}", f"old-b-{run}"]
    fresh = [f"new-a-{run}", f"new-b-{run}"]
    stale = [waiting(old[0], r1, old[1], 0, 1), waiting(old[1], r2, old[0], 0, 2)]
    for event in stale:  # a cycle from long before the detector started: its transactions ended since
        event["at_ms"] = now_ms() - CATCH_UP_MS - 60_000
    current = [waiting(fresh[0], r1, fresh[1], 0, 1), waiting(fresh[1], r2, fresh[0], 0, 2)]
    consumer = make_consumer(topics, names.deadlocks, group_id=f"verdicts-{run}")
    await consumer.start()
    publisher = Publisher(topics)
    await publisher.start()
    try:
        skipped_before = detector.stats.skipped
        # The same resources, so each partition holds the stale event before the current one.
        records = [Outgoing(names.locks, e["resource"], "LockEvent", e) for e in [*stale, *current]]
        await publisher.publish_and_wait(records)
        verdicts = await _verdicts_about(set(old) | set(fresh), consumer)
    finally:
        await publisher.stop()
        await consumer.stop()
    assert [set(v["cycle"]) for v in verdicts] == [set(fresh)]  # the stale cycle got none
    assert detector.stats.skipped - skipped_before == 2


async def never_joins(*args: Any, **kwargs: Any) -> None:
    await asyncio.Event().wait()


async def test_a_detector_stuck_rejoining_its_group_starts_a_new_session_that_still_judges(
    topics: Settings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """faust's Kafka consumer left stuck rejoining its group (aiokafka issue #1154, made as the group watch
    test makes it: a rejoin asked, the join never completing, in faust's consumer thread): the group watch
    ends the session, a new app in a new group starts from the end, and a cycle announced then is judged."""
    names = topics_for(topics)
    run = uuid.uuid4().hex[:8]
    members = [f"after-a-{run}", f"after-b-{run}"]
    found = Detector(topics, data_dir=tmp_path / "stuck-detector")
    found.rejoin_deadline_s = 2.0
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(found.run(stop, ready))
    publisher = Publisher(topics)
    await publisher.start()
    consumer = make_consumer(topics, names.deadlocks, group_id=f"verdicts-{run}")
    await consumer.start()
    try:
        await asyncio.wait_for(ready.wait(), 60)
        first = found.app
        thread = first.consumer._thread  # type: ignore[attr-defined]  # faust's aiokafka driver
        coordinator = thread._consumer._coordinator
        monkeypatch.setattr(coordinator, "ensure_active_group", never_joins)
        thread.thread_loop.call_soon_threadsafe(coordinator.request_rejoin)  # as a failed heartbeat does
        await asyncio.wait_for(found.restarted.wait(), 60)
        assert found.sessions == 1 and found.app is not first and not task.done()
        assert not thread._thread.is_alive()  # the stuck session's consumer thread ended (it used to spin on)
        await asyncio.wait_for(found.assigned.wait(), 60)  # the new session's partitions are positioned
        await publisher.publish_and_wait(records(names.locks, cycle(members, run)))
        verdicts = await _verdicts_about(set(members), consumer)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await publisher.stop()
        await consumer.stop()
    assert [set(v["cycle"]) for v in verdicts] == [set(members)]
