"""The workload of `polycommit chaos`: which sagas it sends, and the client that sends them (and can die).

The mix is seeded: most sagas make the benchmark's three writes on keys of their own; a fraction end in
a step that always fails (so the writes before it are really compensated), and a fraction run with a
step timeout short enough to expire under load (so a step that may still land is compensated, or
retried). In 2PC mode (`--mode 2pc`) every transaction is a two-phase commit, and the fractions are
transactions that abort because a participant votes no. The client is replaceable: killing it drops
every reply it was waiting for — those
transactions' results are read back from the `results` topic at the end, as an operator would.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from polycommit import operations as ops
from polycommit.bus import topics_for
from polycommit.client import Coordinator, Saga, Transaction, TransactionResult
from polycommit.config import Settings
from polycommit.errors import DeadlockVictimError, LockTimeoutError
from polycommit.interactive import run_again
from polycommit.log_reader import read_topic
from polycommit.tooling import bench
from polycommit.tooling.bench import Write, keep_in_flight
from polycommit.tooling.bench_workload import DIMENSIONS
from polycommit.tooling.checker import History
from polycommit.tooling.workload import embed

STEP_RETRIES = 3
# A saga that ended with nothing of it run because it waited for its keys longer than its lock wait (behind
# a saga that a kill stalled) or was a deadlock's victim is run again as a new transaction, as an
# application does (`coordinator.execute(retries=...)`), at most this many times. Other failures are the
# run's subject (a failing step, a short timeout, a vote no): never run again.
RERUNS = 3
RERUN_ERRORS = frozenset({LockTimeoutError.__name__, DeadlockVictimError.__name__})
STEP_TIMEOUT_S = 30.0
# A raw step that can never succeed: PostgreSQL refuses it with a data error, not a retriable one.
FAILING_STEP = ops.sql("SELECT 1 / 0")


def rerun_after(result: TransactionResult | None) -> bool:
    """Whether a saga's attempt ended so that chaos runs it again (`RERUN_ERRORS`); no result heard: no."""
    return result is not None and result.error_class in RERUN_ERRORS


@dataclass(frozen=True)
class Mix:
    """Fractions of the sagas that fail at their last step, and that run with a short step timeout."""

    failing: float = 0.1
    short_timeout: float = 0.1
    short_timeout_s: float = 0.05


def saga_of(write: Write, *, timeout: float = STEP_TIMEOUT_S) -> Saga:
    """The benchmark's three writes, with retries and a timeout generous enough to ride out a restart:
    a step that times out is retried (its redelivery is a no-op), not compensated at the first stall."""
    return bench.saga_of(write, name="chaos", retries=STEP_RETRIES, timeout=timeout)


def mixed(
    items: Iterable[Write], mix: Mix, rng: random.Random, step_timeout: float, mode: str = "saga"
) -> Iterator[tuple[str, Saga]]:
    """(kind, saga) for each write: "plain", "failing" (ends in FAILING_STEP) or "short-timeout"; with
    `mode="2pc"` two-phase commits (consistency=STRONG) that abort for real instead: "failing"
    (PostgreSQL votes no on FAILING_STEP) and "voted-no" (a vector of the wrong size: Qdrant votes no);
    with `mode="mixed"` each transaction is one or the other by a seeded coin (kinds "2pc-..." for the
    two-phase commits), so sagas and two-phase commits meet on shared keys (`--hot-keys`)."""
    for write in items:
        strong = mode == "2pc" or (mode == "mixed" and rng.random() < 0.5)
        if not strong:
            yield _saga_kind(write, mix, rng, step_timeout)
            continue
        kind, saga = _two_phase_kind(write, mix, rng)
        yield (f"2pc-{kind}" if mode == "mixed" else kind), saga


def _saga_kind(write: Write, mix: Mix, rng: random.Random, step_timeout: float) -> tuple[str, Saga]:
    draw = rng.random()
    if draw < mix.failing:
        return "failing", saga_of(write, timeout=step_timeout).step(FAILING_STEP, name="always fails")
    if draw < mix.failing + mix.short_timeout:
        return "short-timeout", bench.saga_of(write, name="chaos", retries=1, timeout=mix.short_timeout_s)
    return "plain", saga_of(write, timeout=step_timeout)


def _two_phase_kind(write: Write, mix: Mix, rng: random.Random) -> tuple[str, Saga]:
    draw = rng.random()
    if draw < mix.failing:
        return "failing", bench.saga_of(write, name="chaos", mode="2pc").step(FAILING_STEP, name="always fails")
    if draw < mix.failing + mix.short_timeout:
        bad = Write(write.key, write.value, write.vector[:-1])
        return "voted-no", bench.saga_of(bad, name="chaos", mode="2pc")
    return "plain", bench.saga_of(write, name="chaos", mode="2pc")


