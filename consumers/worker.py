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

from aiokafka.errors import KafkaError

from consumers import timing
from consumers.base import Participant, failed
from consumers.command import TypedCommand, parse_command
from polycommit.bus import Outgoing, Publisher, make_consumer, topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.deadletters import dead_letter
from polycommit.errors import CodecError, PolycommitError, StoreUnavailableError
from polycommit.events import StepOutcome, StoreCommand
from polycommit.failpoints import failpoint

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    records: int = 0
    restarts: int = 0
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
        self.name = f"{self.store}-worker"
        self._catch_up: tuple[dict[Any, int], asyncio.Event] | None = None

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
        event.set()

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run until `stop`; when Kafka fails under it, start a new session from the committed offsets
        (whatever was applied but not committed is redelivered, and the markers make that a no-op)."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._session(stop, ready)
            except (KafkaError, OSError) as exc:
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
        await self.participant.start()
        await publisher.start()
        await consumer.start()
        try:
            if ready is not None:
                ready.set()
            while not stop.is_set():
                started = time.perf_counter()
                batch = await consumer.getmany(timeout_ms=100, max_records=self.batch_size)
                self.stats.read_s += time.perf_counter() - started
                records = [r for part in batch.values() for r in part]
                if not records:
                    await self._check_caught_up(consumer)
                    continue
                await self._handle(records, publisher)
                started = time.perf_counter()
                await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
                self.stats.commit_s += time.perf_counter() - started
                await self._check_caught_up(consumer)
        finally:
            await consumer.stop()
            await publisher.stop()
            await self.participant.close()

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
        started = time.perf_counter()
        for position, result in zip(positions, await self._apply(valid), strict=True):
            outcomes[position] = result
        self.stats.apply_s += time.perf_counter() - started
        failpoint("worker.after_apply")
        for record, command, maybe in zip(sources, commands, outcomes, strict=True):
            assert maybe is not None
            step_outcome: StepOutcome = maybe
            out.append(Outgoing(self.topics.outcomes, command["tx_id"], "StepOutcome", step_outcome))
            error = step_outcome["error"]
            if step_outcome["status"] == "FAILED" and error is not None and not error["retriable"]:
                poison = PolycommitError(f"{error['error_class']}: {error['message']}")
                out.append(self._dead(record, poison, command["tx_id"], error["error_class"]))
            status = step_outcome["status"]
            self.stats.outcomes[status] = self.stats.outcomes.get(status, 0) + 1
        started = time.perf_counter()
        await publisher.publish_and_wait(out)
        self.stats.publish_s += time.perf_counter() - started
        failpoint("worker.after_publish")
        self.stats.batches += 1
        self.stats.records += len(records)
        self.stats.commands += len(commands)
        if self.on_batch is not None:
            self.on_batch([o for o in outcomes if o is not None])

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

    async def _apply(self, commands: list[TypedCommand]) -> list[StepOutcome]:
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
        letter = dead_letter(record, exc, self.name, tx_id)
        if error_class is not None:
            letter["error_class"] = error_class
        key = tx_id or f"{record.topic}/{record.partition}/{record.offset}"
        return Outgoing(self.topics.dead_letters, key, "DeadLetter", letter)
