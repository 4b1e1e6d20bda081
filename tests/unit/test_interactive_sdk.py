"""The SDK side of interactive transactions, without Kafka: what each lock call sends, what it skips, the
typed errors of a refusal, the release on an exception, read locks by isolation level, the routing of
LockReply records, and `run` retrying a deadlock victim with a new transaction. The tests lock as they go
(lock_at="access") unless their name says "at the commit" (the default, polycommit.interactive)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from polycommit import errors
from polycommit import operations as ops
from polycommit.client import Coordinator, Transaction
from polycommit.codec import default_codec
from polycommit.config import load_settings
from polycommit.events import LockReply, LockRequest, error_info
from polycommit.interactive import (
    InteractiveScope,
    node_key,
    point_key,
    refuse_interactive,
    retriable,
    row_key,
    run,
)
from polycommit.lock_calls import LockCalls
from polycommit.reads import Versioned
from polycommit.results import TransactionResult
from polycommit.tooling.processes import part_command

ROW = ops.lock_keys(ops.upsert_row("t", {"id": 1}, {"v": 1}))[0]


def answer(request: LockRequest, error_class: str | None = None) -> LockReply:
    tx_id, n = request["tx_id"], request["request"]
    if error_class is None:
        return {"tx_id": tx_id, "request": n, "status": "GRANTED", "error": None, "at_ms": 0}
    error = error_info(error_class, "boom", True)
    return {"tx_id": tx_id, "request": n, "status": "REFUSED", "error": error, "at_ms": 0}


class FakeCoordinator:
    """Answers lock requests as told (GRANTED unless `refuse` names an error class for a request number)."""

    reply_to, client_id = "polycommit.replies:0", "fake"

    def __init__(self, refuse: dict[int, str] | None = None) -> None:
        self.sent: list[LockRequest] = []
        self.intents: list[Transaction] = []
        self.refuse = refuse or {}

    async def request_locks(self, request: LockRequest) -> LockReply | None:
        self.sent.append(request)
        return None if request["release"] else answer(request, self.refuse.get(request["request"]))

    async def execute(self, transaction: Transaction) -> TransactionResult:
        self.intents.append(transaction)
        event: dict[str, Any] = {"tx_id": transaction.tx_id, "status": "COMPLETED", "steps": [], "error": None}
        return TransactionResult.from_event({**event, "started_at_ms": 0, "finished_at_ms": 1})

    def transaction(self, **options: Any) -> InteractiveScope:
        options.pop("interactive")
        lock_at = options.pop("lock_at", "access")
        return InteractiveScope(self, Transaction(**options), False, lock_at)  # type: ignore[arg-type]


def scope(fake: FakeCoordinator, lock_at: Any = "access", **options: Any) -> InteractiveScope:
    return InteractiveScope(fake, Transaction(**options), False, lock_at)  # type: ignore[arg-type]


async def test_a_write_locks_its_keys_once_then_buffers_its_step_and_the_exit_publishes_the_intent() -> None:
    fake = FakeCoordinator()
    async with scope(fake, priority=2) as tx:
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})
        await tx.postgres.upsert("t", {"id": 1}, {"v": 2})  # held already: no second request
        await tx.lock([ROW], "SHARED")  # EXCLUSIVE covers SHARED
    assert [(r["request"], r["keys"], r["mode"], r["priority"]) for r in fake.sent] == [(1, [ROW], "EXCLUSIVE", 2)]
    assert len(fake.intents) == 1 and len(fake.intents[0].steps) == 2 and tx.result is not None


async def test_a_shared_lock_then_a_write_asks_an_upgrade() -> None:
    fake = FakeCoordinator()
    async with scope(fake) as tx:
        await tx.lock([ROW], "SHARED")
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})
    assert [(r["request"], r["mode"]) for r in fake.sent] == [(1, "SHARED"), (2, "EXCLUSIVE")]


async def test_a_refusal_raises_its_typed_error_and_nothing_is_published_or_released() -> None:
    fake = FakeCoordinator(refuse={2: "DeadlockVictimError"})
    with pytest.raises(errors.DeadlockVictimError):
        async with scope(fake) as tx:
            await tx.lock(["a"])
            await tx.lock(["b"])
    assert not fake.intents and [r["release"] for r in fake.sent] == [False, False]  # the coordinator ended it


async def test_an_exception_in_the_block_releases_the_locks_and_publishes_no_intent() -> None:
    fake = FakeCoordinator()
    with pytest.raises(ValueError):
        async with scope(fake) as tx:
            await tx.lock(["a"])
            raise ValueError("business rule")
    assert not fake.intents and fake.sent[-1]["release"] is True and fake.sent[-1]["request"] == 2


@pytest.mark.parametrize(("isolation", "locks"), [("READ_COMMITTED", 0), ("REPEATABLE_READ", 1), ("SERIALIZABLE", 1)])
async def test_read_locks_follow_the_isolation_level(isolation: Any, locks: int) -> None:
    fake = FakeCoordinator()
    tx = scope(fake, isolation=isolation)
    await tx.lock_for_read([ROW])
    assert [r["mode"] for r in fake.sent] == ["SHARED"] * locks


@pytest.mark.parametrize("isolation", ["READ_UNCOMMITTED", "READ_COMMITTED", "SERIALIZABLE"])
async def test_a_read_for_update_locks_exclusive_at_any_level_and_the_write_after_it_asks_nothing(
    isolation: Any,
) -> None:
    fake = FakeCoordinator()
    tx = scope(fake, isolation=isolation)
    await tx.lock_for_read([ROW], for_update=True)
    await tx.postgres.upsert("t", {"id": 1}, {"v": 2})  # the same row's key: held EXCLUSIVE already
    assert [(r["mode"], r["keys"]) for r in fake.sent] == [("EXCLUSIVE", [ROW])]


def test_unlocked_interactive_transactions_are_refused_and_strong_ones_are_not() -> None:
    with pytest.raises(errors.UnsupportedError, match="locks=False"):
        refuse_interactive(Transaction(locks=False))
    refuse_interactive(Transaction(consistency="STRONG"))  # run as a two-phase commit under its locks


async def test_run_retries_a_victim_in_a_new_transaction_and_gives_up_after_its_retries() -> None:
    fake = FakeCoordinator(refuse={1: "DeadlockVictimError"})
    calls: list[str] = []

    async def block(tx: InteractiveScope) -> None:
        calls.append(tx.tx_id)
        if len(calls) > 1:
            fake.refuse = {}
        await tx.lock(["a"])

    result = await run(fake, block, retries=2, backoff=0.0)  # type: ignore[arg-type]
    assert result.ok and len(calls) == 2 and calls[0] != calls[1]
    fake.refuse = {1: "DeadlockVictimError"}
    with pytest.raises(errors.DeadlockVictimError):
        await run(fake, lambda tx: tx.lock(["a"]), retries=1, backoff=0.0)  # type: ignore[arg-type]


async def test_a_retried_victim_reads_what_its_last_attempt_wrote_under_an_exclusive_lock() -> None:
    """The upgrade deadlock (two readers of a key both writing it) is not met again by the retry: its read of
    the key it wrote asks EXCLUSIVE at once; a key it only read is still read SHARED."""
    fake = FakeCoordinator(refuse={3: "DeadlockVictimError"})  # the first attempt's upgrade loses
    other = "pg:t:other"
    attempts: list[str] = []

    async def block(tx: InteractiveScope) -> None:
        attempts.append(tx.tx_id)
        if len(attempts) > 1:
            fake.refuse = {}
        await tx.lock_for_read([other])  # what tx.postgres.get does before it reads
        await tx.lock_for_read([ROW])
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})

    result = await run(fake, block, retries=1, backoff=0.0, isolation="SERIALIZABLE")  # type: ignore[arg-type]
    assert result.ok and len(attempts) == 2
    asked = {tx: [(r["keys"], r["mode"]) for r in fake.sent if r["tx_id"] == tx and r["keys"]] for tx in attempts}
    assert asked[attempts[0]] == [([other], "SHARED"), ([ROW], "SHARED"), ([ROW], "EXCLUSIVE")]
    assert asked[attempts[1]] == [([other], "SHARED"), ([ROW], "EXCLUSIVE")]  # no upgrade left to deadlock on


async def test_lock_replies_reach_their_call_and_other_records_pass_through() -> None:
    codec = default_codec()
    calls = LockCalls(codec)
    request: LockRequest = {
        "tx_id": "T1",
        "request": 1,
        "keys": ["a"],
        "mode": "EXCLUSIVE",
        "shared_keys": [],
        "release": False,
        "name": "",
        "isolation": "READ_COMMITTED",
        "priority": 0,
        "reply_to": "",
        "client_id": "",
        "lock_wait_ms": 0,
        "created_at_ms": 0,
    }

    class Record:
        def __init__(self, value: bytes) -> None:
            self.value = value

    sent = asyncio.Event()

    async def send() -> None:
        sent.set()  # the call is registered before its request goes out

    waiting = asyncio.create_task(calls.call(send(), request, 5))
    await sent.wait()
    result = codec.encode(
        "TransactionResult",
        {"tx_id": "T1", "status": "COMPLETED", "steps": [], "error": None, "started_at_ms": 0, "finished_at_ms": 0},
    )
    assert calls.route(Record(result)) is False and calls.route(Record(b"garbage")) is False
    assert calls.route(Record(codec.encode("LockReply", answer(request)))) is True
    granted = await waiting
    assert granted is not None and granted["status"] == "GRANTED" and not calls.waiting


async def test_run_retries_a_block_whose_read_could_not_reach_its_store_releasing_what_it_locked() -> None:
    fake = FakeCoordinator()
    calls: list[str] = []

    async def block(tx: InteractiveScope) -> None:
        calls.append(tx.tx_id)
        await tx.lock(["a"])
        if len(calls) == 1:  # the store restarting: nothing of this attempt ran
            raise errors.StoreUnavailableError("postgres could not be read: ConnectionRefusedError")

    result = await run(fake, block, retries=1, backoff=0.0)  # type: ignore[arg-type]
    assert result.ok and len(calls) == 2 and len(fake.intents) == 1
    assert any(r["release"] and r["tx_id"] == calls[0] for r in fake.sent)  # the first attempt's lock let go


def test_a_read_failure_is_typed_unavailable_unless_the_store_refused_the_read_itself() -> None:
    import asyncpg
    from neo4j.exceptions import ClientError, ServiceUnavailable

    from polycommit.reads import _reading

    unavailable = [
        ConnectionRefusedError(111, "Connection refused"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
        ServiceUnavailable("Unable to retrieve routing information"),
    ]
    for failure in unavailable:
        with pytest.raises(errors.StoreUnavailableError), _reading("postgres"):
            raise failure
    for refusal in [asyncpg.exceptions.UndefinedTableError('relation "nope" does not exist'), ClientError("bad")]:
        with pytest.raises(errors.StoreError) as raised, _reading("neo4j"):
            raise refusal
        assert not raised.value.retriable
    with pytest.raises(errors.VersionConflict), _reading("qdrant"):  # polycommit's own errors pass as they are
        raise errors.VersionConflict("k", 1, 2)


async def test_closing_the_client_ends_its_lock_calls_at_once_not_at_their_timeout() -> None:
    """A client closed (or replaced, as chaos kills one) while a `tx.lock` call waits for its reply: nothing
    can answer it any more, so the call ends now, as a pending result does."""
    client = Coordinator(load_settings())  # never started: its lock calls are what is tested
    sent = asyncio.Event()

    async def send() -> None:
        sent.set()

    request: Any = {"tx_id": "T1", "request": 1, "release": False}
    waiting = asyncio.create_task(client.lock_calls.call(send(), request, 3600))
    await sent.wait()
    await client.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 10)  # a bound, far below the call's timeout: TimeoutError without the fix


async def test_the_client_builds_interactive_scopes_and_refuses_an_unlocked_one() -> None:
    client = Coordinator(load_settings())  # never started: building a scope needs no Kafka
    try:
        assert isinstance(client.transaction(interactive=True, priority=3), InteractiveScope)
        strong = client.transaction(interactive=True, consistency="STRONG")
        assert strong.transaction.consistency == "STRONG"
        with pytest.raises(errors.UnsupportedError):
            client.transaction(interactive=True, locks=False)
    finally:
        await client.close()


async def test_at_a_strict_level_the_exit_confirms_the_transaction_is_still_open_before_its_intent() -> None:
    fake = FakeCoordinator()
    async with scope(fake, isolation="SERIALIZABLE") as tx:
        await tx.lock_for_read([ROW])
        await tx.neo4j.merge_node("N", {"id": 1})
    assert [(r["request"], r["keys"]) for r in fake.sent][-1] == (3, []) and len(fake.intents) == 1
    gone = FakeCoordinator(refuse={2: "TransactionAbortedError"})  # idle too long: the coordinator ended it
    with pytest.raises(errors.TransactionAbortedError):
        async with scope(gone, isolation="REPEATABLE_READ") as tx:
            await tx.lock_for_read([ROW])
    assert not gone.intents


def test_a_result_ended_by_a_deadlock_a_lock_wait_or_an_undone_transient_refusal_is_worth_another_attempt() -> None:
    def ended(status: str, error_class: str | None, transient: bool = False) -> TransactionResult:
        error = None if error_class is None else error_info(error_class, "x", transient)
        event: dict[str, Any] = {
            "tx_id": "T",
            "status": status,
            "steps": [],
            "error": error,
            "started_at_ms": 0,
            "finished_at_ms": 0,
        }
        return TransactionResult.from_event(event)

    assert retriable(ended("ABORTED", "DeadlockVictimError")) and retriable(ended("FAILED", "LockTimeoutError"))
    assert not retriable(ended("FAILED", "UnsupportedError")) and not retriable(ended("COMPLETED", None))
    # A serialization failure PostgreSQL kept answering: undone everywhere, so the action may run again.
    assert retriable(ended("ABORTED", "StoreError", transient=True))
    assert retriable(ended("COMPENSATED", "StoreError", transient=True))
    assert not retriable(ended("ABORTED", "StoreError"))  # a permanent refusal (bad SQL) would only repeat
    assert not retriable(ended("STUCK", "StoreError", transient=True))  # not undone: an operator's case


def test_a_read_locks_the_key_a_write_of_the_same_row_point_or_node_locks() -> None:
    assert row_key("t", {"id": 1}) == ops.lock_keys(ops.upsert_row("t", {"id": 1}, {"v": 2}))[0]
    assert point_key("c", 7) == ops.lock_keys(ops.upsert_points("c", [ops.point(7, [0.1], {})]))[0]
    assert node_key("N", {"id": 1}) == ops.lock_keys(ops.merge_node("N", {"id": 1}, {"v": 2}))[0]


def test_the_process_cluster_can_run_the_detector_as_a_part() -> None:
    assert part_command("detector")[-2:] == ["run", "detector"]


class Store:
    """What a read finds for each key, changed by the test between the read and the commit."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.reads: list[str] = []

    def reader(self, key: str) -> Any:
        async def read() -> Versioned:
            self.reads.append(key)
            return Versioned({"v": self.values.get(key, 0)}, self.values.get(key, 0))

        return read


