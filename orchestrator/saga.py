"""The saga coordinator as a pure state machine: (state, event, now) -> (state, commands, result, alerts).

No awaits and no clock of its own: the driver passes `now` in, so every path, timeouts included, can be
tested with plain lists of events. A saga runs its steps in order. A failed step is retried with
exponential backoff and jitter up to its `retries`; a step past its timeout counts as failed. When a step
cannot succeed, the steps that may have applied are compensated in reverse order; a compensation that
keeps failing is retried with capped backoff forever and the saga is reported `stuck` (P2: never dropped).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from polycommit.errors import PolycommitError
from polycommit.events import (
    Alert,
    ErrorInfo,
    SagaSnapshot,
    StepOutcome,
    StepResult,
    StoreCommand,
    TransactionIntent,
    TransactionResult,
    TransactionStatus,
    error_info,
    store_command,
)
from polycommit.operations import validate_operation

Phase = Literal["forward", "compensating", "stuck", "completed", "compensated", "failed"]
TERMINAL: frozenset[str] = frozenset({"completed", "compensated", "failed"})

# Step statuses as they appear in results and snapshots.
PENDING, APPLIED, FAILED, TIMED_OUT = "pending", "applied", "failed", "timed_out"
COMPENSATED, NOT_APPLIED, SKIPPED = "compensated", "not_applied", "skipped"
# A step in one of these states may have changed its store, so compensation must visit it.
MAY_HAVE_APPLIED = frozenset({APPLIED, TIMED_OUT})
# Compensation also visits a step that failed: it changed nothing, but its COMPENSATE marker fences the
# step in its store, so the same intent sent again (a client retry, a replay of the topic) finds it
# SKIPPED and ends compensated again, instead of applying it this time and ending completed.
TO_COMPENSATE = MAY_HAVE_APPLIED | {FAILED}


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


@dataclass
class Transition:
    """What one event did: the new state and everything the driver must now publish."""

    state: SagaSnapshot
    commands: list[StoreCommand] = field(default_factory=list)
    result: TransactionResult | None = None
    alerts: list[Alert] = field(default_factory=list)


# -- helpers ----------------------------------------------------------------------------------------


def _copy(state: SagaSnapshot, now: int) -> SagaSnapshot:
    new: SagaSnapshot = {**state}  # type: ignore[typeddict-item]
    new["steps"] = [{**s} for s in state["steps"]]  # type: ignore[typeddict-item]
    new["before_images"] = list(state["before_images"])
    new["updated_at_ms"] = now
    return new


def _timeout_ms(state: SagaSnapshot, index: int, policy: SagaPolicy) -> int:
    return state["intent"]["steps"][index]["timeout_ms"] or policy.default_timeout_ms


def _command(state: SagaSnapshot, index: int, action: Literal["EXECUTE", "COMPENSATE"], now: int) -> StoreCommand:
    step = state["intent"]["steps"][index]
    return store_command(
        state["intent"]["tx_id"],
        index,
        action,
        step["operation"],
        compensation=step["compensation"],
        attempt=state["attempt"],
        before_image=state["before_images"][index],
        issued_at_ms=now,
    )


def _send(state: SagaSnapshot, action: Literal["EXECUTE", "COMPENSATE"], now: int, policy: SagaPolicy) -> StoreCommand:
    """Mark the current step's command as in flight and build it."""
    index = state["current"]
    state["waiting"] = True
    # A step's timeout bounds its execution; its compensation gets the default, since it must queue
    # behind whatever the store is still doing (often the very execution that timed out).
    timeout = _timeout_ms(state, index, policy) if action == "EXECUTE" else policy.default_timeout_ms
    state["due_at_ms"] = now + timeout
    if action == "EXECUTE":
        state["steps"][index]["attempts"] = state["attempt"]
    else:
        state["steps"][index]["compensation_attempts"] = state["attempt"]
    return _command(state, index, action, now)


def _alert(kind: str, state: SagaSnapshot, message: str, now: int) -> Alert:
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


def _finish(transition: Transition, phase: Phase, status: TransactionStatus, now: int) -> Transition:
    state = transition.state
    state["phase"] = phase
    state["waiting"] = False
    state["due_at_ms"] = 0
    transition.result = result_of(state, status, now)
    return transition


