"""The coordinator process: drives the transactions' protocols from Kafka, exactly once. I/O only.

Each loop reads a batch of intents and outcomes, folds each through its transaction's protocol (the
registry in `orchestrator.registry`; sagas today), fires due timers (timeouts, retries), and then, in ONE
Kafka transaction, publishes the resulting commands, decisions, lock requests, results, alerts and dead
letters, the new snapshots of every transaction it touched and its inputs' positions (the changelog). A
crash anywhere aborts that transaction: on restart the member restores its partitions' snapshots from the
changelog and re-reads the same inputs, so no decision is lost or made twice. Restarting with the same
transactional id fences a zombie predecessor. What a phase means is the protocol's business, never this
module's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from orchestrator import operator, registry
from orchestrator.admission import ReplyTargets, canonical_or_refusal, cluster_topics, expiry_refusal, key_refusal
from orchestrator.committer import Committer, active_transactional_id
from orchestrator.consumer_positions import ConsumerPositions
from orchestrator.deferred import Deferred, Taken
from orchestrator.interactive_inputs import INPUTS, InteractiveInputs, input_topics
from orchestrator.lock_waits import waits_of
from orchestrator.members import ActiveStandbyAssignor, assignor_for
from orchestrator.partitioned_locking import granted, partitioned_of
from orchestrator.protocol import (
    Event,
    HoldsLocks,
    IntentReceived,
    LocksGranted,
    OperatorReceived,
    OutcomeReceived,
    TimerDue,
    Transition,
    TxState,
    restore_locks,
)
from orchestrator.rebalance import Rebalance, start_over
from orchestrator.saga import SagaPolicy
from orchestrator.transactions import OwnedTransactions
from orchestrator.writer import COORDINATOR_LABELS, CoordinatorStats, TransitionWriter, position_records
from polycommit import tracing
from polycommit.bus import Outgoing, Publisher, make_consumer, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.deadletters import dead_letter
from polycommit.errors import CodecError, ProtocolError
from polycommit.events import OperatorCommand, TransactionIntent, now_ms
from polycommit.group_watch import GroupWatch, quietly, stop_consumer
from projections.wait_for import REANNOUNCE_MS

log = logging.getLogger(__name__)


class CoordinatorService:
    def __init__(
        self,
        settings: Settings,
        policy: SagaPolicy | None = None,
        *,
        instance: str | None = None,
        codec: EventCodec | None = None,
        max_records: int = 2000,
        observe: tracing.Observe = tracing.ignore,
    ) -> None:
        self.settings = settings
        self.policy = policy or SagaPolicy(max_payload_bytes=settings.max_payload_bytes)
        self.protocols = registry.protocols(self.policy, settings.lock_manager)
        self.partitioned = partitioned_of(self.protocols)  # sagas ask the lock manager partitioned by key
        self.codec = codec or default_codec()
        self.topics = topics_for(settings)
        self.group_id = f"{settings.topic_prefix}-coordinator"
        self.instance = instance or settings.coordinator_instance
        self.transactional_id = f"{settings.topic_prefix}-coordinator-{self.instance}"
        # Kept across sessions: a member that was active says so again when it rejoins (members.py).
        self.assignor = assignor_for(settings.coordinator_members, self.instance)
        self.standby = isinstance(self.assignor, ActiveStandbyAssignor)
        committing_as = active_transactional_id(settings.topic_prefix) if self.standby else self.transactional_id
        self.committer = Committer(settings, self.codec, committing_as, per_session=not self.standby)
        self.max_records = max_records
        self.transactions = OwnedTransactions(settings, self.topics.tx_state, self.codec)
        self.owned: set[int] = set()  # the partitions the group assigned this member
        self.epoch = 0  # one more each rebalance: a loop begun in an older one commits nothing (rebalance.py)
        # Protocols sharing the lock table; the transactions their restore let go on, woken next loop.
        self.lock_owners = [p for p in self.protocols.values() if isinstance(p, HoldsLocks)]
        self._to_wake: list[str] = []
        self._reannounce_at = 0
        self._publisher: Publisher | None = None  # the session's, for cluster metadata
        self.inputs = ConsumerPositions(self.transactions.positions)  # at the changelog's positions
        self.replies = ReplyTargets(self.topics, lambda: cluster_topics(self._publisher))
        self.stats = CoordinatorStats()
        # The Kafka transaction of the previous loop, committing while the next batch is read and folded.
        self._committing: asyncio.Task[None] | None = None
        self._commit_failure: BaseException | None = None
        self.deferred = Deferred()  # changelog-only loops not committed yet (orchestrator/deferred.py)
        self.observe = observe  # metrics (polycommit.tooling.metrics); a no-op unless the process serves them
        self.trace = tracing.LoopTrace()  # spans of the batch being folded, when tracing is on
        self.writer = TransitionWriter(self.topics, self.codec, self.replies, self.stats, self.trace, observe)
        retention = settings.marker_retention_ms
        self.interactive = InteractiveInputs(self.transactions, self.protocols, self.replies, self.codec, retention)
        if self.partitioned is not None:  # interactive transactions need the member's table: refused
            self.interactive.refuser = registry.interactive_saga(self.policy)

    # -- state ownership ----------------------------------------------------------------------------

    def forget(self, partitions: set[int]) -> None:
        gone = [t for t in self.transactions.states if self.transactions.partition_of(t) in partitions]
        for owner in self.lock_owners:
            self._to_wake.extend(owner.forgotten(gone))
        self.transactions.forget(partitions)

    def forget_all(self) -> None:
        self.deferred.clear()  # its inputs' offsets were never committed: they are read again
        for owner in self.lock_owners:
            owner.forgotten(list(self.transactions.states))
        self._to_wake.clear()
        self.transactions.forget_all()

    async def restore(self, partitions: set[int]) -> None:
        """Fold the changelog partitions this member now owns into its state (once each): after the
        member active before is fenced, so no transaction of its is left open to hold the read back."""
        await self.committer.ready()
        restored = await self.transactions.restore(partitions)
        self.inputs.seek_restored()
        self._to_wake.extend(restore_locks(self.lock_owners, restored))
        self.stats.restored += len(restored)
        self.stats.corrupt_snapshots = self.transactions.corrupt_snapshots
        for state in restored:  # results go only to addresses the cache shows valid: load it for these
            await self.replies.refusal(state["intent"]["reply_to"])

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
                log.warning("coordinator session failed (%r); restoring from the log in %.1fs", exc, delay)
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

    async def _session(self, stop: asyncio.Event, ready: asyncio.Event | None) -> None:
        self.forget_all()  # a session owns nothing until the group assigns it partitions
        publisher = Publisher(self.settings, codec=self.codec, client_id="coordinator")  # metadata; commits: committer
        member = f"coordinator-{self.instance}"
        consumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            client_id="coordinator",
            instance_id=member,  # unique per process (a static member)
            assignors=(self.assignor,),
        )
        await publisher.start()
        await self.committer.session_started()
        self._publisher = publisher
        self.replies.new_batch()  # a new session looks again: the cluster may have changed meanwhile
        await self.replies.load()
        self.transactions.partitions = len(await publisher.partitions(self.topics.intents))
        self.writer.lock_partitions = await publisher.partitions(self.topics.locks)
        inputs = await input_topics(publisher, self.topics, self.partitioned)
        consumer.subscribe(inputs, listener=Rebalance(self))
        self.inputs.consumer = consumer
        await consumer.start()
        watch = GroupWatch(consumer, member)  # aiokafka's stuck rejoin (polycommit/group_watch.py)
        try:
            if ready is not None:
                ready.set()
            async with watch:
                while not stop.is_set():
                    await self._step(consumer)
            await self.flush()
            await self.drain()
            await self.inputs.close(final=True)
        finally:
            await quietly(member, "group offsets copy", self.inputs.close(final=False))
            if self._committing is not None:
                await self.drain(reraise=False)
            self._commit_failure = None
            await stop_consumer(consumer, member, stuck=watch.fired)
            await quietly(member, "transactional producer", self.committer.close())
            await quietly(member, "Kafka producer", publisher.stop())
            self._publisher = self.inputs.consumer = None

    async def _step(self, consumer: AIOKafkaConsumer) -> None:
        wait_ms = self.deferred.wait_ms(now_ms(), 100)
        next_due = self.transactions.next_due_ms()
        if next_due is not None:
            wait_ms = max(0, min(wait_ms, next_due - now_ms()))
        started = time.perf_counter()
        batch = await consumer.getmany(timeout_ms=wait_ms, max_records=self.max_records)
        epoch = self.epoch
        self.trace.batch_read()
        if batch:
            self.observe("batch", sum(len(records) for records in batch.values()), COORDINATOR_LABELS)
        self.replies.new_batch()
        unrestored = {tp.partition for tp in batch} - self.transactions.restored_partitions
        if unrestored:
            await self.restore(unrestored)  # never fold an event over state not yet loaded
        folded = time.perf_counter()
        self.stats.read_s += folded - started
        now = now_ms()
        out: list[Outgoing] = []
        touched: dict[str, TxState] = {}
        positions = self.transactions.positions
        for tp, records in batch.items():
            for record in records:
                if positions.fresh(tp, record.offset):  # below the restored position: folded already
                    await self.consume(record, now, out, touched)
        self._fire_due(now, out, touched)
        if self._commit_failure is not None or (self._committing is not None and self._committing.done()):
            await self.drain()  # surface a failed commit before building on the state it left
        offsets = positions.folded({tp: records[-1].offset + 1 for tp, records in batch.items() if records})
        self.stats.fold_s += time.perf_counter() - folded
        if epoch != self.epoch:
            tracing.end_all(self.trace.take())
            await start_over(self)  # a rebalance ran while this batch was folded
            return
        # Snapshots and offsets wait with what earlier loops put off; they are committed when this loop
        # publishes something else, or DEFER_MS after the first of them (orchestrator/deferred.py).
        self.deferred.put_off(touched, offsets, self.trace.take(), now)
        if out or self.deferred.due(now):
            await self._start_commit(out, self.deferred.take(), epoch)
        self.inputs.maybe_copy(now)

    async def flush(self) -> None:
        """Commit what loops put off now: partitions are given up, or the loop stops (not after a failure)."""
        await self.drain(reraise=False)
        if self.deferred and self.committer.publisher is not None and self._commit_failure is None:
            await self._start_commit([], self.deferred.take())

    async def _start_commit(self, out: list[Outgoing], taken: Taken, epoch: int | None = None) -> None:
        """Commit a loop's records with what earlier loops put off; `epoch`, a loop's, when a rebalance
        may have ended it meanwhile (a flush commits what was folded under the assignment it ends)."""
        touched, offsets, spans = taken
        out.extend(self.transactions.changelog_records(touched))
        out.extend(position_records(self.topics, offsets))
        # One Kafka transaction at a time, but the next batch is read and folded while this one commits.
        await self.drain()
        if epoch is not None and epoch != self.epoch:
            tracing.end_all(spans)
            await start_over(self)  # a rebalance ran while this loop waited for the one before
            return
        self._committing = asyncio.create_task(self._commit(out, offsets, spans))

    async def _commit(self, out: list[Outgoing], offsets: dict[TopicPartition, int], spans: list[Any]) -> None:
        committing = time.perf_counter()
        decided = any(o.topic == self.topics.decisions for o in out)
        try:
            committed = await self.committer.commit(out, decided)
        finally:
            tracing.end_all(spans)
        if committed:  # the group's copy may follow (positions.py)
            self.transactions.positions.committed_now(offsets)
        self.stats.kafka_transactions += 1
        self.stats.commit_s += time.perf_counter() - committing
        self.observe("kafka_transaction", time.perf_counter() - committing, COORDINATOR_LABELS)

    async def consume(self, record: Any, now: int, out: list[Outgoing], touched: dict[str, TxState]) -> None:
        self.trace.received(record)
        try:
            decoded = self.codec.decode(record.value)
            if decoded.event_type == "TransactionIntent" and record.topic == self.topics.intents:
                await self._on_intent(decoded.record, record, now, out, touched)  # type: ignore[arg-type]
            elif decoded.event_type == "OperatorCommand" and record.topic == self.topics.intents:
                self._on_operator(decoded.record, record, now, out, touched)  # type: ignore[arg-type]
            elif decoded.event_type == "StepOutcome" and record.topic == self.topics.outcomes:
                self.stats.outcomes += 1  # its transaction may have ended (its state is gone): then a no-op
                event: Event = OutcomeReceived(decoded.record)  # type: ignore[arg-type]
                self._decide(decoded.record["tx_id"], event, record, now, out, touched)
            elif decoded.event_type == "LockPartitionGrant" and record.topic == self.topics.lock_grants:
                event = granted(self.partitioned, decoded.record)  # type: ignore[arg-type]
                self._decide(decoded.record["tx_id"], event, record, now, out, touched)
            elif decoded.event_type in INPUTS and record.topic in (self.topics.intents, self.topics.deadlocks):
                await self._on_interactive(decoded.event_type, decoded.record, record, now, out, touched)
            else:
                raise CodecError(f"a {decoded.event_type} does not belong on {record.topic}")
        except (CodecError, ProtocolError) as exc:
            self.stats.dead_letters += 1
            self.observe("dead_letter", 1, COORDINATOR_LABELS)
            tx_id = record.key.decode(errors="replace") if record.key else None  # records are keyed by tx id
            letter = dead_letter(record, exc, "coordinator", tx_id)
            out.append(
                Outgoing(self.topics.dead_letters, tx_id or f"{record.topic}/{record.offset}", "DeadLetter", letter)
            )
        finally:
            self.trace.decided()

    async def _on_intent(
        self, intent: TransactionIntent, record: Any, now: int, out: list[Outgoing], touched: dict[str, TxState]
    ) -> None:
        self.stats.intents += 1
        intent, malformed = canonical_or_refusal(intent)
        tx_id = intent["tx_id"]
        if tx_id in self.transactions:  # the protocol decides what its intent arriving again means
            self.interactive.intent_arrived(tx_id, bytes(record.value))
            self._decide(tx_id, IntentReceived(intent), record, now, out, touched)
            return
        protocol = self.protocols[registry.protocol_name(intent)]
        refusal = (
            malformed
            or key_refusal(record.key, tx_id)
            or expiry_refusal(intent, now, self.settings.marker_retention_ms)
            or await self.replies.refusal(intent["reply_to"])
        )
        if refusal is not None:
            # Never admitted: no state, no changelog record (a wrong key may name another member's partition).
            self.writer.publish(protocol.start(intent, now, refusal), record, out)
            return
        self.transactions.admit(tx_id, bytes(record.value))
        self._apply(protocol.start(intent, now), None, record, out, touched, now)

    async def _on_interactive(
        self, kind: str, event: Any, record: Any, now: int, out: list[Outgoing], touched: dict[str, TxState]
    ) -> None:
        """A lock request or a deadlock verdict (orchestrator/interactive_inputs.py)."""
        before, t = await self.interactive.transition(kind, event, record, now)
        if t is not None and before is None and t.result is not None:
            self.writer.publish(t, record, out)  # refused before it opened: no state, no changelog record
        elif t is not None:
            self._apply(t, before, record, out, touched, now)

    def _on_operator(
        self, command: OperatorCommand, record: Any, now: int, out: list[Outgoing], touched: dict[str, TxState]
    ) -> None:
        tx_id = command["tx_id"]
        if tx_id not in self.transactions:  # ended (its state is not kept), unknown, or keyed to another member
            alert = operator.refusal(command, "no such transaction in flight", now)
            out.append(Outgoing(self.topics.alerts, tx_id, "Alert", alert))
            return
        self._decide(tx_id, OperatorReceived(command), record, now, out, touched)

    def _fire_due(self, now: int, out: list[Outgoing], touched: dict[str, TxState]) -> None:
        if now >= self._reannounce_at:  # every current wait again, for a detector that (re)starts
            self._reannounce_at = now + REANNOUNCE_MS
            out.extend(self.writer.lock_events(waits_of(self.protocols, now)))
        woken, self._to_wake = self._to_wake, []
        for tx_id in woken:
            self._decide(tx_id, LocksGranted(), None, now, out, touched)
        for state in list(self.transactions.due(now)):
            self._decide(state["intent"]["tx_id"], TimerDue(), None, now, out, touched)

    def _decide(
        self, tx_id: str, event: Event, record: Any, now: int, out: list[Outgoing], touched: dict[str, TxState]
    ) -> None:
        state = self.transactions.get(tx_id)
        if state is not None:
            protocol = self.protocols[registry.protocol_of(state)]
            self._apply(protocol.decide(state, event, now), state, record, out, touched, now)

    def _apply(
        self,
        transition: Transition,
        before: TxState | None,
        record: Any,
        out: list[Outgoing],
        touched: dict[str, TxState],
        now: int,
    ) -> None:
        state = transition.state
        tx_id = state["intent"]["tx_id"]
        if state is before and not transition.publishes():
            return  # a late or duplicate event: nothing changed
        touched[tx_id] = state
        self.transactions.keep(state)
        self.writer.publish(transition, record, out)
        for woken in transition.wake:  # their locks were this one's: they go on in the same Kafka transaction
            self._decide(woken, LocksGranted(), None, now, out, touched)
        for cycle in transition.cycles:  # a deadlock of two it closed: the victim ends now, not on a verdict
            before, judged = self.interactive.closed_cycle(cycle, now)
            if judged is not None:
                self._apply(judged, before, None, out, touched, now)
