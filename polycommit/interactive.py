"""Interactive transactions in the SDK: reads and writes made over time inside the block, their locks taken
at the commit (the default) or as they are made, and a retry of the whole block when it loses a race.

    async with coordinator.transaction(name="transfer", interactive=True, isolation="SERIALIZABLE") as tx:
        a = await tx.postgres.get("accounts", {"id": 1})                   # read (checked at the commit)
        await tx.postgres.upsert("accounts", key={"id": 1}, values={...})   # write (locked at the commit)

    result = await coordinator.run(transfer, retries=5)   # transfer(tx) runs again when it loses a race

Locks are LockRequests on the intents topic keyed by the transaction's id, answered on this client's reply
partition by a LockReply: GRANTED once every key is held, or REFUSED with the typed error that ended the
transaction (DeadlockVictimError, LockTimeoutError, TransactionAbortedError), which `run` retries. Leaving
the block publishes the intent, which then runs under the locks held; an exception in the block releases
them, and nothing runs. Requests go one at a time, so one transaction never waits twice at once.

When the locks are taken (`lock_at`):
- "commit" (the default): a read takes no lock but is remembered; a write's keys are remembered. Leaving
  the block asks every lock in ONE request (the writes' keys EXCLUSIVE, the keys only read SHARED at
  REPEATABLE_READ and SERIALIZABLE), then reads what was read again under those locks: anything changed
  since raises StaleReadError (nothing ran; `run` retries), and otherwise the transaction is exactly as if
  it had run at the moment its locks were granted (conservative strict two-phase locking, the reads
  validated; Calvin's reconnaissance reads). A transaction asking all its locks at once while holding none
  never deadlocks, so two increments of one counter race (one retries) instead of deadlocking on the upgrade.
- "access": each read takes its SHARED lock (at REPEATABLE_READ and SERIALIZABLE) and each write its
  EXCLUSIVE locks as it is made (strict two-phase locking as it goes): nothing is read twice, but two
  readers of a key that both write it deadlock, and the detector picks a victim (which `run` retries).
`tx.lock(keys, mode)` and a read `for_update=True` lock at once in either mode (SELECT ... FOR UPDATE).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, get_args

from polycommit import errors
from polycommit import operations as ops
from polycommit.events import Consistency, Isolation, LockReply, LockRequest, Operation, now_ms
from polycommit.interactive_stores import Neo4jBuilder, PostgresBuilder, QdrantBuilder
from polycommit.interactive_stores import node_key as node_key  # the lock keys of reads, for callers
from polycommit.interactive_stores import point_key as point_key
from polycommit.interactive_stores import row_key as row_key
from polycommit.reads import Versioned
from polycommit.results import TransactionResult

if TYPE_CHECKING:
    from polycommit.client import Coordinator, Transaction

R = TypeVar("R")

LockMode = Literal["SHARED", "EXCLUSIVE"]
LockAt = Literal["commit", "access"]
# Errors that end a transaction but not the business action: running the block again may succeed.
RETRIED: tuple[type[errors.PolycommitError], ...] = (
    errors.DeadlockVictimError,
    errors.LockTimeoutError,
    errors.TransactionAbortedError,
    errors.StaleReadError,
)
# Raised inside an attempt, these end it with nothing run too. Not among RETRIED, whose names also judge
# results (`retriable`): a transaction that ended with a store unavailable may have applied something.
RAISED_AND_RETRIED: tuple[type[errors.PolycommitError], ...] = (*RETRIED, errors.StoreUnavailableError)
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
    lock_at: LockAt


def refused(answer: LockReply) -> errors.PolycommitError:
    """The typed error a REFUSED LockReply names (TransactionError for a class this SDK does not know)."""
    error = answer["error"]
    if error is None:
        return errors.TransactionError(f"lock request {answer['request']} of {answer['tx_id']} was refused")
    return _BY_NAME.get(error["error_class"], errors.TransactionError)(f"{answer['tx_id']}: {error['message']}")


def refuse_interactive(tx: Transaction) -> None:
    """What an interactive transaction cannot be: without locks (there would be nothing to take). EVENTUAL
    runs its intent as a saga, STRONG as a two-phase commit, both under the locks taken before it."""
    if not tx.locks:
        raise errors.UnsupportedError("an interactive transaction takes locks: locks=False is refused")


def _covers(held: str | None, wanted: str) -> bool:
    return held == "EXCLUSIVE" or (held == "SHARED" and wanted == "SHARED")


class InteractiveScope:
    """The `tx` of `async with coordinator.transaction(interactive=True) as tx`."""

    def __init__(
        self, coordinator: Coordinator, transaction: Transaction, raise_on_failure: bool, lock_at: LockAt = "commit"
    ) -> None:
        if lock_at not in get_args(LockAt):
            raise errors.UnsupportedError(f"lock_at={lock_at!r}: one of {', '.join(get_args(LockAt))}")
        self.coordinator = coordinator
        self.transaction = transaction
        self.raise_on_failure = raise_on_failure
        self.lock_at = lock_at
        self.postgres = PostgresBuilder(self)
        self.qdrant = QdrantBuilder(self)
        self.neo4j = Neo4jBuilder(self)
        self.held: dict[str, LockMode] = {}  # key -> the mode the coordinator granted
        self.write_keys: set[str] = set()  # locking at the commit: the keys the writes will lock
        # Locking at the commit, at REPEATABLE_READ and SERIALIZABLE: each key read unlocked, how to read it
        # again and what the first read found (the commit checks it is unchanged).
        self.read_set: dict[str, tuple[Callable[[], Awaitable[Versioned]], Versioned]] = {}
        self.failed = ""  # the error class that ended this attempt before any result (in the block or at its end)
        self.checked = False  # the deferred locks are held and the reads checked since the block last ran
        self.reruns = 0  # times `run` ran the block again in this transaction after a stale read
        # Keys a read locks EXCLUSIVE rather than SHARED: the ones an earlier attempt of the same block
        # wrote (`run` sets them). Two readers of a key that both go on to write it deadlock on the
        # upgrade; asking the write lock at the read, as SELECT ... FOR UPDATE does, makes the second one
        # wait instead, so a retried victim does not meet the same deadlock again.
        self.exclusive_reads: set[str] = set()
        self.asked_exclusive: set[str] = set()  # every key this attempt asked EXCLUSIVE (granted or not)
        # Locking at the commit: the locks an earlier attempt of the same block took or would have taken
        # (`run` sets them after a deadlock, a lock-wait or idle timeout), asked all at once when the block
        # starts, so the new attempt holds what it will read before it reads it.
        self.predicted: dict[str, LockMode] = {}
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

    async def _ask(self, keys: list[str], mode: LockMode, shared: list[str] | None = None) -> None:
        self.requests += 1
        started = asyncio.get_running_loop().time()
        answer = await self.coordinator.request_locks(self._request(keys, mode, shared or []))
        if answer is None or answer["status"] != "GRANTED":
            self._ended = True
            raise refused(answer) if answer is not None else errors.TransactionError("no lock reply")
        self.lock_waits_s.append(asyncio.get_running_loop().time() - started)

    async def _hold_at_once(self, exclusive: list[str], shared: list[str]) -> None:
        """Ask `exclusive` and `shared` in ONE request (queued at one arrival: no cycle when nothing is held
        yet), and record them held."""
        async with self._one_at_a_time:
            await self._ask(exclusive, "EXCLUSIVE", shared)
            self.held.update({k: "SHARED" for k in shared if k not in self.held})
            self.held.update({k: "EXCLUSIVE" for k in exclusive})

    async def _confirm_open(self) -> None:
        """At REPEATABLE_READ and SERIALIZABLE the read locks must still be held when the intent runs: an
        empty request, just before it, raises if the coordinator ended the transaction meanwhile (idle), and
        restarts its idle timeout. (Below those levels no read lock is at stake: a write key lost with an
        idle transaction is asked again by the intent itself.)"""
        if self.requests and self.transaction.isolation in READ_LOCKING_LEVELS:
            async with self._one_at_a_time:
                await self._ask([], "SHARED")

    async def read(self, key: str, reader: Callable[[], Awaitable[Versioned]], for_update: bool) -> Versioned:
        """Read `key` with `reader` (one of the SDK's store reads), under the isolation level's lock."""
        if for_update or self.lock_at == "access":
            await self.lock_for_read([key], for_update=for_update)
            return await reader()
        found = await reader()
        self.checked = False
        remembered = self.transaction.isolation in READ_LOCKING_LEVELS and self.held.get(key) is None
        if remembered and key not in self.read_set:
            self.read_set[key] = (reader, found)
        return found

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
        """Add the step to the transaction's intent, its keys locked EXCLUSIVE first (locking as it goes) or
        remembered for the commit."""
        keys = ops.lock_keys(operation) + (ops.lock_keys(compensate) if compensate is not None else [])
        if self.lock_at == "access":
            await self.lock(keys, "EXCLUSIVE")
        else:
            self.write_keys.update(keys)
            self.checked = False
        self.transaction.add(operation, compensate=compensate, **step)

    async def lock_at_commit(self) -> None:
        """Ask the locks the block put off and check what it read is unchanged under them (raises
        StaleReadError, the transaction released, when it is not). Locking as it went, only confirm the
        read locks are still held."""
        if self.lock_at == "access":
            await self._confirm_open()
            return
        changed = await self.check_reads()
        if changed:
            await self.release()
            raise errors.StaleReadError(f"{self.tx_id}: {', '.join(changed)} changed since read; nothing ran")

    async def check_reads(self) -> list[str]:
        """Locking at the commit: ask every lock the block put off in one request, then read the read set
        again under them; returns the keys whose value changed since the block read them (the locks stay
        held either way). Empty: what the block read holds until the transaction ends."""
        if self.checked or (not self.read_set and not self.requests):
            return []  # checked already; or never opened, nothing to check: the intent locks its writes
        exclusive = sorted(k for k in self.write_keys if not _covers(self.held.get(k), "EXCLUSIVE"))
        shared = sorted(k for k in self.read_set if k not in self.write_keys and self.held.get(k) is None)
        if exclusive or shared:
            # Open already (locks taken at once) or reads to check: the writes are locked here, so an
            # interactive STRONG intent finds them held, as two-phase commit needs.
            await self._hold_at_once(exclusive, shared)
        else:
            await self._confirm_open()  # the read locks it holds must still be held
        keys = list(self.read_set)
        now = await asyncio.gather(*(self.read_set[k][0]() for k in keys))
        changed = [k for k, found in zip(keys, now, strict=True) if found != self.read_set[k][1]]
        self.checked = not changed
        return changed

    def restart(self) -> None:
        """Before the block runs again in this transaction after a stale read: what it buffered goes, the
        locks stay, so every key it read before is held now and reads what the commit will see."""
        self.transaction.steps.clear()
        self.read_set.clear()
        self.write_keys.clear()
        self.checked = False
        self.reruns += 1

    def _request(
        self, keys: list[str], mode: LockMode, shared: list[str] | None = None, release: bool = False
    ) -> LockRequest:
        tx = self.transaction
        return {
            "tx_id": tx.tx_id,
            "request": self.requests,
            "keys": keys,
            "mode": mode,
            "shared_keys": shared or [],
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
            await self.coordinator.request_locks(self._request([], "EXCLUSIVE", None, release=True))

    def touched(self) -> dict[str, LockMode]:
        """Every key this attempt locked or would have locked at its commit, in the mode it needed."""
        found: dict[str, LockMode] = {k: "SHARED" for k in self.read_set}
        found.update(self.held)
        found.update({k: "EXCLUSIVE" for k in self.write_keys})
        return found

    async def __aenter__(self) -> InteractiveScope:
        if self.lock_at == "commit" and self.predicted:
            exclusive = sorted(k for k, mode in self.predicted.items() if mode == "EXCLUSIVE")
            await self._hold_at_once(exclusive, sorted(set(self.predicted) - set(exclusive)))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            if issubclass(exc_type, errors.PolycommitError):
                self.failed = exc_type.__name__  # the block's own error (a refused lock, say)
            await self.release()  # nothing was published: the locks go, nothing ran
            return
        try:
            await self.lock_at_commit()
            self._ended = True
            self.result = await self.coordinator.execute(self.transaction)
        except errors.PolycommitError as exc:
            self.failed = type(exc).__name__
            raise
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


def retry_delay(attempt: int, backoff: float = 0.05, max_backoff: float = 2.0) -> float:
    """The wait before run `attempt` (1: the first run again): `backoff` doubled per attempt, at most
    `max_backoff`, jittered so that transactions that failed together do not all come back together."""
    return min(max_backoff, backoff * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)


async def run_again(
    transaction: Transaction,
    retries: int,
    once: Callable[[Transaction], Awaitable[R]],
    again_if: Callable[[R], bool],
) -> R:
    """`once(transaction)`; while `again_if` its result and `retries` remain, the same steps as a new
    transaction (`Transaction.again`) after `retry_delay`: sagas run again by `Coordinator.execute` and by
    the chaos workload. Returns the last result."""
    result = await once(transaction)
    for attempt in range(1, retries + 1):
        if not again_if(result):
            break
        await asyncio.sleep(retry_delay(attempt))
        transaction = transaction.again()
        result = await once(transaction)
    return result


async def run(
    coordinator: Coordinator,
    block: Callable[[InteractiveScope], Awaitable[Any]],
    *,
    retries: int = 3,
    backoff: float = 0.05,
    max_backoff: float = 2.0,
    attempts: list[InteractiveScope] | None = None,
    **options: Any,
) -> TransactionResult:
    """Run `block(tx)` in an interactive transaction (options as for `coordinator.transaction`), again with
    a new transaction, up to `retries` more times, when it ends as a deadlock victim, by a lock-wait or
    idle timeout, or undone after a store's transient refusal (`retriable`); waits `backoff` seconds
    doubled per attempt (with jitter, at most `max_backoff`) first. Locking as it goes, a new attempt reads
    the keys earlier attempts wrote under EXCLUSIVE locks (`exclusive_reads`). Locking at the commit, a
    stale read runs the block again at once in the same transaction, under the locks its commit took (an
    attempt too: `scope.reruns`), and a new transaction asks the locks the last one needed as it starts
    (`predicted`). `attempts`, if given, gets each transaction's scope once, as it starts: how each ended
    is its `result`, or `failed`, and `reruns`."""
    attempt, written, predicted = 0, set[str](), dict[str, LockMode]()
    while True:
        scope = coordinator.transaction(interactive=True, **options)
        scope.exclusive_reads, scope.predicted = set(written), predicted
        if attempts is not None:
            attempts.append(scope)
        try:
            async with scope as tx:
                await block(tx)
                while scope.lock_at == "commit" and attempt < retries and await scope.check_reads():
                    # A stale read: run the block again in this transaction, under the locks it holds
                    # now (no new queue to join behind the winner).
                    attempt += 1
                    scope.restart()
                    await block(tx)
            assert scope.result is not None
            if attempt >= retries or not retriable(scope.result):
                return scope.result
        except RAISED_AND_RETRIED:
            if attempt >= retries:
                raise
        finally:
            written |= scope.asked_exclusive
            predicted = scope.touched()
        attempt += 1
        await asyncio.sleep(retry_delay(attempt, backoff, max_backoff))
