"""The coordinator process: drives the pure saga state machine from Kafka, exactly once.

Each loop reads a batch of intents and outcomes, folds them through `orchestrator.saga`, fires due timers
(timeouts, retries), and then, in ONE Kafka transaction, publishes the resulting commands, results,
alerts and dead letters, the new snapshots of every transaction it touched (the changelog), and the
consumed offsets. A crash anywhere aborts that transaction: on restart the member restores its
partitions' snapshots from the changelog and re-reads the same inputs, so no decision is lost or made
twice. Restarting with the same transactional id fences a zombie predecessor.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from orchestrator import saga
from polycommit.bus import Outgoing, Publisher, key_hash, make_consumer, read_topic, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.deadletters import dead_letter
from polycommit.errors import CodecError
from polycommit.events import SagaSnapshot, StepOutcome, TransactionIntent, TransactionResult, now_ms
from polycommit.failpoints import failpoint
from projections import tx_state

log = logging.getLogger(__name__)


@dataclass
class CoordinatorStats:
    intents: int = 0
    outcomes: int = 0
    commands: int = 0
    results: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    restored: int = 0
    restarts: int = 0
    corrupt_snapshots: int = 0
    kafka_transactions: int = 0
    # Where the loop's time goes (seconds, cumulative): reading, folding events, the Kafka transaction.
    read_s: float = 0.0
    fold_s: float = 0.0
    commit_s: float = 0.0


def reply_target(reply_to: str) -> tuple[str, int | None] | None:
    """`topic` or `topic:partition` -> (topic, partition); empty -> None."""
    if not reply_to:
        return None
    topic, _, partition = reply_to.rpartition(":")
    if topic and partition.isdigit():
        return topic, int(partition)
    return reply_to, None


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: CoordinatorService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # The transaction in flight still commits offsets of these partitions: finish it first.
        await self.service.drain(reraise=False)
        self.service.forget({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.service.restore({tp.partition for tp in assigned})


class CoordinatorService:
    def __init__(
        self,
        settings: Settings,
        policy: saga.SagaPolicy | None = None,
        *,
        instance: str | None = None,
        codec: EventCodec | None = None,
        max_records: int = 2000,
    ) -> None:
        self.settings = settings
        self.policy = policy or saga.SagaPolicy(max_payload_bytes=settings.max_payload_bytes)
        self.codec = codec or default_codec()
        self.topics = topics_for(settings)
        self.group_id = f"{settings.topic_prefix}-coordinator"
        self.instance = instance or settings.coordinator_instance
        self.transactional_id = f"{settings.topic_prefix}-coordinator-{self.instance}"
        self.max_records = max_records
        self.sagas: dict[str, SagaSnapshot] = {}
        self.intent_bytes: dict[str, bytes] = {}  # each saga's intent as published, for its snapshots
        self.timers: list[tuple[int, str]] = []
        self.stats = CoordinatorStats()
        self._partitions = 0
        # The Kafka transaction of the previous loop, committing while the next batch is read and folded.
        self._committing: asyncio.Task[None] | None = None
        self._commit_failure: BaseException | None = None
        self._restored: set[int] = set()  # partitions whose changelog is folded into `sagas`
        self._restore_lock = asyncio.Lock()

    # -- state ownership ----------------------------------------------------------------------------

    def partition_of(self, tx_id: str) -> int:
        return key_hash(tx_id) % max(1, self._partitions)

    def forget(self, partitions: set[int]) -> None:
        self._restored -= partitions
        for tx_id in [t for t in self.sagas if self.partition_of(t) in partitions]:
            del self.sagas[tx_id]
            self.intent_bytes.pop(tx_id, None)

    async def restore(self, partitions: set[int]) -> None:
        """Fold the changelog partitions this member now owns into its in-memory state, once each.

        aiokafka may hand out records of a new partition before its rebalance callback has finished
        restoring it, so the loop also calls this for every partition in a batch: the lock and the
        restored set make the second caller wait for the first and then do nothing."""
        async with self._restore_lock:
            todo = set(partitions) - self._restored
            if todo:
                await self._restore(todo)
                self._restored |= todo

    async def _restore(self, partitions: set[int]) -> None:
        raw: list[tuple[str, bytes | None]] = []
        topic = self.topics.tx_state
        await read_topic(self.settings, topic, lambda r: raw.append((r.key.decode(), r.value)), partitions)
        restored, intents, corrupt = tx_state.fold_raw(self.codec, raw)
        if corrupt:
            # Not ours (someone wrote to the changelog): skipped, since refusing to start would stop
            # every transaction; counted and logged for the operator.
            self.stats.corrupt_snapshots += corrupt
            log.error("skipped %d corrupt changelog records in partitions %s", corrupt, sorted(partitions))
        for tx_id, snapshot in restored.items():
            self.sagas[tx_id] = snapshot
            self.intent_bytes[tx_id] = intents[tx_id]
            self._schedule(snapshot)
        self.stats.restored += len(restored)
        log.info(
            "restored %d transactions from partitions %s (%d records)", len(restored), sorted(partitions), len(raw)
        )

    def _schedule(self, snapshot: SagaSnapshot) -> None:
        if snapshot["due_at_ms"] and snapshot["phase"] not in saga.TERMINAL:
            heapq.heappush(self.timers, (snapshot["due_at_ms"], snapshot["intent"]["tx_id"]))

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until `stop`; when Kafka fails under it (broker restart, lost connection), drop the
        in-memory state, which may be ahead of the log, and start over from the changelog."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._session(stop, ready)
            except ProducerFenced:
                raise  # another member took this transactional id over: this one is a zombie and must end
            except (KafkaError, OSError) as exc:
                self.stats.restarts += 1
                log.warning(
                    "coordinator session failed (%s: %s); restoring from the log in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
                self.forget_all()
                await asyncio.sleep(delay)  # backoff while the broker comes back
                delay = min(delay * 2, 10.0)
            else:
                return

    async def drain(self, *, reraise: bool = True) -> None:
        """Wait for the Kafka transaction in flight. Its failure means the in-memory state is ahead of
        the log: it is kept and raised (now, or by the next loop) so the session starts over."""
        task, self._committing = self._committing, None
        if task is not None:
            try:
                await task
            except Exception as exc:
                self._commit_failure = exc
        if reraise and self._commit_failure is not None:
            failure, self._commit_failure = self._commit_failure, None
            raise failure

    def forget_all(self) -> None:
        self._restored.clear()
        self.sagas.clear()
        self.intent_bytes.clear()
        self.timers.clear()

    async def _session(self, stop: asyncio.Event, ready: asyncio.Event | None) -> None:
        self.forget_all()  # a session owns nothing until the group assigns it partitions
        publisher = Publisher(
            self.settings, transactional_id=self.transactional_id, codec=self.codec, client_id="coordinator"
        )
        consumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            client_id="coordinator",
            instance_id=f"coordinator-{self.instance}",  # unique per process, like the transactional id
        )
        await publisher.start()
        self._partitions = len(await publisher.partitions(self.topics.intents))
        consumer.subscribe(self.topics.coordinator_inputs(), listener=_Rebalance(self))
        await consumer.start()
        try:
            if ready is not None:
                ready.set()
            while not stop.is_set():
                await self._step(consumer, publisher)
            await self.drain()
        finally:
            if self._committing is not None:
                await self.drain(reraise=False)
            self._commit_failure = None
            await consumer.stop()
            await publisher.stop()

    async def _step(self, consumer: AIOKafkaConsumer, publisher: Publisher) -> None:
        wait_ms = 100
        if self.timers:
            wait_ms = max(0, min(wait_ms, self.timers[0][0] - now_ms()))
        started = time.perf_counter()
        batch = await consumer.getmany(timeout_ms=wait_ms, max_records=self.max_records)
        unrestored = {tp.partition for tp in batch} - self._restored
        if unrestored:
            await self.restore(unrestored)  # never fold an event over state not yet loaded
        folded = time.perf_counter()
        self.stats.read_s += folded - started
        now = now_ms()
        out: list[Outgoing] = []
        touched: dict[str, SagaSnapshot] = {}
        for records in batch.values():
            for record in records:
                self._consume(record, now, out, touched)
        self._fire_due(now, out, touched)
        if self._commit_failure is not None or (self._committing is not None and self._committing.done()):
            await self.drain()  # surface a failed commit before building on the state it left
        if not out and not touched and not batch:
            return
        for tx_id, snapshot in touched.items():
            if snapshot["phase"] in saga.TERMINAL:
                out.append(Outgoing(self.topics.tx_state, tx_id, "SagaSnapshot", None))
                self.intent_bytes.pop(tx_id, None)
            else:
                record = tx_state.to_record(snapshot, self.intent_bytes[tx_id])
                out.append(Outgoing(self.topics.tx_state, tx_id, "SagaSnapshot", record))
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items() if records}
        self.stats.fold_s += time.perf_counter() - folded
        # One Kafka transaction at a time, but the next batch is read and folded while this one commits.
        await self.drain()
        self._committing = asyncio.create_task(self._commit(publisher, out, offsets))

    async def _commit(self, publisher: Publisher, out: list[Outgoing], offsets: dict[TopicPartition, int]) -> None:
        committing = time.perf_counter()
        await publisher.producer.begin_transaction()
        try:
            await publisher.publish(out)
            if offsets:
                await publisher.producer.send_offsets_to_transaction(offsets, self.group_id)
            failpoint("coordinator.before_commit")
            await publisher.producer.commit_transaction()
            failpoint("coordinator.after_commit")
        except BaseException:
            await publisher.producer.abort_transaction()
            raise
        self.stats.kafka_transactions += 1
        self.stats.commit_s += time.perf_counter() - committing

    def _consume(self, record: Any, now: int, out: list[Outgoing], touched: dict[str, SagaSnapshot]) -> None:
        try:
            decoded = self.codec.decode(record.value)
            if decoded.event_type == "TransactionIntent" and record.topic == self.topics.intents:
                self._on_intent(decoded.record, record, now, out, touched)  # type: ignore[arg-type]
            elif decoded.event_type == "StepOutcome" and record.topic == self.topics.outcomes:
                self._on_outcome(decoded.record, now, out, touched)  # type: ignore[arg-type]
            else:
                raise CodecError(f"a {decoded.event_type} does not belong on {record.topic}")
        except CodecError as exc:
            self.stats.dead_letters += 1
            tx_id = record.key.decode(errors="replace") if record.key else None  # records are keyed by tx id
            letter = dead_letter(record, exc, "coordinator", tx_id)
            out.append(
                Outgoing(self.topics.dead_letters, tx_id or f"{record.topic}/{record.offset}", "DeadLetter", letter)
            )

    def _on_intent(
        self, intent: TransactionIntent, record: Any, now: int, out: list[Outgoing], touched: dict[str, SagaSnapshot]
    ) -> None:
        self.stats.intents += 1
        tx_id = intent["tx_id"]
        if tx_id in self.sagas:
            return  # a duplicate of an intent already in flight
        self.intent_bytes[tx_id] = bytes(record.value)
        transition = saga.start(intent, now, self.policy)
        if transition.state["phase"] == "failed" and transition.state["error"] is not None:
            # An intent no store could run is poison: it fails now (never hangs) and is kept for inspection.
            error = transition.state["error"]
            exc = CodecError(f"{error['error_class']}: {error['message']}")
            letter = dead_letter(record, exc, "coordinator", tx_id)
            letter["error_class"] = error["error_class"]
            out.append(Outgoing(self.topics.dead_letters, tx_id, "DeadLetter", letter))
            self.stats.dead_letters += 1
        self._apply(transition, out, touched)

    def _on_outcome(self, event: StepOutcome, now: int, out: list[Outgoing], touched: dict[str, SagaSnapshot]) -> None:
        self.stats.outcomes += 1
        state = self.sagas.get(event["tx_id"])
        if state is None:
            return  # the transaction already ended: a late or redelivered outcome
        self._apply(saga.on_outcome(state, event, now, self.policy), out, touched)

    def _fire_due(self, now: int, out: list[Outgoing], touched: dict[str, SagaSnapshot]) -> None:
        while self.timers and self.timers[0][0] <= now:
            due, tx_id = heapq.heappop(self.timers)
            state = self.sagas.get(tx_id)
            if state is None or state["due_at_ms"] != due:
                continue  # the timer was superseded by a later transition
            self._apply(saga.on_due(state, now, self.policy), out, touched)

    def _apply(self, transition: saga.Transition, out: list[Outgoing], touched: dict[str, SagaSnapshot]) -> None:
        state = transition.state
        tx_id = state["intent"]["tx_id"]
        touched[tx_id] = state
        if state["phase"] in saga.TERMINAL:
            self.sagas.pop(tx_id, None)
        else:
            self.sagas[tx_id] = state
            self._schedule(state)
        for command in transition.commands:
            out.append(Outgoing(self.topics.commands(command["operation"]["store"]), tx_id, "StoreCommand", command))
        self.stats.commands += len(transition.commands)
        for alert in transition.alerts:
            out.append(Outgoing(self.topics.alerts, tx_id, "Alert", alert))
        if transition.result is not None:
            self._publish_result(state, transition.result, out)

    def _publish_result(self, state: SagaSnapshot, result: TransactionResult, out: list[Outgoing]) -> None:
        tx_id = result["tx_id"]
        self.stats.results[result["status"]] = self.stats.results.get(result["status"], 0) + 1
        encoded = self.codec.encode("TransactionResult", result)  # once, for both topics
        out.append(Outgoing(self.topics.results, tx_id, "TransactionResult", result, encoded=encoded))
        target = reply_target(state["intent"]["reply_to"])
        if target is not None:
            out.append(Outgoing(target[0], tx_id, "TransactionResult", result, partition=target[1], encoded=encoded))