def hot_writes(run: str, count: int, hot_keys: int, rng: random.Random) -> list[Write]:
    """`count` writes on `hot_keys` keys drawn at random (each its own value, so every store's final
    value names its last writer): transactions on one key contend for its locks."""
    return [Write(f"{run}-h{rng.randrange(hot_keys)}", i, embed(f"{run}-{i}", DIMENSIONS)) for i in range(count)]


@dataclass
class Progressed:
    """Results as they arrive, for kill schedules and recovery times (no sleeping: waiters are woken)."""

    results: int = 0
    last_at: float = 0.0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def arrived(self) -> None:
        async with self._changed:
            self.results += 1
            self.last_at = time.monotonic()
            self._changed.notify_all()

    async def wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)


@dataclass
class ClientSlot:
    """The workload's client, which a kill replaces: the old one is closed with replies outstanding."""

    settings: Settings
    timeout: float
    client: Coordinator | None = None
    kills: int = 0

    async def start(self) -> None:
        self.client = await Coordinator(self.settings, timeout=self.timeout).start()

    async def kill(self) -> float:
        """Drop the client and every reply it waits for; returns when a new one is ready."""
        old = self.client
        await self.start()
        self.kills += 1
        if old is not None:
            await old.close()  # its waiters are cancelled: their results are read from the log later
        return time.monotonic()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


async def execute(slot: ClientSlot, saga: Transaction, errors: list[str]) -> TransactionResult | None:
    """Run one transaction; None when no result was heard (the client gave up, or was killed).

    Publishing the intent may fail while the broker is down or the client is being replaced: it is
    published again (the coordinator ignores a duplicate of an intent in flight, and a replay of a
    finished one changes nothing)."""
    for _ in range(20):
        client = slot.client
        assert client is not None
        try:
            future = await client.submit(saga)
        except Exception as exc:  # the broker refused or timed out the intent: publish it again
            errors.append(f"{saga.tx_id}: {type(exc).__name__}: {exc}")
            continue
        try:
            return await asyncio.wait_for(future, client.timeout)
        except TimeoutError:
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this lane itself is cancelled
            return None  # the client was killed after the intent went out
    return None


async def run_workload(
    slot: ClientSlot,
    history: History,
    sagas: Iterable[Saga],
    concurrency: int,
    progressed: Progressed,
    errors: list[str],
    on_result: Callable[[], None] | None = None,
    retried: list[str] | None = None,
    reruns: list[str] | None = None,
) -> None:
    """Keep `concurrency` sagas in flight; `retried` collects the transactions with a step run more than
    once (after a step timeout: an outcome was lost or late), `reruns` those that ran a saga again after a
    lock wait or a deadlock (`RERUNS`). The history holds every attempt, each judged on its own."""
    retried = retried if retried is not None else []
    reruns = reruns if reruns is not None else []

    async def one(saga: Saga) -> None:
        async def attempt(transaction: Transaction) -> TransactionResult | None:
            if transaction is not saga:
                reruns.append(transaction.tx_id)
            history.invoke(transaction)
            result = await execute(slot, transaction, errors)
            if result is not None:
                history.record_result(result)
                if any(step.attempts > 1 for step in result.steps):
                    retried.append(transaction.tx_id)
            return result

        await run_again(saga, RERUNS, attempt, rerun_after)
        await progressed.arrived()
        if on_result is not None:
            on_result()

    await keep_in_flight(sagas, concurrency, one)


async def recover_results(settings: Settings, history: History, deadline_s: float) -> set[str]:
    """Read results the clients missed from the `results` topic until none is missing or the deadline.
    Only transactions the log has heard of are waited for: one that sent nothing to the `intents` topic
    (its client was killed first, or its publish failed) can never have a result. Returns those."""
    deadline = time.monotonic() + deadline_s
    await history.recover_from_log(settings)
    if not history.missing():
        return set()
    logged = await keys_of(settings, topics_for(settings).intents)
    while any(tx_id in logged for tx_id in history.missing()) and time.monotonic() < deadline:
        await history.recover_from_log(settings)
    return {tx_id for tx_id in history.missing() if tx_id not in logged}


async def keys_of(settings: Settings, topic: str) -> set[str]:
    """The keys of every record on `topic` now (transaction ids, for the topics keyed by them)."""
    keys: set[str] = set()

    def handle(record: Any) -> None:
        if record.key:
            keys.add(record.key.decode(errors="replace"))

    await read_topic(settings, topic, handle)
    return keys
