"""`polycommit bench --fold`: the coordinator's CPU per saga, with nothing else running.

At saturation the coordinator is the largest part of a saga's CPU (docs/latency.md), and a live benchmark
moves ±20 % from run to run on a small machine, more than most changes to the coordinator. This folds the
benchmark's sagas through a real `CoordinatorService` in this process, without Kafka or stores: each
intent is decoded and folded, each output record encoded, and an APPLIED outcome per command (encoded as
a consumer would) is decoded and folded until the saga's result and tombstone are out. What it reports is
the coordinator's own work per saga, phase by phase; what it leaves out is the Kafka client's (fetches,
produce requests, transactions) and the event loop's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from consumers.base import Timing, outcome
from orchestrator.protocol import TxState
from orchestrator.service import CoordinatorService
from polycommit.bus import Outgoing, encoded
from polycommit.config import Settings
from polycommit.events import STORES, now_ms
from polycommit.tooling import gc_tuning
from polycommit.tooling.bench_workload import saga_of, writes

PHASES = ("intents", "commands", "outcomes", "results")


@dataclass(frozen=True)
class InputRecord:
    """What the coordinator reads of a Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: int
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class FoldCost:
    sagas: int = 0
    completed: int = 0
    records_out: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def per_saga_us(self) -> dict[str, float]:
        per = {phase: round(s / max(self.sagas, 1) * 1e6, 1) for phase, s in self.seconds.items()}
        per["total"] = round(sum(self.seconds.values()) / max(self.sagas, 1) * 1e6, 1)
        return per


class OfflineCoordinator:
    """A coordinator service fed records by hand: partition 0 owned and restored, reply topics known."""

    def __init__(self, settings: Settings) -> None:
        self.service = CoordinatorService(settings)
        self.topics = self.service.topics
        self.service.transactions.restored_partitions.add(0)
        self.service.replies.fetch = self._cluster_topics
        self._offsets: dict[str, int] = {}

    async def _cluster_topics(self) -> Mapping[str, Collection[int]]:
        return {self.topics.replies: {0}}

    async def start(self) -> None:
        await self.service.replies.load()

    async def fold(self, topic: str, keyed_values: list[tuple[bytes, bytes]], now: int) -> list[Outgoing]:
        """Fold records of `topic` as one loop would; the loop's output records, snapshots and tombstones
        included (encoded as the loop's Kafka transaction encodes them)."""
        out: list[Outgoing] = []
        touched: dict[str, TxState] = {}
        for key, value in keyed_values:
            offset = self._offsets.get(topic, 0)
            self._offsets[topic] = offset + 1
            await self.service.consume(InputRecord(topic, 0, offset, key, value, now), now, out, touched)
        return [*out, *self.service.transactions.changelog_records(touched)]

    def encode(self, out: list[Outgoing]) -> int:
        """Encode `out` as the loop's Kafka transaction does."""
        for item in out:
            encoded(self.service.codec, item)
        return len(out)


async def measure_fold(
    settings: Settings, sagas: int, wave: int = 32, warm: int = 512, *, tune_gc: bool = False
) -> FoldCost:
    """Fold `warm` sagas, then `sagas` more measured, `wave` at a time (intents in one loop, then the
    outcomes in another), as the coordinator sees them at that concurrency. `tune_gc`: the collector
    as the coordinator's process sets it (polycommit/tooling/gc_tuning.py), for a process of its own."""
    offline = OfflineCoordinator(settings)
    await offline.start()
    if tune_gc:
        gc_tuning.apply()
    await fold_sagas(offline, writes("fold-warm", warm), wave, FoldCost())
    if tune_gc:
        gc_tuning.settle()  # as a running process does once it is up
    cost = FoldCost()
    await fold_sagas(offline, writes("fold", sagas), wave, cost)
    return cost


async def fold_sagas(offline: OfflineCoordinator, items: list[Any], wave: int, cost: FoldCost) -> None:
    """Fold the benchmark's saga of each item, `wave` per loop, adding the time of each phase to `cost`."""
    codec, topics = offline.service.codec, offline.topics
    built = [saga_of(item) for item in items]
    intents = [
        (s.tx_id.encode(), codec.encode("TransactionIntent", s.intent(f"{topics.replies}:0", "bench"))) for s in built
    ]
    clock = time.perf_counter
    for start in range(0, len(intents), wave):
        now = now_ms()
        began = clock()
        out = await offline.fold(topics.intents, intents[start : start + wave], now)
        folded = clock()
        cost.records_out += offline.encode(out)
        encoded = clock()
        outcomes = _applied(offline, out, now)
        reported = clock()
        results = await offline.fold(topics.outcomes, outcomes, now)
        ended = clock()
        cost.records_out += offline.encode(results)
        cost.seconds["intents"] += folded - began
        cost.seconds["commands"] += encoded - folded
        cost.seconds["outcomes"] += ended - reported
        cost.seconds["results"] += clock() - ended
        cost.completed += sum(1 for o in results if o.topic == topics.results and o.record["status"] == "COMPLETED")
    cost.sagas += len(intents)


def _applied(offline: OfflineCoordinator, out: list[Outgoing], now: int) -> list[tuple[bytes, bytes]]:
    """An APPLIED outcome for every command of `out`, encoded as its store's consumer sends it."""
    codec = offline.service.codec
    store_of = {offline.topics.commands(store): store for store in STORES}
    timing = Timing(now, 100)
    return [
        (o.key.encode(), codec.encode("StepOutcome", outcome(o.record, store_of[o.topic], "APPLIED", timing)))
        for o in out
        if o.topic in store_of
    ]


async def report(settings: Settings, sagas: int, wave: int, as_json: bool, console: Console) -> int:
    """Measure and print the fold's cost per saga by phase; 1 unless every saga completed."""
    cost = await measure_fold(settings, sagas, wave, tune_gc=True)
    per_saga = cost.per_saga_us()
    if as_json:
        summary = {"sagas": cost.sagas, "wave": wave, "completed": cost.completed, "us_per_saga": per_saga}
        print(json.dumps(summary, indent=2))
    else:
        table = Table("phase", "µs per saga", title=f"coordinator fold, {cost.sagas} sagas, {wave} per loop")
        for phase, us in per_saga.items():
            table.add_row(PHASE_NAMES.get(phase, phase), str(us))
        console.print(table)
    return 0 if cost.completed == cost.sagas else 1


PHASE_NAMES = {
    "intents": "intents decoded, admitted, folded",
    "commands": "their commands, snapshots, lock events encoded",
    "outcomes": "outcomes decoded, folded (results encoded)",
    "results": "lock releases encoded",
}
