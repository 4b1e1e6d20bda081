"""retry_on_conflict without servers: which outcomes it retries, how long it waits, what it raises at the end."""

from __future__ import annotations

import random
from typing import Any

import pytest

from polycommit.client import TransactionResult
from polycommit.errors import InvalidOperationError, VersionConflict
from polycommit.occ import backoff_delay, conflict_of, retry_on_conflict


def result(error_class: str | None) -> TransactionResult:
    error = None if error_class is None else {"error_class": error_class, "message": "step 0: k", "retriable": False}
    event: dict[str, Any] = {
        "tx_id": "t",
        "status": "COMPENSATED" if error else "COMPLETED",
        "steps": [],
        "error": error,
        "started_at_ms": 0,
        "finished_at_ms": 1,
    }
    return TransactionResult.from_event(event)


class Script:
    """An `fn` that returns (or raises) the given outcomes in turn, and a sleep that records its waits."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.waits: list[float] = []

    async def __call__(self) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_conflicts_are_retried_until_an_outcome_without_one() -> None:
    done = result(None)
    script = Script(result("VersionConflict"), VersionConflict("k", 1, 2), done)
    assert await retry_on_conflict(script, attempts=5, backoff=0.1, sleep=script.sleep) is done
    assert script.calls == 3 and len(script.waits) == 2


async def test_after_the_last_attempt_the_last_conflict_is_raised() -> None:
    script = Script(VersionConflict("k", 1, 2), result("VersionConflict"))
    with pytest.raises(VersionConflict, match="step 0: k"):
        await retry_on_conflict(script, attempts=2, sleep=script.sleep)
    assert script.calls == 2 and len(script.waits) == 1
    raised = Script(result("VersionConflict"), VersionConflict("k", 3, 4))
    with pytest.raises(VersionConflict) as info:
        await retry_on_conflict(raised, attempts=2, sleep=raised.sleep)
    assert (info.value.expected, info.value.actual) == (3, 4)


async def test_other_failures_are_neither_retried_nor_hidden() -> None:
    failed = result("InvalidOperationError")
    script = Script(failed)
    assert await retry_on_conflict(script, attempts=5, sleep=script.sleep) is failed
    boom = Script(InvalidOperationError("bad"))
    with pytest.raises(InvalidOperationError):
        await retry_on_conflict(boom, attempts=5, sleep=boom.sleep)
    assert script.calls == boom.calls == 1 and not script.waits


def test_backoff_doubles_up_to_its_cap_with_jitter_in_the_upper_half() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (6, 1.0), (30, 1.0)]:
        delays = [backoff_delay(attempt, 0.1, 1.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(set(delays)) > 1  # jittered, so contending writers do not retry in lockstep


def test_what_counts_as_a_conflict() -> None:
    conflict = VersionConflict("k", 0, 1)
    assert conflict_of(conflict) is conflict
    found = conflict_of(result("VersionConflict"))
    assert isinstance(found, VersionConflict) and "step 0: k" in str(found)
    assert conflict_of(result(None)) is None and conflict_of(result("StepFailed")) is None and conflict_of(3) is None
