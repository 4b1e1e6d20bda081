"""The deadlock detector process: a faust-streaming agent that folds `polycommit.locks` into the wait-for
graph (projections/wait_for.py) and publishes a DeadlockVerdict per cycle on `polycommit.deadlocks`.

Delivery is at least once (faust's exactly-once mode has open bugs, so nothing here depends on it): a
redelivered lock event changes nothing in the graph, and a verdict seen twice is harmless because the
coordinator aborts a victim only while it still waits for a lock. The graph lives in memory: each start
joins a group of its own and reads the topic from its end, not from offsets committed by a predecessor
and not from the beginning (the topic is kept long: `polycommit check` reads it for a key's writers in
grant order, and folding that history at every start took minutes). Every coordinator member announces
each wait it still has again every REANNOUNCE_MS, so a started detector holds every current wait within
that period; cycles of two are judged by the coordinator itself meanwhile, and the lock-wait timeout still
ends any deadlock the detector did not see: a lost graph delays a verdict but never loses a transaction.

Faust's Kafka consumer is aiokafka's, and can be left stuck rejoining its group after a broker restart
(polycommit/group_watch.py): the detector would then read nothing and judge nothing. A group watch over it
ends such a session: the app is stopped and a new one (a new group, from the end) starts; the graph is
kept, and the waits are announced again anyway.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from polycommit import lock_log
from polycommit.bus import topics_for
from polycommit.codec import EventCodec, default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.events import DeadlockVerdict, now_ms
from polycommit.group_watch import (
    REJOIN_DEADLINE_S,
    STOP_DEADLINE_S,
    GroupStuckError,
    GroupWatch,
    coordination_task,
)
from projections.wait_for import CATCH_UP_MS, REJUDGE_AFTER_MS, Verdict, WaitForGraph

log = logging.getLogger(__name__)

BATCH_EVENTS = 1000
BATCH_WITHIN_S = 0.01  # a verdict within ~10 ms of the event that closed the cycle
IDLE_FORGET_MS = 10 * 60_000


@dataclass
class DetectorStats:
    events: int = 0
    skipped: int = 0  # older than the catch-up window when the detector started
    corrupt: int = 0
    verdicts: int = 0


def verdict_record(verdict: Verdict, at_ms: int) -> DeadlockVerdict:
    return {"cycle": list(verdict.cycle), "victim": verdict.victim, "scores": dict(verdict.scores), "at_ms": at_ms}


def _credentials(settings: Settings) -> faust.SASLCredentials | None:
    """faust's form of the SASL settings every polycommit Kafka client uses (polycommit.kafka_client)."""
    kafka = settings.kafka
    if not kafka.sasl or kafka.credentials is None:
        return None
    ssl_context = None
    if kafka.security_protocol == "SASL_SSL":
        from aiokafka.helpers import create_ssl_context

        ssl_context = create_ssl_context(
            cafile=kafka.ssl_cafile, certfile=kafka.ssl_certfile, keyfile=kafka.ssl_keyfile
        )
    return faust.SASLCredentials(
        username=kafka.credentials.username,
        password=kafka.credentials.password,
        mechanism=kafka.sasl_mechanism,
        ssl_context=ssl_context,
    )


