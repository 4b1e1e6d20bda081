"""The plan of a chaos run, without servers: whom it kills and when, which sagas it sends, a client's death."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from polycommit.client import Saga
from polycommit.config import Settings, load_settings
from polycommit.tooling.bench import writes
from polycommit.tooling.chaos import _together
from polycommit.tooling.chaos_kills import (
    SERVER_TARGETS,
    TARGETS,
    TargetLost,
    coordinator_parts,
    kill_schedule,
    restart_server,
)
from polycommit.tooling.chaos_workload import FAILING_STEP, ClientSlot, Mix, execute, hot_writes, mixed
from polycommit.tooling.processes import PartProcess, part_command
from polycommit.tooling.services import ServerStartError


def test_the_servers_and_the_client_are_targets_besides_the_processes() -> None:
    assert {"postgres-server", "neo4j-server", "kafka", "client"} <= set(TARGETS)
    assert SERVER_TARGETS == {"kafka": "kafka", "postgres-server": "postgres", "neo4j-server": "neo4j"}


def test_as_many_kills_as_targets_hit_every_target_once_in_the_middle_of_the_run() -> None:
    for seed in range(20):
        schedule = kill_schedule(random.Random(seed), 1000, len(TARGETS), TARGETS)
        assert sorted(t for _, t in schedule) == sorted(TARGETS)
        points = [p for p, _ in schedule]
        assert points == sorted(points)
        assert all(100 <= p < 850 for p in points)


def test_more_kills_than_targets_repeat_no_target_before_each_was_hit() -> None:
    schedule = kill_schedule(random.Random(3), 500, 2 * len(TARGETS) + 1, TARGETS)
    counts = Counter(t for _, t in schedule)
    assert set(counts) == set(TARGETS) and max(counts.values()) - min(counts.values()) <= 1


def test_a_schedule_is_the_same_for_the_same_seed() -> None:
    one = kill_schedule(random.Random(7), 300, 5, ["kafka", "client"])
    assert one == kill_schedule(random.Random(7), 300, 5, ["kafka", "client"])
    assert {t for _, t in one} == {"kafka", "client"}


def test_the_mix_sends_failing_and_short_timeout_sagas_in_their_fractions() -> None:
    items = writes("m", 2000)
    sent = list(mixed(items, Mix(failing=0.2, short_timeout=0.1), random.Random(1), 30.0))
    kinds = Counter(kind for kind, _ in sent)
    assert 300 < kinds["failing"] < 500 and 120 < kinds["short-timeout"] < 280
    for kind, saga in sent:
        last = saga.steps[-1]
        assert (last["operation"] == FAILING_STEP) == (kind == "failing")
        timeouts = {s["timeout_ms"] for s in saga.steps[:3]}
        assert timeouts == ({50} if kind == "short-timeout" else {30_000})
    again = [k for k, _ in mixed(items, Mix(failing=0.2, short_timeout=0.1), random.Random(1), 30.0)]
    assert again == [k for k, _ in sent]


def test_the_mixed_mode_sends_sagas_and_two_phase_commits_on_hot_keys() -> None:
    items = hot_writes("h", 1000, 20, random.Random(3))
    assert len({w.key for w in items}) == 20 and len({w.value for w in items}) == 1000  # shared keys, own values
    sent = list(mixed(items, Mix(failing=0.1, short_timeout=0.1), random.Random(1), 30.0, mode="mixed"))
    strong = [saga for kind, saga in sent if kind.startswith("2pc-")]
    assert 400 < len(strong) < 600
    assert all(saga.consistency == "STRONG" for saga in strong)
    assert all(saga.consistency == "EVENTUAL" for kind, saga in sent if not kind.startswith("2pc-"))
    kinds = Counter(kind for kind, _ in sent)
    assert kinds["2pc-voted-no"] and kinds["2pc-failing"] and kinds["failing"] and kinds["short-timeout"]


class DyingClient:
    """A client whose replies never come: its death (close) cancels what it waits for."""

    timeout = 60.0

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[Any]] = []
        self.submitted = asyncio.Event()

    async def submit(self, saga: Saga) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        self.submitted.set()
        return future

    async def close(self) -> None:
        for future in self.pending:
            future.cancel()


async def test_a_killed_client_leaves_its_transactions_to_the_log_and_the_lane_goes_on() -> None:
    slot = ClientSlot(load_settings(), 60.0)
    dying = DyingClient()
    slot.client = dying  # type: ignore[assignment]
    lane = asyncio.create_task(execute(slot, Saga("s"), []))
    await dying.submitted.wait()
    await dying.close()
    assert await lane is None


async def test_a_cancelled_lane_is_still_cancelled() -> None:
    slot = ClientSlot(load_settings(), 60.0)
    dying = DyingClient()
    slot.client = dying  # type: ignore[assignment]
    lane = asyncio.create_task(execute(slot, Saga("s"), []))
    await dying.submitted.wait()
    lane.cancel()
    try:
        await lane
    except asyncio.CancelledError:
        return
    raise AssertionError("the lane swallowed its own cancellation")


class FlakyStart:
    """A server start that misses its deadline `misses` times, then answers."""

    def __init__(self, misses: int) -> None:
        self.misses = misses
        self.calls = 0

    async def __call__(self, settings: Settings, names: Sequence[str]) -> object:
        self.calls += 1
        if self.calls <= self.misses:
            raise ServerStartError(names[0], "not ready after 90 s")
        return {}


async def test_a_server_slow_to_come_back_is_waited_for_again() -> None:
    start = FlakyStart(misses=2)
    await restart_server(load_settings(), "neo4j", start, attempts=3)
    assert start.calls == 3


async def test_a_server_that_never_comes_back_ends_the_run_with_target_lost() -> None:
    start = FlakyStart(misses=5)
    with pytest.raises(TargetLost, match="neo4j not back after 3 start deadlines"):
        await restart_server(load_settings(), "neo4j", start, attempts=3)


async def test_a_lost_target_cancels_the_workload_at_once() -> None:
    forever = asyncio.Event()
    work = asyncio.create_task(forever.wait())

    async def lose() -> None:
        raise TargetLost("postgres not back")

    with pytest.raises(TargetLost):
        await _together(work, asyncio.create_task(lose()))  # type: ignore[arg-type]
    assert work.cancelled()


def test_extra_coordinator_members_are_parts_of_their_own_instance() -> None:
    assert coordinator_parts(1) == ["coordinator"]
    assert coordinator_parts(3) == ["coordinator", "coordinator#2", "coordinator#3"]
    assert part_command("coordinator")[-2:] == ["run", "coordinator"]
    assert part_command("coordinator#2")[-4:] == ["run", "coordinator", "--instance", "2"]


async def test_a_part_tells_which_coordinator_member_is_active_and_wakes_a_watch_on_its_line() -> None:
    part = PartProcess("coordinator#2", load_settings())
    took_over = part.watch(": active, ")
    part._seen("2026 orchestrator.members coordinator member 2: standing by, owns none of the transaction partitions")
    assert not part.active_member and not took_over.done()
    part._seen("2026 orchestrator.members coordinator member 2: active, owns all 4 of the transaction partitions")
    assert part.active_member and took_over.done() and took_over.result() > 0
    assert part._watches == []  # a watch that fired is dropped


def test_interactive_attempts_are_counted_by_their_result_and_unknown_ones_bound_the_count() -> None:
    from polycommit.tooling.chaos_interactive import Increments

    class Scope:
        def __init__(self, tx_id: str, status: str | None) -> None:
            self.tx_id = tx_id
            self.transaction = Saga("increment", tx_id=tx_id)
            self.result = None if status is None else type("Result", (), {"tx_id": tx_id, "status": status})()

    increments = Increments()
    first: list[Any] = [Scope("a", "aborted"), Scope("b", "completed")]  # a victim run again, then committed
    second: list[Any] = [Scope("c", None)]  # the client was killed: read from the log later, or unknown
    increments.add(first)
    increments.add(second)
    assert increments.count("completed") == 1 and increments.count(None) == 1
    assert increments.statuses() == {"aborted": 1, "completed": 1, "unknown": 1}
    increments.history.record("c", "COMPLETED")  # found on the results topic (as the log spells it)
    assert increments.statuses() == {"aborted": 1, "completed": 2}
    assert increments.applied() == 2
    strong = Increments()  # --consistency STRONG: a two-phase commit that committed applied its increment
    both: list[Any] = [Scope("d", "committed"), Scope("e", "aborted")]
    strong.add(both)
    assert strong.applied() == 1 and strong.count("completed") == 0
    never = Increments()  # killed before it sent anything: set aside, it applied nothing
    lost: list[Any] = [Scope("f", None), Scope("g", None), Scope("h", "completed")]
    never.add(lost)
    never.unsent({"f", "h"})  # "h" has a result: it reached the coordinator, and is kept
    assert set(never.history.intents) == {"g", "h"} and never.dropped == 1 and never.count(None) == 1
