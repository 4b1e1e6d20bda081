"""The saga's vocabulary and state helpers: phases, step statuses, policy, and how a state is built and read.

Phases and statuses are `StrEnum`s: they encode as the same Avro strings as before and compare equal to
the plain strings of snapshots written earlier, so a restored state needs no migration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from polycommit.errors import InvalidOperationError, PolycommitError, ProtocolError, UnsupportedError
from polycommit.events import (
    Alert,
    ErrorInfo,
    Operation,
    SagaSnapshot,
    StepFlight,
    StepResult,
    StoreCommand,
    TransactionIntent,
    TransactionResult,
    TransactionStatus,
    error_info,
    store_command,
)
from polycommit.modes import refuse_unsupported
from polycommit.operations import lock_keys, operation_keys, validate_operation

PROTOCOL = "saga"


class SagaPhase(StrEnum):
    FORWARD = "forward"
    ABORTING = "aborting"  # a step failed for good: no step is sent, the ones in flight are awaited
    COMPENSATING = "compensating"
    STUCK = "stuck"  # still compensating: a compensation keeps failing, it is retried and reported
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"  # refused before any step ran


TERMINAL: frozenset[str] = frozenset({SagaPhase.COMPLETED, SagaPhase.COMPENSATED, SagaPhase.FAILED})
IN_FLIGHT: frozenset[str] = frozenset(SagaPhase) - TERMINAL


class StepStatus(StrEnum):
    """A step's status as it appears in results and snapshots."""

    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    COMPENSATED = "compensated"
    NOT_APPLIED = "not_applied"
    SKIPPED = "skipped"
    COMPENSATION_FAILED = "compensation_failed"
    RESOLVED_BY_OPERATOR = "resolved_by_operator"  # an operator repaired it by hand (polycommit tx resolve)


PENDING, APPLIED, FAILED, TIMED_OUT = StepStatus.PENDING, StepStatus.APPLIED, StepStatus.FAILED, StepStatus.TIMED_OUT
COMPENSATED, NOT_APPLIED, SKIPPED = StepStatus.COMPENSATED, StepStatus.NOT_APPLIED, StepStatus.SKIPPED
COMPENSATION_FAILED, RESOLVED_BY_OPERATOR = StepStatus.COMPENSATION_FAILED, StepStatus.RESOLVED_BY_OPERATOR
# A step in one of these states may have changed its store, so compensation must visit it.
MAY_HAVE_APPLIED: frozenset[str] = frozenset({APPLIED, TIMED_OUT})
# Compensation also visits a step that failed: it changed nothing, but its COMPENSATE marker fences the
# step in its store, so the same intent sent again (a client retry, a replay of the topic) finds it
# SKIPPED and ends compensated again, instead of applying it this time and ending completed.
TO_COMPENSATE: frozenset[str] = MAY_HAVE_APPLIED | {FAILED}


@dataclass(frozen=True)
class SagaPolicy:
    default_timeout_ms: int = 10_000
    backoff_base_ms: int = 50
    backoff_max_ms: int = 30_000
    compensation_retries: int = 5  # failures of one compensation before the saga is reported stuck
    max_payload_bytes: int = 1024 * 1024

    def backoff_ms(self, tx_id: str, attempt: int) -> int:
        """Exponential backoff with deterministic "full jitter" in [base*2^(n-1)/2, base*2^(n-1)].

        The jitter comes from a hash of (transaction, attempt) rather than a random generator, so a
        replay of the log recomputes the same schedule and tests need no seeded global state.
        """
        ceiling = min(self.backoff_max_ms, self.backoff_base_ms * (2 ** max(0, attempt - 1)))
        digest = hashlib.blake2b(f"{tx_id}/{attempt}".encode(), digest_size=2).digest()
        fraction = int.from_bytes(digest, "big") / 0xFFFF
        return int(ceiling / 2 + fraction * ceiling / 2)


def phase_of(state: SagaSnapshot) -> SagaPhase:
    try:
        return SagaPhase(state["phase"])
    except ValueError:
        raise ProtocolError(f"{state['intent']['tx_id']}: a saga has no phase {state['phase']!r}") from None


def initial_steps(intent: TransactionIntent, status: str) -> list[StepResult]:
    """Every step's result before anything ran (shared by the protocols; each names its own first status)."""
    return [
        {
            "index": i,
            "name": s["name"],
            "store": s["operation"]["store"],
            "status": status,
            "attempts": 0,
            "compensation_attempts": 0,
            "error": None,
            "compensation_error": None,
            "resolved_by": "",
        }
        for i, s in enumerate(intent["steps"])
    ]


def idle() -> StepFlight:
    return {"waiting": False, "attempt": 0, "due_at_ms": 0, "done": False}


def _keys(intent: TransactionIntent, index: int) -> frozenset[str]:
    try:
        return frozenset(lock_keys(intent["steps"][index]["operation"]))
    except PolycommitError:
        return frozenset()  # an invalid operation: the intent is refused before any step runs


def waits_for(intent: TransactionIntent, keys: Sequence[frozenset[str]] | None = None) -> list[list[int]]:
    """Per step, the earlier steps it runs after: declared, same store, or sharing a lock key (`keys`:
    each step's, when the caller parsed them already)."""
    steps = intent["steps"]
    keys = keys if keys is not None else [_keys(intent, i) for i in range(len(steps))]
    result: list[list[int]] = []
    for i, step in enumerate(steps):
        store = step["operation"]["store"]
        declared = {j for j in step.get("after", []) if 0 <= j < i}
        implicit = {j for j in range(i) if steps[j]["operation"]["store"] == store or keys[i] & keys[j]}
        result.append(sorted(declared | implicit))
    return result