# -- the transitions --------------------------------------------------------------------------------


def start(intent: TransactionIntent, now: int, policy: SagaPolicy) -> Transition:
    """A new intent: validate every step up front (nothing runs if one is invalid), then run step 0."""
    steps: list[StepResult] = [
        {
            "index": i,
            "name": s["name"],
            "store": s["operation"]["store"],
            "status": PENDING,
            "attempts": 0,
            "compensation_attempts": 0,
            "error": None,
        }
        for i, s in enumerate(intent["steps"])
    ]
    state: SagaSnapshot = {
        "intent": intent,
        "phase": "forward",
        "current": 0,
        "attempt": 1,
        "due_at_ms": 0,
        "waiting": False,
        "steps": steps,
        "before_images": [None] * len(steps),
        "error": None,
        "started_at_ms": now,
        "updated_at_ms": now,
    }
    transition = Transition(state)
    problem = _validate(intent, policy)
    if problem is not None:
        state["error"] = problem
        if 0 <= problem_step(problem) < len(steps):
            steps[problem_step(problem)]["error"] = problem
        return _finish(transition, "failed", "FAILED", now)
    if not steps:
        return _finish(transition, "completed", "COMPLETED", now)
    transition.commands.append(_send(state, "EXECUTE", now, policy))
    return transition


def problem_step(problem: ErrorInfo) -> int:
    prefix = problem["message"].split(":", 1)[0]
    return int(prefix.removeprefix("step ")) if prefix.startswith("step ") else -1


def _validate(intent: TransactionIntent, policy: SagaPolicy) -> ErrorInfo | None:
    for i, step in enumerate(intent["steps"]):
        try:
            validate_operation(step["operation"], policy.max_payload_bytes)
            if step["compensation"] is not None:
                validate_operation(step["compensation"], policy.max_payload_bytes)
        except PolycommitError as exc:
            return error_info(exc.error_class, f"step {i}: {exc}", False)
        if step["index"] != i:
            return error_info("InvalidOperationError", f"step {i}: index is {step['index']}", False)
    return None


def on_outcome(state: SagaSnapshot, event: StepOutcome, now: int, policy: SagaPolicy) -> Transition:
    """A store reported on a command. Outcomes that no longer matter (late, duplicate) change nothing."""
    if state["phase"] in TERMINAL or event["step_index"] != state["current"]:
        return Transition(state)
    if state["phase"] == "forward" and event["action"] == "EXECUTE":
        return _on_execute_outcome(_copy(state, now), event, now, policy)
    if state["phase"] in ("compensating", "stuck") and event["action"] == "COMPENSATE":
        return _on_compensate_outcome(_copy(state, now), event, now, policy)
    return Transition(state)


def _on_execute_outcome(state: SagaSnapshot, event: StepOutcome, now: int, policy: SagaPolicy) -> Transition:
    index = state["current"]
    status = event["status"]
    transition = Transition(state)
    if status in ("APPLIED", "ALREADY_APPLIED"):
        # Any attempt's success counts: after a timeout, the first attempt may still land.
        state["steps"][index]["status"] = APPLIED
        state["steps"][index]["error"] = None
        state["before_images"][index] = event["before_image"]
        if index + 1 == len(state["steps"]):
            return _finish(transition, "completed", "COMPLETED", now)
        state["current"], state["attempt"] = index + 1, 1
        transition.commands.append(_send(state, "EXECUTE", now, policy))
        return transition
    if event["attempt"] != state["attempt"]:
        return Transition(state)  # a failure of an attempt we already gave up on
    if status == "SKIPPED":
        # The step was compensated before (a replay of a compensated saga): it must not run now.
        state["steps"][index]["status"] = SKIPPED
        state["error"] = error_info("StepSkipped", f"step {index}: already compensated", False)
        return _begin_compensation(transition, index - 1, now, policy)
    error = event["error"] or error_info("StepFailed", "no error given", False)
    state["steps"][index]["error"] = error
    return _retry_or_compensate(transition, error, may_have_applied=False, now=now, policy=policy)