async def test_at_the_commit_writes_alone_ask_no_lock_before_the_intent_which_locks_them_itself() -> None:
    fake = FakeCoordinator()
    async with scope(fake, "commit", isolation="SERIALIZABLE") as tx:
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})
        await tx.neo4j.merge_node("N", {"id": 1})
    assert fake.sent == [] and len(fake.intents) == 1 and tx.write_keys == {ROW, node_key("N", {"id": 1})}


async def test_at_the_commit_one_request_locks_writes_and_reads_then_the_reads_are_checked_unchanged() -> None:
    fake, store, other = FakeCoordinator(), Store(), "postgres:t:other"
    async with scope(fake, "commit", isolation="SERIALIZABLE") as tx:
        assert (await tx.read(ROW, store.reader(ROW), False)).value == {"v": 0}
        await tx.read(other, store.reader(other), False)
        assert fake.sent == []  # reading took no lock
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})
    assert [(r["request"], r["keys"], r["mode"], r["shared_keys"]) for r in fake.sent] == [
        (1, [ROW], "EXCLUSIVE", [other])
    ]
    assert store.reads == [ROW, other, ROW, other] and len(fake.intents) == 1  # read again, under the locks


async def test_at_the_commit_a_read_changed_meanwhile_raises_a_stale_read_releases_and_runs_nothing() -> None:
    fake, store = FakeCoordinator(), Store()
    tx = scope(fake, "commit", isolation="REPEATABLE_READ")
    with pytest.raises(errors.StaleReadError, match="changed since read"):
        async with tx:
            await tx.read(ROW, store.reader(ROW), False)
            store.values[ROW] = 1  # another transaction committed a write of it
            await tx.postgres.upsert("t", {"id": 1}, {"v": 1})
    assert not fake.intents and tx.failed == "StaleReadError"
    assert [(r["request"], r["release"]) for r in fake.sent] == [(1, False), (2, True)]


