"""Optimistic concurrency for applications: run "read, then write with the versions read" again on conflict.

    async def increment() -> TransactionResult:
        async with coordinator.transaction() as tx:
            row = await tx.postgres.get("counters", {"id": "c"})
            tx.postgres.upsert("counters", {"id": "c"}, {"n": row.value["n"] + 1}, expected_version=row.version)
        return tx.result

    result = await retry_on_conflict(increment, attempts=10, backoff=0.02)

A conflict is a `VersionConflict` raised by `fn`, or a transaction result whose error is one (a saga
that compensated, a two-phase commit that aborted on a vote no): each is retried after an exponential
backoff with jitter (contending writers spread out instead of colliding again in step); after
`attempts` calls the last conflict is raised. Any other result or error is returned or raised at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from polycommit.errors import VersionConflict

T = TypeVar("T")

__all__ = ["backoff_delay", "conflict_of", "retry_on_conflict"]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after the `attempt`-th conflict (from 1): `base * 2**(attempt-1)`, at most `cap`,
    of which a random half is waited ("equal jitter": never nothing, never in lockstep)."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def conflict_of(outcome: Any) -> VersionConflict | None:
    """The version conflict `outcome` stands for: itself, or a transaction result that ended on one."""
    if isinstance(outcome, VersionConflict):
        return outcome
    if getattr(outcome, "error_class", None) == VersionConflict.__name__:
        return VersionConflict("", None, None, message=str(getattr(outcome, "error", "") or "version conflict"))
    return None


async def retry_on_conflict(
    fn: Callable[[], Awaitable[T]],
    attempts: int = 10,
    backoff: float = 0.02,
    *,
    max_backoff: float = 1.0,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await `fn()` until it ends without a version conflict; after `attempts` conflicts, raise the last."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    jitter = rng or random.Random()
    for attempt in range(1, attempts + 1):
        try:
            result = await fn()
        except VersionConflict as exc:
            conflict = exc
        else:
            found = conflict_of(result)
            if found is None:
                return result
            conflict = found
        if attempt == attempts:
            raise conflict
        await sleep(backoff_delay(attempt, backoff, max_backoff, jitter))
    raise AssertionError("unreachable")  # the loop returns or raises
