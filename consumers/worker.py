"""The consume loop every store's consumer group runs: commands in, one store round trip per batch, outcomes out.

Offsets are committed only after the batch's outcomes are acknowledged by the broker, so a crash at any
point redelivers the batch; the store's applied-step markers make that redelivery change nothing (P4).
A record that cannot be decoded or names an invalid operation becomes a dead letter (P7) and the loop
goes on; an invalid operation also gets a FAILED outcome, so its saga compensates instead of hanging.
Each command's operations are parsed and validated here, once (`consumers.command.parse_command`); the
participant takes the typed commands and checks nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumers import timing
from consumers.base import Participant, failed
from consumers.command import TypedCommand, parse_command
from consumers.held import HeldOffsets
from polycommit import tracing
from polycommit.bus import Outgoing, Publisher, make_consumer, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.deadletters import dead_letter
from polycommit.errors import CodecError, PolycommitError, StoreUnavailableError
from polycommit.events import StepOutcome, StoreCommand
from polycommit.failpoints import failpoint
from polycommit.group_watch import REJOIN_DEADLINE_S, GroupWatch, quietly, stop_consumer

log = logging.getLogger(__name__)

# Under load a consumer commits its offsets at most this often, not after every batch; idle, at once. A
# commit is one more Kafka request per batch for every consumer, and requests are what the broker and the
# consumers spend their CPU on at low concurrency: measured (alternated, 3 rounds each) c=1 p50 23-28 vs
# 27-29 ms, c=32 392-399 vs 359-414 TPS. A crash redelivers at most this much more, which the markers make
# a no-op (as they always did for a batch applied but not yet committed).
COMMIT_EVERY_S = 0.1


@dataclass
class WorkerStats:
    records: int = 0
    restarts: int = 0
    abandoned_consumers: int = 0  # Kafka consumers left behind: not stopped within STOP_DEADLINE_S, or failing to
    batches: int = 0
    commands: int = 0
    dead_letters: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    # Where the loop's time goes (seconds, cumulative).
    read_s: float = 0.0
    apply_s: float = 0.0
    publish_s: float = 0.0
    commit_s: float = 0.0


class StoreWorker:
    """One member of a store's consumer group (`polycommit-<store>`)."""

    def __init__(
        self,
        settings: Settings,
        participant: Participant,
        *,
        batch_size: int = 500,
        group_id: str | None = None,
        codec: EventCodec | None = None,
        on_batch: Callable[[list[StepOutcome]], None] | None = None,
        observe: tracing.Observe = tracing.ignore,
    ) -> None:
        self.settings = settings
        self.participant = participant
        self.store = participant.store
        self.batch_size = batch_size
        self.group_id = group_id or f"{settings.topic_prefix}-{participant.store}"
        # A static member name only in the store's own group (a replay under another group stays dynamic).
        instance = settings.consumer_instance
        self.instance_id = f"{participant.store}-{instance}" if instance and group_id is None else None
        self.codec = codec or default_codec()
        self.topics = topics_for(settings)
        self.stats = WorkerStats()
        self.on_batch = on_batch
        self.observe = observe  # metrics (polycommit.tooling.metrics); a no-op unless the process serves them
        self._labels = {"process": participant.store, "store": participant.store}
        self.name = f"{self.store}-worker"
        self.rejoin_deadline_s = REJOIN_DEADLINE_S  # how long the member may stay stuck rejoining its group
        self._catch_up: tuple[dict[Any, int], asyncio.Event] | None = None
        self._committing: asyncio.Task[None] | None = None  # the previous batch's offset commit
        self._publishing: asyncio.Task[None] | None = None  # the previous batch's outcomes, until acked
        self.held = HeldOffsets()  # what may be committed while the participant holds commands back
        self._commit_started = 0.0  # when the last offset commit started (perf_counter)
        self._committed_offsets: dict[Any, int] = {}  # what it committed (this session)
        self._read_at_ns = 0  # when the batch in hand was fetched (the trace's command fetch hop ends there)

    async def caught_up(self, end_offsets: dict[Any, int]) -> None:
        """Wait until this member has consumed every partition up to `end_offsets` (used by replays and
        tests: the positions, not record counts, since transaction markers take offsets too)."""
        event = asyncio.Event()
        self._catch_up = (end_offsets, event)
        await event.wait()

    async def _check_caught_up(self, consumer: Any) -> None:
        if self._catch_up is None:
            return
        ends, event = self._catch_up
        assigned = consumer.assignment()
        for tp, end in ends.items():
            if tp not in assigned or await consumer.position(tp) < end:
                return
        await self._committed()  # caught up means its outcomes are out and its offsets committed
        event.set()

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until `stop`; when Kafka fails under it, or its store cannot be reached when a session
        starts, start a new session from the committed offsets (whatever was applied but not committed
        is redelivered, and the markers make that a no-op)."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._session(stop, ready)
            except (KafkaError, OSError, StoreUnavailableError) as exc:
                self.stats.restarts += 1
                log.warning(
                    "%s session failed (%s: %s); restarting in %.1fs", self.name, type(exc).__name__, exc, delay
                )
                await asyncio.sleep(delay)  # backoff while the broker comes back
                delay = min(delay * 2, 10.0)
            else:
                return

    async def _session(self, stop: asyncio.Event, ready: asyncio.Event | None) -> None:
        consumer = make_consumer(
            self.settings,
            self.topics.commands(self.store),
            group_id=self.group_id,
            client_id=self.name,
            instance_id=self.instance_id,
        )
        publisher = Publisher(self.settings, codec=self.codec, client_id=self.name)
        await self._start(consumer, publisher)
        self.held.clear()
        self._committed_offsets = {}
        # A member aiokafka leaves stuck rejoining its group ends the session (polycommit/group_watch.py).
        watch = GroupWatch(consumer, self.name, self.rejoin_deadline_s)
        try:
            if ready is not None:
                ready.set()
            async with watch:
                while not stop.is_set():
                    started = time.perf_counter()
                    batch = await consumer.getmany(timeout_ms=100, max_records=self.batch_size)
                    self._read_at_ns = tracing.now_ns()
                    self._observe_fetch(consumer, batch)
                    self.stats.read_s += time.perf_counter() - started
                    records = [r for part in batch.values() for r in part]
                    if not records:  # idle: what is handled gets committed now
                        await self._commit_handled(consumer)
                        await self._check_caught_up(consumer)
                        continue
                    for tp, rs in batch.items():
                        if rs:
                            self.held.handled(tp, rs[-1].offset + 1)
                    await self._handle(records, publisher)
                    if time.perf_counter() - self._commit_started >= COMMIT_EVERY_S or self._catch_up is not None:
                        await self._commit_handled(consumer)
                    await self._check_caught_up(consumer)
            await self._commit_handled(consumer)
            await self._committed()
        finally:
            # The session failed (or stops after a failure): what was not committed is redelivered, and
            # the markers make it a no-op.
            pending = [t for t in (self._publishing, self._committing) if t is not None]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._publishing = self._committing = None
            if not await stop_consumer(consumer, self.name, stuck=watch.fired):
                self.stats.abandoned_consumers += 1
            await quietly(self.name, "Kafka producer", publisher.stop())
            await quietly(self.name, f"{self.store} connections", self.participant.close())

    async def _start(self, consumer: Any, publisher: Publisher) -> None:
        """Start the store's connections, the producer and the consumer. A failed start leaves nothing open
        for the next session, and its own error is the one raised (a close failing is only logged)."""
        await self.participant.start()
        try:
            await publisher.start()
            try:
                await consumer.start()
            except BaseException:
                await quietly(self.name, "Kafka consumer", consumer.stop())  # connected before it failed, maybe
                await quietly(self.name, "Kafka producer", publisher.stop())
                raise
        except BaseException:
            await quietly(self.name, f"{self.store} connections", self.participant.close())
            raise

    async def _commit_handled(self, consumer: Any) -> None:
        """Start committing the offsets of what was handled since the last commit, if anything (after the
        commit in flight: one at a time, in batch order)."""
        await self._committed()
        assigned = consumer.assignment()  # a partition given away since is not ours to commit
        offsets = {tp: o for tp, o in self.held.offsets().items() if tp in assigned}
        if offsets == self._committed_offsets:
            return
        self._committed_offsets, self._commit_started = offsets, time.perf_counter()
        self._committing = asyncio.create_task(self._commit(consumer, offsets, self._publishing))

    async def _commit(self, consumer: Any, offsets: dict[Any, int], published: asyncio.Task[None] | None) -> None:
        """Commit offsets once the outcomes of their batches are acked (`published`), while the next batch is
        fetched and applied: the commit round trip is no longer a wait before every batch (a crash before
        it lands only redelivers those batches, which the markers make a no-op)."""
        if published is not None:
            await published
        started = time.perf_counter()
        await consumer.commit(offsets)
        self.stats.commit_s += time.perf_counter() - started

    async def _committed(self) -> None:
        """Wait for the previous batch's offset commit; its failure ends the session, as it always did."""
        task, self._committing = self._committing, None
        if task is not None:
            await task

    async def _handle(self, records: list[Any], publisher: Publisher) -> None:
        commands: list[StoreCommand] = []
        sources: list[Any] = []
        out: list[Outgoing] = []
        for record in records:
            try:
                decoded: Any = self.codec.decode_as(record.value, "StoreCommand")
            except CodecError as exc:
                # Records are keyed by transaction id: name it, so the operator can find the saga (which
                # times out and compensates, since its command can never run).
                key = record.key.decode(errors="replace") if record.key else None
                out.append(self._dead(record, exc, key))
                continue
            commands.append(decoded)
            sources.append(record)
        valid, positions, early = self._parse(commands)
        outcomes: list[StepOutcome | None] = list(early)
        started, applying = time.perf_counter(), tracing.now_ns()
        for position, result in zip(positions, await self._apply(valid), strict=True):
            outcomes[position] = result
        self.stats.apply_s += time.perf_counter() - started
        failpoint("worker.after_apply")
        spans = self._trace(sources, applying)
        for record, command, maybe, span in zip(sources, commands, outcomes, spans, strict=True):
            if maybe is None:  # held by the participant (a phase 2 waiting for others): published when released
                self.held.hold(_step(command), TopicPartition(record.topic, record.partition), record.offset)
                continue
            step_outcome: StepOutcome = maybe
            traced = tracing.headers_of(span)
            out.append(Outgoing(self.topics.outcomes, command["tx_id"], "StepOutcome", step_outcome, headers=traced))
            error = step_outcome["error"]
            if step_outcome["status"] == "FAILED" and error is not None and not error["retriable"]:
                poison = PolycommitError(f"{error['error_class']}: {error['message']}")
                out.append(self._dead(record, poison, command["tx_id"], error["error_class"]))
            status = step_outcome["status"]
            self.stats.outcomes[status] = self.stats.outcomes.get(status, 0) + 1
        # Outcomes of commands held by earlier batches that this one settled (PostgreSQL's batched 2PC).
        released = self.participant.released()
        self.held.release(_step(o) for o in released)
        out.extend(Outgoing(self.topics.outcomes, o["tx_id"], "StepOutcome", o) for o in released)
        await self._published()  # the batch before goes out first: outcomes leave in batch order
        done = [o for o in outcomes if o is not None]
        self._publishing = asyncio.create_task(self._publish(publisher, out, spans, sources, done))
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.commands += len(commands)

    async def _publish(
        self, publisher: Publisher, out: list[Outgoing], spans: list[Any], sources: list[Any], done: list[StepOutcome]
    ) -> None:
        """Publish a batch's outcomes and wait for Kafka's ack while the next batch is fetched and applied
        (the store round trip no longer waits for the ack). Its offsets are committed only after this
        (`_commit`), so a crash before the ack still redelivers the batch, which the markers make a no-op."""
        started = time.perf_counter()
        await publisher.publish_and_wait(out)
        tracing.end_all(spans)
        acked_ms = tracing.now_ns() / 1e6
        for record in sources:  # each command's trip: the coordinator's send to its outcome acked
            self.observe("step", max(0.0, acked_ms - record.timestamp) / 1000, self._labels)
        self.stats.publish_s += time.perf_counter() - started
        failpoint("worker.after_publish")
        if self.on_batch is not None:
            self.on_batch(done)

    async def _published(self) -> None:
        """Wait for the previous batch's outcomes to be acked; a failure ends the session."""
        task, self._publishing = self._publishing, None
        if task is not None:
            await task

    def _observe_fetch(self, consumer: Any, batch: dict[Any, list[Any]]) -> None:
        """Batch size, and the lag the fetch left: records past the last one fetched, up to the high watermark."""
        if batch:
            self.observe("batch", sum(len(records) for records in batch.values()), self._labels)
            lag = sum(max(0, (consumer.highwater(tp) or 0) - records[-1].offset - 1) for tp, records in batch.items())
            self.observe("consumer_lag", lag, self._labels)
        else:  # an empty fetch: nothing was waiting
            self.observe("consumer_lag", 0, self._labels)

    def _trace(self, records: list[Any], applying_ns: int) -> list[Any]:
        """Each command's fetch and apply spans, and its outcome's publish span (open), when traced."""
        if not tracing.enabled():
            return [None] * len(records)
        window, attributes = (
            (applying_ns, tracing.now_ns()),
            {"polycommit.store": self.store, "polycommit.batch_size": len(records)},
        )
        return [tracing.consumer_hops(record, self._read_at_ns, window, attributes) for record in records]

    def _parse(self, commands: list[StoreCommand]) -> tuple[list[TypedCommand], list[int], list[StepOutcome | None]]:
        """Parse every command once, refusing those no store could run before they reach the store (and
        its batch); the participant gets typed commands and checks nothing twice."""
        begun = timing.started()
        valid: list[TypedCommand] = []
        positions: list[int] = []
        early: list[StepOutcome | None] = [None] * len(commands)
        for position, command in enumerate(commands):
            try:
                typed = parse_command(command, self.store, self.settings.max_payload_bytes)
            except PolycommitError as exc:
                early[position] = failed(command, self.store, exc, timing.since(begun))
                continue
            valid.append(typed)
            positions.append(position)
        return valid, positions, early

    async def _apply(self, commands: list[TypedCommand]) -> list[StepOutcome | None]:
        """Apply a batch; while the store is unreachable, wait and try the same batch again."""
        delay = 0.2
        while True:
            try:
                return await self.participant.apply_any(commands) if commands else []
            except StoreUnavailableError as exc:
                log.warning("%s unavailable, retrying the batch in %.1fs: %s", self.store, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                try:
                    await self.participant.close()
                    await self.participant.start()
                except StoreUnavailableError:
                    continue

    def _dead(self, record: Any, exc: BaseException, tx_id: str | None, error_class: str | None = None) -> Outgoing:
        self.stats.dead_letters += 1
        self.observe("dead_letter", 1, self._labels)
        letter = dead_letter(record, exc, self.name, tx_id)
        if error_class is not None:
            letter["error_class"] = error_class
        key = tx_id or f"{record.topic}/{record.partition}/{record.offset}"
        return Outgoing(self.topics.dead_letters, key, "DeadLetter", letter)


def _step(event: StoreCommand | StepOutcome) -> tuple[str, int, str]:
    return event["tx_id"], event["step_index"], event["action"]
