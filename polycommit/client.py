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
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from polycommit import operations as ops
from polycommit import tracing
from polycommit.bus import Outgoing, Publisher, make_reader, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings, load_settings
from polycommit.errors import TransactionError, TransactionTimeoutError
from polycommit.events import Consistency, Isolation, NodeRef, Operation, Point, Step, TransactionIntent, now_ms
from polycommit.modes import refuse_unsupported


@dataclass(frozen=True)
class StepOutcomeView:
    index: int
    name: str
    store: str
    status: str
    attempts: int
    compensation_attempts: int
    error: str | None
    compensation_error: str | None = None  # the compensation's own error, apart from the step's
    resolved_by: str = ""  # the operator who repaired the step by hand (status resolved_by_operator)


@dataclass(frozen=True)
class TransactionResult:
    """How a transaction ended, as the coordinator reported it."""

    tx_id: str
    status: str  # completed | compensated | stuck | failed (sagas); committed | aborted (two-phase)
    steps: tuple[StepOutcomeView, ...]
    error: str | None
    duration_ms: int
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "committed")

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> TransactionResult:
        def describe(error: Mapping[str, Any] | None) -> str | None:
            return None if error is None else f"{error['error_class']}: {error['message']}"

        steps = tuple(
            StepOutcomeView(
                s["index"],
                s["name"],
                s["store"],
                s["status"],
                s["attempts"],
                s["compensation_attempts"],
                describe(s["error"]),
                describe(s.get("compensation_error")),
                s.get("resolved_by", ""),
            )
            for s in event["steps"]
        )
        return cls(
            tx_id=event["tx_id"],
            status=str(event["status"]).lower(),
            steps=steps,
            error=describe(event["error"]),
            duration_ms=int(event["finished_at_ms"]) - int(event["started_at_ms"]),
            raw=event,
        )


@dataclass
class Transaction:
    """A business action across the stores: ordered steps and how strongly they must hold together."""

    steps: list[Step] = field(default_factory=list)
    name: str = ""
    consistency: Consistency = "EVENTUAL"
    isolation: Isolation = "READ_COMMITTED"
    priority: int = 0
    tx_id: str = field(default_factory=lambda: str(uuid.uuid4()))

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
        }


class Saga(Transaction):
    """A named saga built step by step; steps with raw SQL or Cypher declare their compensation."""

    def __init__(self, name: str, *, priority: int = 0, tx_id: str | None = None) -> None:
        super().__init__(name=name, priority=priority, tx_id=tx_id or str(uuid.uuid4()))

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


# -- structured operations collected inside `async with coordinator.transaction()` ----------------


class _PostgresSteps:
    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def upsert(self, table: str, key: Mapping[str, Any], values: Mapping[str, Any], **step: Any) -> None:
        self._tx.add(ops.upsert_row(table, key, values), **step)

    def delete(self, table: str, key: Mapping[str, Any], **step: Any) -> None:
        self._tx.add(ops.delete_row(table, key), **step)

    def execute(self, statement: str, *params: Any, compensate: Operation | None = None, **step: Any) -> None:
        self._tx.add(ops.sql(statement, params), compensate=compensate, **step)


class _QdrantSteps:
    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def upsert(self, collection: str, points: Iterable[Point], **step: Any) -> None:
        self._tx.add(ops.upsert_points(collection, points), **step)

    def delete(self, collection: str, ids: Iterable[str | int], **step: Any) -> None:
        self._tx.add(ops.delete_points(collection, ids), **step)


class _Neo4jSteps:
    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def merge_node(
        self, label: str, key: Mapping[str, Any], properties: Mapping[str, Any] | None = None, **step: Any
    ) -> None:
        self._tx.add(ops.merge_node(label, key, properties), **step)

    def delete_node(self, label: str, key: Mapping[str, Any], **step: Any) -> None:
        self._tx.add(ops.delete_node(label, key), **step)

    def merge_relationship(
        self,
        rel_type: str,
        from_node: NodeRef,
        to_node: NodeRef,
        properties: Mapping[str, Any] | None = None,
        **step: Any,
    ) -> None:
        self._tx.add(ops.merge_relationship(rel_type, from_node, to_node, properties), **step)

    def delete_relationship(self, rel_type: str, from_node: NodeRef, to_node: NodeRef, **step: Any) -> None:
        self._tx.add(ops.delete_relationship(rel_type, from_node, to_node), **step)

    def run(
        self,
        statement: str,
        params: Mapping[str, Any] | None = None,
        *,
        compensate: Operation | None = None,
        **step: Any,
    ) -> None:
        self._tx.add(ops.cypher(statement, params), compensate=compensate, **step)