async def test_at_the_commit_reads_below_repeatable_read_are_neither_locked_nor_checked() -> None:
    fake, store = FakeCoordinator(), Store()
    async with scope(fake, "commit", isolation="READ_COMMITTED") as tx:
        await tx.read(ROW, store.reader(ROW), False)
        store.values[ROW] = 1
    assert fake.sent == [] and store.reads == [ROW] and len(fake.intents) == 1


async def test_at_the_commit_a_stale_read_runs_the_block_again_in_the_same_transaction_under_its_locks() -> None:
    fake, store, other = FakeCoordinator(), Store(), "postgres:t:other"
    attempts: list[InteractiveScope] = []

    async def block(tx: InteractiveScope) -> None:
        attempts.append(tx)
        await tx.read(ROW, store.reader(ROW), False)
        await tx.read(other, store.reader(other), False)
        if len(attempts) == 1:
            store.values[other] = 5  # lost the race once
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})

    result = await run(fake, block, retries=1, backoff=60.0, lock_at="commit", isolation="SERIALIZABLE")  # type: ignore[arg-type]
    assert result.ok and len(attempts) == 2 and attempts[0] is attempts[1] and attempts[0].reruns == 1
    asked = [(r["tx_id"], r["keys"], r["mode"], r["shared_keys"]) for r in fake.sent]
    tx_id = attempts[0].tx_id
    assert asked == [(tx_id, [ROW], "EXCLUSIVE", [other]), (tx_id, [], "SHARED", [])]  # the rerun confirms it is open
    assert store.reads == [ROW, other, ROW, other, ROW, other]  # read, checked, read again (held: not checked)
    assert len(fake.intents) == 1 and len(fake.intents[0].steps) == 1  # the first run's step is gone


