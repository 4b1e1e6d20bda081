"""What an application uses: publish a transaction's intent, await its result over Kafka request-reply.

Three shapes, one engine:

    result = await coordinator.execute(Transaction(steps=[...]))

    async with coordinator.transaction(name="ingest") as tx:
        tx.postgres.upsert("documents", key={"id": 1}, values={"title": "..."})
        tx.qdrant.upsert("documents", [point(1, vector, {"title": "..."})])
        tx.neo4j.merge_node("Document", key={"id": 1}, properties={"title": "..."})

    saga = Saga("merge-customers").step(execute=sql(...), compensate=sql(...), retries=3, timeout=2.0)
    result = await coordinator.execute(saga)

Results come back on `polycommit.replies`, on the one partition this client reads (the intent's
`reply_to` names it), so a client never reads every other client's results.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Unpack, overload

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ProducerClosed

from polycommit import operations as ops
from polycommit import tracing
from polycommit.bus import FETCH_MAX_WAIT_MS, Outgoing, Publisher, make_reader, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings, load_settings
from polycommit.errors import ClientClosedError, TransactionError, TransactionTimeoutError, UnexpectedEventTypeError
from polycommit.events import (
    Consistency,
    Isolation,
    LockReply,
    LockRequest,
    Operation,
    Step,
    TransactionIntent,
    now_ms,
)
from polycommit.interactive import InteractiveScope, LockAt, ScopeOptions, refuse_interactive, retriable, run_again
from polycommit.lock_calls import LockCalls
from polycommit.modes import refuse_unsupported
from polycommit.reads import PointSource, StoreReads
from polycommit.results import StepOutcomeView as StepOutcomeView
from polycommit.results import TransactionResult as TransactionResult
from polycommit.store_steps import Neo4jSteps, PostgresSteps, QdrantSteps

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


@dataclass
class Transaction:
    """A business action across the stores: ordered steps and how strongly they must hold together."""

    steps: list[Step] = field(default_factory=list)
    name: str = ""
    consistency: Consistency = "EVENTUAL"
    isolation: Isolation = "READ_COMMITTED"
    priority: int = 0
    tx_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    locks: bool = True  # False gives up isolation: its compensations may undo other transactions' writes
    lock_wait: float = 0.0  # seconds it may wait for its locks; 0: the coordinator's default

    def add(
        self,
        operation: Operation,
        *,
        compensate: Operation | None = None,
        name: str = "",
        retries: int = 0,
        timeout: float = 0.0,
        after: Iterable[str | int] = (),
    ) -> Transaction:
        """Add a step. It runs in parallel with the others unless it comes `after` some (names or
        indices of earlier steps), or an earlier step is of its store or shares a lock key with it."""
        order = ops.step_order(after, [s["name"] for s in self.steps])
        self.steps.append(
            {
                "index": len(self.steps),
                "name": name or f"{operation['store']}.{operation['kind']}",
                "operation": operation,
                "compensation": compensate,
                "retries": retries,
                "timeout_ms": int(timeout * 1000),
                "after": order,
            }
        )
        return self

    def again(self) -> Transaction:
        """The same steps as a new transaction (sent again under its own tx_id, one ends as it ended)."""
        fresh = copy.copy(self)
        fresh.steps, fresh.tx_id = list(self.steps), str(uuid.uuid4())
        return fresh

    def intent(self, reply_to: str, client_id: str) -> TransactionIntent:
        return {
            "tx_id": self.tx_id,
            "name": self.name,
            "consistency": self.consistency,
            "isolation": self.isolation,
            "priority": self.priority,
            "steps": self.steps,
            "reply_to": reply_to,
            "client_id": client_id,
            "created_at_ms": now_ms(),
            "locks": self.locks,
            "lock_wait_ms": int(self.lock_wait * 1000),
        }


class Saga(Transaction):
    """A named saga built step by step; steps with raw SQL or Cypher declare their compensation."""

    def __init__(
        self, name: str, *, priority: int = 0, tx_id: str | None = None, locks: bool = True, lock_wait: float = 0.0
    ) -> None:
        """`locks=False` opts out of the saga's locks, giving up isolation (README); `lock_wait` in seconds."""
        tx_id = tx_id or str(uuid.uuid4())
        super().__init__(name=name, priority=priority, tx_id=tx_id, locks=locks, lock_wait=lock_wait)

    def step(
        self,
        execute: Operation,
        compensate: Operation | None = None,
        *,
        name: str = "",
        retries: int = 0,
        timeout: float = 0.0,
        after: Iterable[str | int] = (),
    ) -> Saga:
        self.add(execute, compensate=compensate, name=name, retries=retries, timeout=timeout, after=after)
        return self