class TransactionScope:
    """The `tx` of `async with coordinator.transaction() as tx`: collects steps, commits on exit."""

    def __init__(self, coordinator: Coordinator, transaction: Transaction, raise_on_failure: bool) -> None:
        self.coordinator = coordinator
        self.transaction = transaction
        self.raise_on_failure = raise_on_failure
        self.postgres = _PostgresSteps(transaction)
        self.qdrant = _QdrantSteps(transaction)
        self.neo4j = _Neo4jSteps(transaction)
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


class Coordinator:
    """A client of the polycommit coordinator: publishes intents, awaits results on its reply partition."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        client_id: str | None = None,
        timeout: float = 120.0,
        codec: EventCodec | None = None,
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
        self._traces: dict[str, Any] = {}  # tx id -> its open root span, only when tracing is on

    async def start(self) -> Coordinator:
        await self._publisher.start()
        partitions = await self._publisher.partitions(self.topics.replies)
        partition = random.Random(self.client_id).choice(partitions)
        self._reply_to = f"{self.topics.replies}:{partition}"
        consumer = make_reader(self.settings, self.client_id, fetch_max_wait_ms=10)
        await consumer.start()
        tp = TopicPartition(self.topics.replies, partition)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)  # fix the start before any intent goes out, so no reply is missed
        self._replies = consumer
        self._reader = asyncio.create_task(self._read_replies(), name=f"{self.client_id}-replies")
        return self

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._replies is not None:
            await self._replies.stop()
        await self._publisher.stop()
        for future in self._pending.values():
            if not future.done():
                future.cancel()

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
                    future = self._pending.get(record.key.decode()) if record.key else None
                    if future is None or future.done():
                        continue  # another client's result on the same partition, or a repeat
                    try:
                        event = self.codec.decode_as(record.value, "TransactionResult")
                    except Exception as exc:  # a corrupt reply must fail its caller, not the reader
                        future.set_exception(exc)
                        continue
                    # A STUCK result is delivered too: the saga goes on retrying, but the caller learns now.
                    future.set_result(TransactionResult.from_event(event))
                    tracing.client_result(self._traces, record)

    async def submit(self, transaction: Transaction) -> asyncio.Future[TransactionResult]:
        """Publish the intent; the returned future completes with the result. A mode polycommit does not
        run yet raises UnsupportedError here, before anything is published."""
        refuse_unsupported(transaction.consistency, transaction.isolation, transaction.priority)
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
        await self._publisher.send(outgoing)
        tracing.end_all([publishing])
        return future

    def _finished(self, tx_id: str) -> None:
        self._pending.pop(tx_id, None)
        tracing.end_all([self._traces.pop(tx_id, None)])

    async def execute(self, transaction: Transaction, wait: float | None = None) -> TransactionResult:
        """Publish the intent and await the result (at most `wait` seconds, default the client's timeout)."""
        future = await self.submit(transaction)
        try:
            return await asyncio.wait_for(future, wait or self.timeout)
        except TimeoutError:
            raise TransactionTimeoutError(
                f"no result for {transaction.tx_id} within {wait or self.timeout}s; it may still finish"
            ) from None

    async def execute_many(self, transactions: Sequence[Transaction]) -> list[TransactionResult]:
        return list(await asyncio.gather(*(self.execute(t) for t in transactions)))

    def transaction(
        self,
        *,
        name: str = "",
        consistency: Consistency = "EVENTUAL",
        isolation: Isolation = "READ_COMMITTED",
        priority: int = 0,
        raise_on_failure: bool = False,
    ) -> TransactionScope:
        refuse_unsupported(consistency, isolation, priority)  # before the caller builds its steps
        tx = Transaction(name=name, consistency=consistency, isolation=isolation, priority=priority)
        return TransactionScope(self, tx, raise_on_failure)


@contextlib.asynccontextmanager
async def connect(settings: Settings | None = None, **kwargs: Any) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(settings, **kwargs)
    await coordinator.start()
    try:
        yield coordinator
    finally:
        await coordinator.close()