async def test_at_the_commit_a_new_transaction_after_a_victim_asks_the_last_ones_locks_as_it_starts() -> None:
    fake, store, other = FakeCoordinator(refuse={2: "DeadlockVictimError"}), Store(), "postgres:t:other"
    attempts: list[InteractiveScope] = []

    async def block(tx: InteractiveScope) -> None:
        attempts.append(tx)
        if len(attempts) == 1:
            await tx.lock(["pg:t:first"], "EXCLUSIVE")  # request 1, granted
        else:
            fake.refuse = {}
        await tx.read(other, store.reader(other), False)
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})  # the first attempt's commit: request 2, a victim

    result = await run(fake, block, retries=1, backoff=0.0, lock_at="commit", isolation="SERIALIZABLE")  # type: ignore[arg-type]
    assert result.ok and len(attempts) == 2 and attempts[0].failed == "DeadlockVictimError"
    second = [(r["keys"], r["mode"], r["shared_keys"]) for r in fake.sent if r["tx_id"] == attempts[1].tx_id]
    assert second[0] == (["pg:t:first", ROW], "EXCLUSIVE", [other])  # everything the first one needed, at once
    assert attempts[1].read_set == {}  # what it read it held: nothing to check


async def test_at_the_commit_an_open_transaction_locks_its_writes_before_the_intent_as_strong_ones_need() -> None:
    fake = FakeCoordinator()
    async with scope(fake, "commit", consistency="STRONG") as tx:
        await tx.lock(["pg:t:other"], "SHARED")  # open at the coordinator from here on
        await tx.postgres.upsert("t", {"id": 1}, {"v": 1})
    assert [(r["request"], r["keys"], r["mode"]) for r in fake.sent] == [
        (1, ["pg:t:other"], "SHARED"),
        (2, [ROW], "EXCLUSIVE"),
    ]
    assert len(fake.intents) == 1 and tx.held == {"pg:t:other": "SHARED", ROW: "EXCLUSIVE"}