def _retry_or_compensate(
    transition: Transition, error: ErrorInfo, *, may_have_applied: bool, now: int, policy: SagaPolicy
) -> Transition:
    state = transition.state
    index = state["current"]
    retries = state["intent"]["steps"][index]["retries"]
    if error["retriable"] and state["attempt"] <= retries:
        state["waiting"] = False
        state["due_at_ms"] = now + policy.backoff_ms(state["intent"]["tx_id"], state["attempt"])
        return transition
    state["steps"][index]["status"] = TIMED_OUT if may_have_applied else FAILED
    state["error"] = error_info(error["error_class"], f"step {index}: {error['message']}", error["retriable"])
    # The failed step itself is compensated first: undone if it timed out and may have applied after
    # all, fenced (a recorded no-op) if its store reported the failure.
    return _begin_compensation(transition, index, now, policy)


def _begin_compensation(transition: Transition, from_index: int, now: int, policy: SagaPolicy) -> Transition:
    state = transition.state
    state["phase"] = "compensating"
    return _compensate_next(transition, from_index, now, policy)


def _compensate_next(transition: Transition, from_index: int, now: int, policy: SagaPolicy) -> Transition:
    """Compensate the highest step at or below `from_index` that may have applied, or finish."""
    state = transition.state
    index = from_index
    while index >= 0 and state["steps"][index]["status"] not in TO_COMPENSATE:
        index -= 1
    if index < 0:
        status: TransactionStatus = "COMPENSATED"
        return _finish(transition, "compensated", status, now)
    state["current"], state["attempt"] = index, 1
    transition.commands.append(_send(state, "COMPENSATE", now, policy))
    return transition


def _on_compensate_outcome(state: SagaSnapshot, event: StepOutcome, now: int, policy: SagaPolicy) -> Transition:
    index = state["current"]
    transition = Transition(state)
    if event["status"] in ("APPLIED", "ALREADY_APPLIED", "NOOP"):
        step = state["steps"][index]
        if step["status"] != FAILED:  # a failed step stays "failed" in the result once fenced
            step["status"] = COMPENSATED if event["status"] != "NOOP" else NOT_APPLIED
        if state["phase"] == "stuck":
            transition.alerts.append(_alert("resolved", state, f"step {index} compensated", now))
            state["phase"] = "compensating"
        return _compensate_next(transition, index - 1, now, policy)
    if event["attempt"] != state["attempt"]:
        return Transition(state)
    error = event["error"] or error_info("CompensationFailed", "no error given", False)
    state["steps"][index]["error"] = error
    return _compensation_failed(transition, error, now, policy)


def _compensation_failed(transition: Transition, error: ErrorInfo, now: int, policy: SagaPolicy) -> Transition:
    """Compensations are retried whatever the error: dropping one would leave the stores disagreeing."""
    state = transition.state
    index = state["current"]
    state["waiting"] = False
    state["due_at_ms"] = now + policy.backoff_ms(state["intent"]["tx_id"], state["attempt"])
    if state["attempt"] >= policy.compensation_retries and state["phase"] != "stuck":
        state["phase"] = "stuck"
        message = f"compensation of step {index} failed {state['attempt']} times: {error['message']}"
        state["steps"][index]["status"] = "compensation_failed"
        transition.alerts.append(_alert("stuck", state, message, now))
        transition.result = result_of(state, "STUCK", now)
    return transition


def on_due(state: SagaSnapshot, now: int, policy: SagaPolicy) -> Transition:
    """The step in flight timed out, or a scheduled retry is due."""
    if state["phase"] in TERMINAL or state["due_at_ms"] == 0 or now < state["due_at_ms"]:
        return Transition(state)
    state = _copy(state, now)
    transition = Transition(state)
    forward = state["phase"] == "forward"
    if state["waiting"]:  # a timeout: the command in flight counts as failed
        error = error_info("StepTimeout", f"no outcome within {_timeout_ms(state, state['current'], policy)} ms", True)
        state["steps"][state["current"]]["error"] = error
        if forward:
            return _retry_or_compensate(transition, error, may_have_applied=True, now=now, policy=policy)
        return _compensation_failed(transition, error, now, policy)
    state["attempt"] += 1
    transition.commands.append(_send(state, "EXECUTE" if forward else "COMPENSATE", now, policy))
    return transition


def status_of(state: SagaSnapshot) -> str:
    return state["phase"]