class Detector:
    """Owns the faust app, the graph and the codec; `run` starts the app and stops it with `stop`."""

    def __init__(self, settings: Settings, codec: EventCodec | None = None, data_dir: Path | None = None) -> None:
        settings = settings.as_role("detector")  # reads locks, writes verdicts: nothing else (ACLs)
        self.settings = settings
        self.codec = codec or default_codec()
        self.topics = topics_for(settings)
        self.graph = WaitForGraph()
        self.stats = DetectorStats()
        # Events stamped before this instant are skipped (one from a producer whose clock is far behind,
        # or written long before it was delivered): a wait still current is announced again since.
        self.skip_before_ms: int | None = None
        self.data_dir = data_dir
        self.rejoin_deadline_s = REJOIN_DEADLINE_S
        self.sessions = 0  # sessions ended by the group watch, each followed by a new one
        self.restarted = asyncio.Event()  # set when a new session's app is built
        self.app = self._build_app()

    def _build_app(self) -> faust.App:
        """A faust app for one session: a group of its own (a fresh name), reading `locks` from its end."""
        settings = self.settings
        app = faust.App(
            f"{settings.topic_prefix}-detector-{uuid.uuid4().hex[:12]}",
            broker=[f"kafka://{address.strip()}" for address in settings.kafka.bootstrap.split(",")],
            broker_credentials=_credentials(settings),
            datadir=str(self.data_dir or settings.home / "data" / "detector"),
            web_enabled=False,
            topic_disable_leader=True,  # no leader topic: the app has no tables and no assignor state
            topic_allow_declare=False,  # polycommit creates its topics; the detector only reads and writes
            consumer_auto_offset_reset="latest",  # the group is new: from now on (waits are re-announced)
            producer_acks=-1,
        )
        locks = app.topic(self.topics.locks, key_serializer="raw", value_serializer="raw")
        self.verdict_topic = app.topic(self.topics.deadlocks, key_serializer="raw", value_serializer="raw")
        app.agent(locks, name="wait-for-graph")(self._agent)
        app.on_partitions_assigned.connect(self._on_assigned)
        self.assigned = asyncio.Event()  # its partitions are positioned: what is published now, it reads
        # Verdicts also when no lock event comes: a deadlock whose victim was not aborted (its verdict
        # was stale when it arrived) is judged again once REJUDGE_AFTER_MS has passed (projections/wait_for).
        app.timer(interval=REJUDGE_AFTER_MS / 2000, on_leader=False)(self._tick)
        return app

    async def _on_assigned(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """The app's `on_partitions_assigned` signal (args: the assignment). Resolve each partition's
        position now (the end of the topic: `latest`), so a caller told `ready` knows that what it
        publishes from then on is read."""
        assigned: Set[TP] = args[0]
        for tp in assigned:
            await self.app.consumer.position(tp)
        self.assigned.set()

    async def _agent(self, stream: Any) -> AsyncIterator[None]:
        async for values in stream.take(BATCH_EVENTS, within=BATCH_WITHIN_S):
            await self.fold(values)
            yield None

    async def _tick(self) -> None:
        await self.fold([])

    async def fold(self, values: list[bytes]) -> list[DeadlockVerdict]:
        """Fold a batch of raw lock events and publish the verdicts it makes (also called by tests)."""
        for value in values:
            try:
                lock_record = self.codec.decode_as(value, "LockEvent")
            except CodecError:
                self.stats.corrupt += 1  # not a lock event of ours: the graph cannot use it
                continue
            if self.skip_before_ms is not None and lock_record["at_ms"] < self.skip_before_ms:
                self.stats.skipped += 1
                continue
            for lock_event in lock_log.expand(lock_record):  # one event per resource (a record may carry several)
                self.graph.apply(lock_event)
                self.stats.events += 1
        now = now_ms()
        records = [verdict_record(v, now) for v in self.graph.verdicts(now)]
        for record in records:
            encoded = self.codec.encode("DeadlockVerdict", record)
            await self.verdict_topic.send(key=record["victim"].encode(), value=encoded)
            log.info("deadlock %s: victim %s", " -> ".join(record["cycle"]), record["victim"])
        self.stats.verdicts += len(records)
        self.graph.forget_idle(now, IDLE_FORGET_MS)
        return records

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        while True:
            self.skip_before_ms = now_ms() - CATCH_UP_MS
            await self.app.start()
            try:
                async with GroupWatch(FaustKafkaConsumer(self.app), "detector", self.rejoin_deadline_s):
                    await self.assigned.wait()
                    if ready is not None:
                        ready.set()
                    await stop.wait()
                return
            except GroupStuckError as exc:
                log.warning("%s: a new session, in a new group", exc)
                self.sessions += 1
                # Stopping the consumer waits for its coordination task, which a stuck member never ends:
                # cancelled, the app stops and its thread ends (left alone, the thread outlived the session,
                # spinning, and kept the process from exiting).
                FaustKafkaConsumer(self.app).cancel_coordination()
            finally:
                await self._stop_app()
            self.app = self._build_app()
            self.restarted.set()

    async def _stop_app(self) -> None:
        """Stop the app, giving up after STOP_DEADLINE_S: a stuck member may never finish leaving."""
        try:
            await asyncio.wait_for(self.app.stop(), STOP_DEADLINE_S)
        except TimeoutError:
            log.warning("detector: its faust app did not stop within %.0f s; abandoned", STOP_DEADLINE_S)


class FaustKafkaConsumer:
    """The aiokafka consumer in faust's consumer thread, as the group watch looks at it: looked up at each
    look (it exists once the app's consumer has started). The one place that knows faust's aiokafka driver
    from inside (private attributes: neither library has a public health signal). Read across threads, as
    a flag is: a stale read only delays the watch by one poll."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    @property
    def _thread(self) -> Any:
        return getattr(self.app.consumer, "_thread", None)

    @property
    def _consumer(self) -> Any:
        return getattr(self._thread, "_consumer", None)

    @property
    def _coordinator(self) -> Any:  # what the group watch reads (polycommit.group_watch.wants_rejoin)
        return getattr(self._consumer, "_coordinator", None)

    def cancel_coordination(self) -> None:
        """Cancel aiokafka's group coordination task, in the consumer thread's own loop."""
        task = coordination_task(self._consumer)
        loop = getattr(self._thread, "thread_loop", None)
        if task is not None and loop is not None:
            loop.call_soon_threadsafe(task.cancel)
