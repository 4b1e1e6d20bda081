"""Interactive transactions in the SDK: locks taken on demand inside the block, and a retry of the whole
block when the transaction is chosen as a deadlock victim.

    async with coordinator.transaction(name="transfer", interactive=True, priority=1) as tx:
        await tx.lock([key_a, key_b], "SHARED")          # any lock keys, in either mode
        await tx.postgres.upsert("accounts", key={"id": 1}, values={...})   # EXCLUSIVE on its keys first

    result = await coordinator.run(transfer, retries=5)   # transfer(tx) runs again on a deadlock

Each `tx.lock` (and each write, for the keys it writes) is a LockRequest on the intents topic keyed by the
transaction's id, answered on this client's reply partition by a LockReply: the call returns once every
key is held, or raises the typed error that ended the transaction (DeadlockVictimError, LockTimeoutError,
TransactionAbortedError), which `run` retries. Leaving the block publishes the intent, which then runs under
the locks held; an exception in the block releases them, and nothing runs. Requests go one at a time, so
one transaction never waits twice at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from polycommit import errors
from polycommit import operations as ops
from polycommit.codec import EventCodec
from polycommit.events import Consistency, Isolation, LockReply, LockRequest, NodeRef, Operation, Point, now_ms
from polycommit.reads import Versioned
from polycommit.results import TransactionResult

if TYPE_CHECKING:
    from polycommit.client import Coordinator, Transaction

LockMode = Literal["SHARED", "EXCLUSIVE"]
# Errors that end a transaction but not the business action: running the block again may succeed.
RETRIED: tuple[type[errors.PolycommitError], ...] = (
    errors.DeadlockVictimError,
    errors.LockTimeoutError,
    errors.TransactionAbortedError,
)
_BY_NAME: dict[str, type[errors.PolycommitError]] = {e.__name__: e for e in (*RETRIED, errors.UnsupportedError)}
READ_LOCKING_LEVELS = frozenset({"REPEATABLE_READ", "SERIALIZABLE"})


class ScopeOptions(TypedDict, total=False):
    """The options of `coordinator.transaction(...)` besides `interactive`."""

    name: str
    consistency: Consistency
    isolation: Isolation
    priority: int
    raise_on_failure: bool
    locks: bool
    lock_wait: float


class LockCalls:
    """The `tx.lock` calls of one client awaiting their LockReply, by (tx id, request number)."""

    def __init__(self, codec: EventCodec) -> None:
        self.codec = codec
        self.waiting: dict[tuple[str, int], asyncio.Future[LockReply]] = {}

    async def call(self, send: Awaitable[None], request: LockRequest, timeout: float) -> LockReply | None:
        key = (request["tx_id"], request["request"])
        future: asyncio.Future[LockReply] = asyncio.get_running_loop().create_future()
        if not request["release"]:
            self.waiting[key] = future
        try:
            await send
            return None if request["release"] else await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.TransactionTimeoutError(f"no answer to lock request {key} within {timeout}s") from None
        finally:
            self.waiting.pop(key, None)

    def route(self, record: Any) -> bool:
        """True when `record` (on the client's reply partition) is a LockReply: given to its call, if any."""
        try:
            decoded = self.codec.decode(record.value)
        except errors.CodecError:
            return False  # not for a lock call: the result path reports it
        if decoded.event_type != "LockReply":
            return False
        future = self.waiting.pop((decoded.record["tx_id"], decoded.record["request"]), None)
        if future is not None and not future.done():
            future.set_result(decoded.record)  # type: ignore[arg-type]
        return True


def refused(answer: LockReply) -> errors.PolycommitError:
    """The typed error a REFUSED LockReply names (TransactionError for a class this SDK does not know)."""
    error = answer["error"]
    if error is None:
        return errors.TransactionError(f"lock request {answer['request']} of {answer['tx_id']} was refused")
    return _BY_NAME.get(error["error_class"], errors.TransactionError)(f"{answer['tx_id']}: {error['message']}")


# -- the lock keys of what a read touches, for `tx.lock_for_read` (the same keys the writes lock) ------


def row_key(table: str, key: Mapping[str, Any]) -> str:
    return ops.lock_keys(ops.delete_row(table, key))[0]


def point_key(collection: str, point_id: str | int) -> str:
    return ops.lock_keys(ops.delete_points(collection, [point_id]))[0]


def node_key(label: str, key: Mapping[str, Any]) -> str:
    return ops.lock_keys(ops.delete_node(label, key))[0]


def refuse_interactive(tx: Transaction) -> None:
    """What an interactive transaction cannot be: without locks (there would be nothing to take). EVENTUAL
    runs its intent as a saga, STRONG as a two-phase commit, both under the locks taken before it."""
    if not tx.locks:
        raise errors.UnsupportedError("an interactive transaction takes locks: locks=False is refused")


def _covers(held: str | None, wanted: str) -> bool:
    return held == "EXCLUSIVE" or (held == "SHARED" and wanted == "SHARED")


class InteractiveScope:
    """The `tx` of `async with coordinator.transaction(interactive=True) as tx`."""

    def __init__(self, coordinator: Coordinator, transaction: Transaction, raise_on_failure: bool) -> None:
        self.coordinator = coordinator
        self.transaction = transaction
        self.raise_on_failure = raise_on_failure
        self.postgres = _Postgres(self)
        self.qdrant = _Qdrant(self)
        self.neo4j = _Neo4j(self)
        self.held: dict[str, LockMode] = {}  # key -> the mode the coordinator granted
        # Keys a read locks EXCLUSIVE rather than SHARED: the ones an earlier attempt of the same block
        # wrote (`run` sets them). Two readers of a key that both go on to write it deadlock on the
        # upgrade; asking the write lock at the read, as SELECT ... FOR UPDATE does, makes the second one
        # wait instead, so a retried victim does not meet the same deadlock again.
        self.exclusive_reads: set[str] = set()
        self.asked_exclusive: set[str] = set()  # every key this attempt asked EXCLUSIVE (granted or not)
        self.requests = 0
        self.lock_waits_s: list[float] = []  # how long each request that went out took to be granted
        self.result: TransactionResult | None = None
        self._one_at_a_time = asyncio.Lock()
        self._ended = False  # the coordinator ended it (a refusal): nothing to release

    @property
    def tx_id(self) -> str:
        return self.transaction.tx_id

    async def lock(self, keys: Iterable[str], mode: LockMode = "EXCLUSIVE") -> None:
        """Hold `keys` in `mode` (EXCLUSIVE also gives SHARED; SHARED held, EXCLUSIVE asked is an upgrade)."""
        async with self._one_at_a_time:
            wanted = sorted({k for k in keys if not _covers(self.held.get(k), mode)})
            if mode == "EXCLUSIVE":
                self.asked_exclusive.update(wanted)
            if wanted:
                await self._ask(wanted, mode)
                self.held.update({k: mode for k in wanted if not _covers(self.held.get(k), mode)})

    async def _ask(self, keys: list[str], mode: LockMode) -> None:
        self.requests += 1
        started = asyncio.get_running_loop().time()
        answer = await self.coordinator.request_locks(self._request(keys, mode))
        if answer is None or answer["status"] != "GRANTED":
            self._ended = True
            raise refused(answer) if answer is not None else errors.TransactionError("no lock reply")
        self.lock_waits_s.append(asyncio.get_running_loop().time() - started)

    async def _confirm_open(self) -> None:
        """At REPEATABLE_READ and SERIALIZABLE the read locks must still be held when the intent runs: an
        empty request, just before it, raises if the coordinator ended the transaction meanwhile (idle), and
        restarts its idle timeout. (Below those levels no read lock is at stake: a write key lost with an
        idle transaction is asked again by the intent itself.)"""
        if self.requests and self.transaction.isolation in READ_LOCKING_LEVELS:
            async with self._one_at_a_time:
                await self._ask([], "SHARED")

    async def lock_for_read(self, keys: Iterable[str], *, for_update: bool = False) -> None:
        """The read locks of the isolation level: SHARED at REPEATABLE_READ and SERIALIZABLE, none below
        (READ_COMMITTED holds write locks only). The SDK's reads call this before they read a store.
        `for_update`, at any level: EXCLUSIVE at once, as SELECT ... FOR UPDATE (a read of what the block
        will write: a second reader waits for this transaction to end instead of both deadlocking later,
        on the upgrade)."""
        if for_update:
            await self.lock(keys, "EXCLUSIVE")
        elif self.transaction.isolation in READ_LOCKING_LEVELS:
            keys = list(keys)
            written = [k for k in keys if k in self.exclusive_reads]
            if written:
                await self.lock(written, "EXCLUSIVE")
            await self.lock([k for k in keys if k not in self.exclusive_reads], "SHARED")

    async def add(self, operation: Operation, *, compensate: Operation | None = None, **step: Any) -> None:
        """Lock what the step writes (EXCLUSIVE), then add it to the transaction's intent."""
        keys = ops.lock_keys(operation) + (ops.lock_keys(compensate) if compensate is not None else [])
        await self.lock(keys, "EXCLUSIVE")
        self.transaction.add(operation, compensate=compensate, **step)

    def _request(self, keys: list[str], mode: LockMode, release: bool = False) -> LockRequest:
        tx = self.transaction
        return {
            "tx_id": tx.tx_id,
            "request": self.requests,
            "keys": keys,
            "mode": mode,
            "release": release,
            "name": tx.name,
            "isolation": tx.isolation,
            "priority": tx.priority,
            "reply_to": self.coordinator.reply_to,
            "client_id": self.coordinator.client_id,
            "lock_wait_ms": int(tx.lock_wait * 1000),
            "created_at_ms": now_ms(),
        }

    async def release(self) -> None:
        """End the transaction without running anything: its locks go (no reply is awaited)."""
        if self.requests and not self._ended:
            self.requests += 1
            self._ended = True
            await self.coordinator.request_locks(self._request([], "EXCLUSIVE", release=True))

    async def __aenter__(self) -> InteractiveScope:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            await self.release()  # nothing was published: the locks go, nothing ran
            return
        await self._confirm_open()
        self._ended = True
        self.result = await self.coordinator.execute(self.transaction)
        if self.raise_on_failure and not self.result.ok:
            raise errors.TransactionError(f"transaction {self.tx_id} ended {self.result.status}: {self.result.error}")


def retriable(result: TransactionResult) -> bool:
    """The transaction ended for a reason that a new attempt may not meet: a deadlock, a lock wait, or a
    store's transient refusal that outlasted the coordinator's own retries (a PostgreSQL serialization
    failure, say) once everything was undone: aborted, or compensated."""
    if result.ok:
        return False
    if result.error_class in {e.__name__ for e in RETRIED}:
        return True
    error = result.raw.get("error")
    return result.status in ("aborted", "compensated") and bool(error and error.get("retriable"))


async def run(
    coordinator: Coordinator,
    block: Callable[[InteractiveScope], Awaitable[Any]],
    *,
    retries: int = 3,
    backoff: float = 0.05,
    max_backoff: float = 2.0,
    **options: Any,
) -> TransactionResult:
    """Run `block(tx)` in an interactive transaction (options as for `coordinator.transaction`), again with
    a new transaction, up to `retries` more times, when it ends as a deadlock victim, by a lock-wait or
    idle timeout, or undone after a store's transient refusal (`retriable`); waits `backoff` seconds
    doubled per attempt (with jitter, at most `max_backoff`) first. A new attempt reads the keys earlier
    attempts wrote under EXCLUSIVE locks (`exclusive_reads`)."""
    attempt, written = 0, set[str]()
    while True:
        scope = coordinator.transaction(interactive=True, **options)
        scope.exclusive_reads = set(written)
        try:
            async with scope as tx:
                await block(tx)
            assert scope.result is not None
            if attempt >= retries or not retriable(scope.result):
                return scope.result
        except RETRIED:
            if attempt >= retries:
                raise
        finally:
            written |= scope.asked_exclusive
        attempt += 1
        await asyncio.sleep(min(max_backoff, backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


# -- the write builders, awaitable: each locks its operation's keys before adding its step --------------


# Reads go straight to the store (polycommit.reads), after the read lock of the isolation level: SHARED at
# REPEATABLE_READ and SERIALIZABLE, held to the end, so what was read cannot change before the commit.


class _Postgres:
    def __init__(self, scope: InteractiveScope) -> None:
        self._scope = scope

    async def get(self, table: str, key: Mapping[str, Any], *, for_update: bool = False) -> Versioned:
        await self._scope.lock_for_read([row_key(table, key)], for_update=for_update)
        return await self._scope.coordinator.reads.read_row(table, key)

    async def upsert(
        self,
        table: str,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.upsert_row(table, key, values, expected_version=expected_version), **step)

    async def delete(
        self, table: str, key: Mapping[str, Any], *, expected_version: int | None = None, **step: Any
    ) -> None:
        await self._scope.add(ops.delete_row(table, key, expected_version=expected_version), **step)

    async def execute(
        self,
        statement: str,
        *params: Any,
        lock_keys: Iterable[str] = (),
        compensate: Operation | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.sql(statement, params, lock_keys), compensate=compensate, **step)


class _Qdrant:
    def __init__(self, scope: InteractiveScope) -> None:
        self._scope = scope

    async def retrieve(self, collection: str, point_id: str | int, *, for_update: bool = False) -> Versioned:
        await self._scope.lock_for_read([point_key(collection, point_id)], for_update=for_update)
        return await self._scope.coordinator.reads.read_point(collection, point_id)

    async def upsert(self, collection: str, points: Iterable[Point], **step: Any) -> None:
        await self._scope.add(ops.upsert_points(collection, points), **step)

    async def delete(self, collection: str, ids: Iterable[str | int], **step: Any) -> None:
        await self._scope.add(ops.delete_points(collection, ids), **step)


class _Neo4j:
    def __init__(self, scope: InteractiveScope) -> None:
        self._scope = scope

    async def get_node(self, label: str, key: Mapping[str, Any], *, for_update: bool = False) -> Versioned:
        await self._scope.lock_for_read([node_key(label, key)], for_update=for_update)
        return await self._scope.coordinator.reads.read_node(label, key)

    async def merge_node(
        self, label: str, key: Mapping[str, Any], properties: Mapping[str, Any] | None = None, **step: Any
    ) -> None:
        await self._scope.add(ops.merge_node(label, key, properties), **step)

    async def delete_node(self, label: str, key: Mapping[str, Any], **step: Any) -> None:
        await self._scope.add(ops.delete_node(label, key), **step)

    async def merge_relationship(
        self,
        rel_type: str,
        from_node: NodeRef,
        to_node: NodeRef,
        properties: Mapping[str, Any] | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.merge_relationship(rel_type, from_node, to_node, properties), **step)

    async def delete_relationship(self, rel_type: str, from_node: NodeRef, to_node: NodeRef, **step: Any) -> None:
        await self._scope.add(ops.delete_relationship(rel_type, from_node, to_node), **step)

    async def run(
        self,
        statement: str,
        params: Mapping[str, Any] | None = None,
        *,
        lock_keys: Iterable[str] = (),
        compensate: Operation | None = None,
        **step: Any,
    ) -> None:
        await self._scope.add(ops.cypher(statement, params, lock_keys), compensate=compensate, **step)