class TransactionScope:
    """The `tx` of `async with coordinator.transaction() as tx`: collects steps, commits on exit."""

    def __init__(self, coordinator: Coordinator, transaction: Transaction, raise_on_failure: bool) -> None:
        self.coordinator = coordinator
        self.transaction = transaction
        self.raise_on_failure = raise_on_failure
        # Writes become steps; reads (`await tx.postgres.get(...)`) go to the store over the client's own
        # connections (polycommit.reads), so a write can expect the version it read.
        self.postgres = PostgresSteps(transaction, lambda: coordinator.reads)
        self.qdrant = QdrantSteps(transaction, lambda: coordinator.reads)
        self.neo4j = Neo4jSteps(transaction, lambda: coordinator.reads)
        self.result: TransactionResult | None = None

    @property
    def tx_id(self) -> str:
        return self.transaction.tx_id

    async def __aenter__(self) -> TransactionScope:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            return  # an exception inside the block aborts: nothing was published, nothing to undo
        self.result = await self.coordinator.execute(self.transaction)
        if self.raise_on_failure and not self.result.ok:
            raise TransactionError(f"transaction {self.tx_id} ended {self.result.status}: {self.result.error}")


CLOSED = "this client was closed: nothing more is sent through it"


class Coordinator:
    """A client of the polycommit coordinator: publishes intents, awaits results on its reply partition."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        client_id: str | None = None,
        timeout: float = 120.0,
        codec: EventCodec | None = None,
        point_source: PointSource | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.topics = topics_for(self.settings)
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        self.timeout = timeout
        self.codec = codec or default_codec()
        self._publisher = Publisher(self.settings, codec=self.codec, client_id=self.client_id)
        self._replies: AIOKafkaConsumer | None = None
        self._reply_to = ""
        self._pending: dict[str, asyncio.Future[TransactionResult]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._traces: dict[str, Any] = {}  # tx id -> its open root span, only when tracing is on
        self.lock_calls = LockCalls(self.codec)  # `tx.lock` calls awaiting their LockReply
        self._point_source = point_source  # Qdrant reads through a consumer's backend (Edge: one opener)
        self._reads: StoreReads | None = None

    @property
    def reads(self) -> StoreReads:
        """Versioned reads of the three stores, connected on first use, closed with the client."""
        if self._reads is None:
            self._reads = StoreReads(self.settings, self._point_source)
        return self._reads

    async def start(self) -> Coordinator:
        await self._publisher.start()
        partitions = await self._publisher.partitions(self.topics.replies)
        partition = random.Random(self.client_id).choice(partitions)
        self._reply_to = f"{self.topics.replies}:{partition}"
        # Long polls (polycommit.bus.make_consumer): a reply ends the wait as soon as it is committed.
        consumer = make_reader(self.settings, self.client_id, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
        await consumer.start()
        tp = TopicPartition(self.topics.replies, partition)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)  # fix the start before any intent goes out, so no reply is missed
        self._replies = consumer
        self._reader = asyncio.create_task(self._read_replies(), name=f"{self.client_id}-replies")
        return self

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._replies is not None:
            await self._replies.stop()
        await self._publisher.stop()
        if self._reads is not None:
            await self._reads.close()
        waiting: list[asyncio.Future[Any]] = [*self._pending.values(), *self.lock_calls.waiting.values()]
        for future in waiting:
            if not future.done():
                future.cancel()  # nothing will answer them now: their callers end at once, not at their timeout

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_replies(self) -> None:
        assert self._replies is not None
        while True:
            batch = await self._replies.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for record in records:
                    if self.lock_calls.waiting and self.lock_calls.route(record):
                        continue
                    future = self._pending.get(record.key.decode()) if record.key else None
                    if future is None or future.done():
                        continue  # another client's result on the same partition, or a repeat
                    try:
                        event = self.codec.decode_as(record.value, "TransactionResult")
                    except UnexpectedEventTypeError:
                        continue  # a LockReply no `tx.lock` call awaits any more (polycommit/interactive.py)
                    except Exception as exc:  # a corrupt reply must fail its caller, not the reader
                        future.set_exception(exc)
                        continue
                    # A STUCK result is delivered too: the saga goes on retrying, but the caller learns now.
                    future.set_result(TransactionResult.from_event(event))
                    tracing.client_result(self._traces, record)

    async def _send(self, outgoing: Outgoing) -> None:
        """Publish one record; after `close` (or racing it), ClientClosedError rather than aiokafka's own
        (or a wait for metadata a closed producer never gets)."""
        if self._closed:
            raise ClientClosedError(CLOSED)
        try:
            await self._publisher.send(outgoing)
        except ProducerClosed:
            raise ClientClosedError(CLOSED) from None

    @property
    def reply_to(self) -> str:
        return self._reply_to

    async def request_locks(self, request: LockRequest) -> LockReply | None:
        """Publish a LockRequest and await its LockReply (None for a release, which is not answered)."""
        if self._replies is None:
            raise TransactionError("Coordinator.start() was not awaited")
        outgoing = Outgoing(self.topics.intents, request["tx_id"], "LockRequest", request)  # keyed as its intent
        return await self.lock_calls.call(self._send(outgoing), request, self.timeout)

    async def run(self, block: Callable[[InteractiveScope], Awaitable[Any]], **options: Any) -> TransactionResult:
        """`block(tx)` in an interactive transaction, run again when it is a deadlock victim or its locks
        time out (`polycommit.interactive.run`: retries=3, backoff=0.05 s, and `transaction`'s options)."""
        from polycommit.interactive import run

        return await run(self, block, **options)

    async def submit(self, transaction: Transaction) -> asyncio.Future[TransactionResult]:
        """Publish the intent; the returned future completes with the result. A mode polycommit does not
        run yet raises UnsupportedError here, before anything is published."""
        refuse_unsupported(transaction.consistency, transaction.isolation, transaction.priority, transaction.locks)
        if self._replies is None:
            raise TransactionError("Coordinator.start() was not awaited")
        future: asyncio.Future[TransactionResult] = asyncio.get_running_loop().create_future()
        self._pending[transaction.tx_id] = future
        future.add_done_callback(lambda _: self._finished(transaction.tx_id))
        intent = transaction.intent(self._reply_to, self.client_id)
        publishing = tracing.client_publish(self._traces, transaction.tx_id, transaction.name)
        outgoing = Outgoing(
            self.topics.intents, transaction.tx_id, "TransactionIntent", intent, headers=tracing.headers_of(publishing)
        )
        await self._send(outgoing)
        tracing.end_all([publishing])
        return future

    def _finished(self, tx_id: str) -> None:
        self._pending.pop(tx_id, None)
        tracing.end_all([self._traces.pop(tx_id, None)])

    async def execute(
        self,
        transaction: Transaction,
        wait: float | None = None,
        *,
        retries: int = 0,
        attempts: list[TransactionResult] | None = None,
    ) -> TransactionResult:
        """Publish the intent and await the result (at most `wait` seconds, default the client's timeout).
        With `retries`, a transaction that ended with nothing of it applied for a reason a new attempt may
        not meet (`interactive.retriable`: a lock wait, a deadlock, a transient refusal once undone) runs
        again as a new one with the same steps, after a backoff. `attempts` gets every result."""

        async def once(attempt: Transaction) -> TransactionResult:
            result = await self._execute_once(attempt, wait)
            if attempts is not None:
                attempts.append(result)
            return result

        return await run_again(transaction, retries, once, retriable)

    async def _execute_once(self, transaction: Transaction, wait: float | None) -> TransactionResult:
        future = await self.submit(transaction)
        try:
            return await asyncio.wait_for(future, wait or self.timeout)
        except TimeoutError:
            raise TransactionTimeoutError(
                f"no result for {transaction.tx_id} within {wait or self.timeout}s; it may still finish"
            ) from None

    async def execute_many(self, transactions: Sequence[Transaction]) -> list[TransactionResult]:
        return list(await asyncio.gather(*(self.execute(t) for t in transactions)))

    @overload
    def transaction(
        self, *, interactive: Literal[False] = False, **options: Unpack[ScopeOptions]
    ) -> TransactionScope: ...

    @overload
    def transaction(self, *, interactive: Literal[True], **options: Unpack[ScopeOptions]) -> InteractiveScope: ...

    def transaction(
        self,
        *,
        name: str = "",
        consistency: Consistency = "EVENTUAL",
        isolation: Isolation = "READ_COMMITTED",
        priority: int = 0,
        raise_on_failure: bool = False,
        locks: bool = True,
        lock_wait: float = 0.0,
        lock_at: LockAt = "commit",
        interactive: bool = False,
    ) -> TransactionScope | InteractiveScope:
        """`interactive=True`: reads and writes made inside the block, locked at its commit or, with
        `lock_at="access"`, as they are made (polycommit/interactive.py)."""
        refuse_unsupported(consistency, isolation, priority, locks)  # before the caller builds its steps
        tx = Transaction(name=name, consistency=consistency, isolation=isolation, priority=priority)
        tx.locks, tx.lock_wait = locks, lock_wait
        if not interactive:
            return TransactionScope(self, tx, raise_on_failure)
        refuse_interactive(tx)
        return InteractiveScope(self, tx, raise_on_failure, lock_at)


@contextlib.asynccontextmanager
async def connect(settings: Settings | None = None, **kwargs: Any) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(settings, **kwargs)
    await coordinator.start()
    try:
        yield coordinator
    finally:
        await coordinator.close()