def bad_after(intent: TransactionIntent) -> str | None:
    """Why a step's `after` is invalid (it must name earlier steps: no cycle can then exist), or None."""
    for i, step in enumerate(intent["steps"]):
        for j in step.get("after", []):
            if not 0 <= j < i:
                return f"step {i}: after names step {j}, which is not an earlier step"
    return None


def initial_state(intent: TransactionIntent, now: int, keys: Sequence[frozenset[str]] | None = None) -> SagaSnapshot:
    steps = initial_steps(intent, PENDING)
    return {
        "intent": intent,
        "protocol": PROTOCOL,
        "phase": SagaPhase.FORWARD,
        "current": 0,
        "attempt": 1,
        "due_at_ms": 0,
        "waiting": False,
        "steps": steps,
        "before_images": [None] * len(steps),
        "flights": [idle() for _ in steps],
        "waits_for": waits_for(intent, keys),
        "error": None,
        "started_at_ms": now,
        "updated_at_ms": now,
    }


def copy_state(state: SagaSnapshot, now: int) -> SagaSnapshot:
    """A transition never mutates its input: a late event must find the state it was given unchanged."""
    new: SagaSnapshot = {**state}  # type: ignore[typeddict-item]
    new["steps"] = [{**s} for s in state["steps"]]  # type: ignore[typeddict-item]
    new["before_images"] = list(state["before_images"])
    new["flights"] = [{**f} for f in state.get("flights", [])]  # type: ignore[typeddict-item]
    new["updated_at_ms"] = now
    return new


def timeout_ms(state: SagaSnapshot, index: int, policy: SagaPolicy) -> int:
    return state["intent"]["steps"][index]["timeout_ms"] or policy.default_timeout_ms


def command(state: SagaSnapshot, index: int, action: Literal["EXECUTE", "COMPENSATE"], now: int) -> StoreCommand:
    step = state["intent"]["steps"][index]
    return store_command(
        state["intent"]["tx_id"],
        index,
        action,
        step["operation"],
        compensation=step["compensation"],
        attempt=state["flights"][index]["attempt"],
        before_image=state["before_images"][index],
        issued_at_ms=now,
        isolation=state["intent"]["isolation"],
    )


def send(
    state: SagaSnapshot, index: int, action: Literal["EXECUTE", "COMPENSATE"], now: int, policy: SagaPolicy
) -> StoreCommand:
    """Mark step `index`'s next attempt as in flight and build its command."""
    flight: StepFlight = state["flights"][index]
    flight["attempt"] += 1
    flight["waiting"] = True
    # A step's timeout bounds its execution; its compensation gets the default, since it must queue
    # behind whatever the store is still doing (often the very execution that timed out).
    timeout = timeout_ms(state, index, policy) if action == "EXECUTE" else policy.default_timeout_ms
    flight["due_at_ms"] = now + timeout
    if action == "EXECUTE":
        state["steps"][index]["attempts"] = flight["attempt"]
    else:
        state["steps"][index]["compensation_attempts"] = flight["attempt"]
    return command(state, index, action, now)


def alert(kind: str, state: SagaSnapshot, message: str, now: int) -> Alert:
    return {"kind": kind, "tx_id": state["intent"]["tx_id"], "message": message, "at_ms": now}


def result_of(state: SagaSnapshot, status: TransactionStatus, now: int) -> TransactionResult:
    return {
        "tx_id": state["intent"]["tx_id"],
        "name": state["intent"]["name"],
        "status": status,
        "steps": [{**s} for s in state["steps"]],  # type: ignore[misc]
        "error": state["error"],
        "started_at_ms": state["started_at_ms"],
        "finished_at_ms": now,
    }


def problem_step(problem: ErrorInfo) -> int:
    prefix = problem["message"].split(":", 1)[0]
    return int(prefix.removeprefix("step ")) if prefix.startswith("step ") else -1


def _same_store(operation: Operation, compensation: Operation) -> None:
    """A compensation runs in its step's store (its marker fences the step there): another store's
    consumer would refuse it on every attempt and the saga would be stuck forever."""
    if compensation["store"] != operation["store"]:
        raise InvalidOperationError(
            f"the compensation is for {compensation['store']}, the step for {operation['store']}"
        )


def validate(intent: TransactionIntent, policy: SagaPolicy) -> ErrorInfo | None:
    """The first reason no store could run this intent, or None. Nothing runs if one step is invalid."""
    return checked(intent, policy)[0]


def checked(intent: TransactionIntent, policy: SagaPolicy) -> tuple[ErrorInfo | None, list[frozenset[str]]]:
    """`validate`, and each step's lock keys from the same parse (each operation is parsed once here)."""
    try:
        refuse_unsupported(intent["consistency"], intent["isolation"], intent["priority"], intent.get("locks", True))
    except UnsupportedError as exc:
        return error_info(exc.error_class, str(exc), False), []
    keys = []
    for i, step in enumerate(intent["steps"]):
        try:
            keys.append(frozenset(operation_keys(step["operation"], policy.max_payload_bytes)))
            if step["compensation"] is not None:
                validate_operation(step["compensation"], policy.max_payload_bytes)
                _same_store(step["operation"], step["compensation"])
        except PolycommitError as exc:
            return error_info(exc.error_class, f"step {i}: {exc}", False), []
        if step["index"] != i:
            return error_info(InvalidOperationError.__name__, f"step {i}: index is {step['index']}", False), []
    problem = bad_after(intent)
    return (None if problem is None else error_info(InvalidOperationError.__name__, problem, False)), keys
