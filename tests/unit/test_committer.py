"""The coordinator's committer without a broker: when it opens the active role's producer, that it never
replaces one in the middle of a transaction, and what a member made a standby does with a late batch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaError

from orchestrator import committer as committer_module
from orchestrator.committer import Committer, active_transactional_id
from polycommit.codec import default_codec
from polycommit.config import load_settings


class FakeProducer:
    fatal = False  # the sender failed outright: EndTxn fails, and so does the abort (aiokafka's state machine)

    def __init__(self, name: str, events: list[str], gate: asyncio.Event) -> None:
        self.name, self.events, self.gate = name, events, gate

    async def begin_transaction(self) -> None:
        self.events.append(f"{self.name} begin")

    async def commit_transaction(self) -> None:
        FakePublisher.in_commit.set()
        await self.gate.wait()  # the broker's answer, when the test lets it come
        if self.fatal:
            raise KafkaError("Unexpected error during batch delivery")
        self.events.append(f"{self.name} commit")

    async def abort_transaction(self) -> None:
        if self.fatal:
            raise AssertionError("Invalid state transition TransactionState.FATAL_ERROR -> ABORTING_TRANSACTION")
        self.events.append(f"{self.name} abort")


class FakePublisher:
    """Stands for polycommit.bus.Publisher: records when each one starts (InitProducerId) and stops."""

    opened: list[str] = []
    events: list[str] = []
    gate = asyncio.Event()
    in_commit = asyncio.Event()

    def __init__(self, settings: Any, *, transactional_id: str, codec: Any, client_id: str) -> None:
        self.name = f"p{len(FakePublisher.opened) + 1}"
        FakePublisher.opened.append(transactional_id)
        self.producer = FakeProducer(self.name, FakePublisher.events, FakePublisher.gate)

    async def start(self) -> None:
        self.events.append(f"{self.name} start")

    async def stop(self) -> None:
        self.events.append(f"{self.name} stop")

    async def publish(self, out: Any) -> list[Any]:
        self.events.append(f"{self.name} publish")
        return []


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakePublisher]:
    FakePublisher.opened, FakePublisher.events = [], []
    FakePublisher.gate, FakePublisher.in_commit = asyncio.Event(), asyncio.Event()
    FakeProducer.fatal = False
    monkeypatch.setattr(committer_module, "Publisher", FakePublisher)
    return FakePublisher


def active_standby() -> Committer:
    settings = load_settings()
    return Committer(settings, default_codec(), active_transactional_id("px"), per_session=False)


async def test_a_standby_opens_no_producer_and_the_active_one_opens_the_roles_anew_at_each_assignment(
    fake: type[FakePublisher],
) -> None:
    c = active_standby()
    await c.session_started()
    await c.assigned(set())
    assert fake.opened == []  # opening the role's id would fence the active member
    await c.assigned({0, 1})
    await c.assigned({0, 1})  # active again after a rebalance: a new epoch, the old producer stopped first
    assert fake.opened == ["px-coordinator-active"] * 2
    assert fake.events == ["p1 start", "p1 stop", "p2 start"]
    await c.assigned(set())
    assert fake.events[-1] == "p2 stop" and c.publisher is None


async def test_a_producer_is_replaced_only_after_the_transaction_in_progress_ends(fake: type[FakePublisher]) -> None:
    c = active_standby()
    await c.assigned({0})
    committing = asyncio.create_task(c.commit([], decided=False))
    await fake.in_commit.wait()  # inside its transaction, waiting for the broker's answer
    reassigned = asyncio.create_task(c.assigned({0}))
    done, _ = await asyncio.wait({reassigned}, timeout=0.2)
    assert not done and "p1 stop" not in fake.events  # it waits for the transaction to end
    fake.gate.set()
    await asyncio.gather(committing, reassigned)
    assert fake.events == ["p1 start", "p1 begin", "p1 publish", "p1 commit", "p1 stop", "p2 start"]


async def test_a_batch_folded_before_the_member_stood_by_is_dropped_not_committed(fake: type[FakePublisher]) -> None:
    c = active_standby()
    await c.assigned({0})
    await c.assigned(set())
    await c.commit([], decided=False)
    assert fake.events == ["p1 start", "p1 stop"]  # no transaction begun: the inputs are read again elsewhere


async def test_partitioned_members_open_their_own_id_with_the_session(fake: type[FakePublisher]) -> None:
    c = Committer(load_settings(), default_codec(), "px-coordinator-3", per_session=True)
    await c.session_started()
    await c.assigned({0})
    await c.assigned(set())
    assert fake.opened == ["px-coordinator-3"] and fake.events == ["p1 start"]


async def test_a_producer_that_cannot_abort_raises_the_kafka_failure_so_the_session_starts_over(
    fake: type[FakePublisher],
) -> None:
    c = Committer(load_settings(), default_codec(), "px-coordinator-3", per_session=True)
    await c.session_started()
    FakeProducer.fatal = True
    fake.gate.set()
    with pytest.raises(KafkaError):  # what the coordinator's session answers with a new session, not an exit
        await c.commit([], decided=False)
