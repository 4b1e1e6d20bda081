"""Two-phase commit's vocabulary and state helpers: phases, step statuses, policy, records it publishes.

The state is the shared `SagaSnapshot` record with `protocol="twopc"`; nothing protocol-specific needs a
new field: `phase` holds the 2PC phase (and so the decision, once taken), each step's `status` its vote
or its phase-2 acknowledgement, `compensation_attempts` its phase-2 attempts, `attempt` the phase-2
round, `due_at_ms` the one deadline that matters in the phase (lock wait, prepare window, phase-2
retry), and `started_at_ms` the arrival order the lock table is rebuilt in after a restore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from orchestrator.saga_model import SagaPolicy, alert, copy_state, initial_steps, result_of
from polycommit.errors import ProtocolError
from polycommit.events import Decision, LockEvent, SagaSnapshot, StoreCommand, TransactionIntent, store_command
from polycommit.operations import lock_keys

PROTOCOL = "twopc"

__all__ = ["alert", "copy_state", "result_of"]


class TwoPCPhase(StrEnum):
    LOCKING = "locking"  # waiting (FIFO) for the exclusive locks on its write keys; nothing sent yet
    PREPARING = "preparing"  # PREPARE sent to every step, collecting votes
    COMMITTING = "committing"  # decided COMMIT: COMMIT sent, collecting acknowledgements
    ABORTING = "aborting"  # decided ABORT: ABORT sent to every step, collecting acknowledgements
    COMMIT_HAZARD = "committing (hazard)"  # a COMMIT keeps failing: retried forever, reported
    ABORT_HAZARD = "aborting (hazard)"  # an ABORT keeps failing: retried forever, reported
    COMMITTED = "committed"
    ABORTED = "aborted"
    FAILED = "failed"  # refused before anything was locked or sent


TERMINAL: frozenset[str] = frozenset({TwoPCPhase.COMMITTED, TwoPCPhase.ABORTED, TwoPCPhase.FAILED})
IN_FLIGHT: frozenset[str] = frozenset(TwoPCPhase) - TERMINAL
HAZARD: frozenset[str] = frozenset({TwoPCPhase.COMMIT_HAZARD, TwoPCPhase.ABORT_HAZARD})
COMMIT_SIDE: frozenset[str] = frozenset({TwoPCPhase.COMMITTING, TwoPCPhase.COMMIT_HAZARD})
ABORT_SIDE: frozenset[str] = frozenset({TwoPCPhase.ABORTING, TwoPCPhase.ABORT_HAZARD})
HOLDS_LOCKS: frozenset[str] = IN_FLIGHT - {TwoPCPhase.LOCKING}


class Vote(StrEnum):
    """A step's status in a two-phase commit's snapshots and results."""

    PENDING = "pending"
    RESEND = "resend"  # it answered a retriable no: its PREPARE goes again when the backoff is over
    PREPARED = "prepared"
    VOTED_NO = "voted_no"
    PHASE2_FAILED = "phase2_failed"  # its COMMIT/ABORT failed: retried with backoff
    COMMITTED = "committed"
    ABORTED = "aborted"


ACKNOWLEDGED: frozenset[str] = frozenset({Vote.COMMITTED, Vote.ABORTED})


@dataclass(frozen=True)
class TwoPCPolicy:
    prepare_window_ms: int = 10_000  # votes not in by then: presumed abort
    lock_wait_ms: int = 10_000  # a transaction waiting longer for its locks aborts (nothing prepared)
    phase2_resend_ms: int = 10_000  # a phase-2 command with no acknowledgement by then is sent again
    hazard_after: int = 5  # failed phase-2 attempts of one step before the heuristic hazard is reported
    prepare_attempts: int = 20  # PREPAREs of one step while its store answers a retriable no
    # Waits before a PREPARE goes again: short, since the transaction holds its locks meanwhile, and
    # growing, since what refused it (a PostgreSQL serialization failure against batches still prepared,
    # slots full) clears only as other transactions' phase 2 lands.
    prepare_backoff: SagaPolicy = field(default_factory=lambda: SagaPolicy(backoff_base_ms=10, backoff_max_ms=500))
    # Transactions past their locks at once, per coordinator member (Admission). PostgreSQL prepares a
    # batch of steps per prepared transaction (consumers/postgres/batches.py), so its prepared slots no
    # longer bound this; it stays as flow control against a flood of prepares.
    max_active: int = 4096
    backoff: SagaPolicy = field(default_factory=SagaPolicy)

    @classmethod
    def from_saga(cls, policy: SagaPolicy) -> TwoPCPolicy:
        return cls(
            prepare_window_ms=policy.default_timeout_ms,
            lock_wait_ms=policy.default_timeout_ms,
            phase2_resend_ms=policy.default_timeout_ms,
            hazard_after=policy.compensation_retries,
            backoff=policy,
        )


def initial_state(intent: TransactionIntent, now: int) -> SagaSnapshot:
    return {
        "intent": intent,
        "protocol": PROTOCOL,
        "phase": TwoPCPhase.LOCKING,
        "current": 0,
        "attempt": 1,
        "due_at_ms": 0,
        "waiting": False,
        "steps": initial_steps(intent, Vote.PENDING),
        "before_images": [None] * len(intent["steps"]),
        "error": None,
        "started_at_ms": now,
        "updated_at_ms": now,
    }


Action = Literal["PREPARE", "COMMIT", "ABORT"]


def command(state: SagaSnapshot, index: int, action: Action, now: int) -> StoreCommand:
    step = state["intent"]["steps"][index]
    attempts = state["steps"][index]["attempts" if action == "PREPARE" else "compensation_attempts"]
    tx_id, isolation = state["intent"]["tx_id"], state["intent"]["isolation"]
    return store_command(
        tx_id, index, action, step["operation"], attempt=attempts, issued_at_ms=now, isolation=isolation
    )


def participants(state: SagaSnapshot) -> list[str]:
    return sorted({s["store"] for s in state["steps"]})


def decision(state: SagaSnapshot, outcome: Literal["COMMIT", "ABORT"], reason: str, now: int) -> Decision:
    return {
        "tx_id": state["intent"]["tx_id"],
        "outcome": outcome,
        "participants": participants(state),
        "reason": reason[:2000],
        "at_ms": now,
    }


LockAction = Literal["REQUESTED", "GRANTED", "WAITING", "RELEASED"]


def lock_event(state: SagaSnapshot, key: str, action: LockAction, blockers: list[str], now: int) -> LockEvent:
    return {
        "tx_id": state["intent"]["tx_id"],
        "resource": key,
        "mode": "EXCLUSIVE",
        "action": action,
        "blockers": blockers,
        "priority": state["intent"]["priority"],
        "started_at_ms": state["started_at_ms"],
        "work_done": sum(1 for s in state["steps"] if s["status"] != Vote.PENDING),
        "at_ms": now,
    }


def phase_of(state: SagaSnapshot) -> TwoPCPhase:
    try:
        return TwoPCPhase(state["phase"])
    except ValueError:
        raise ProtocolError(f"{state['intent']['tx_id']}: two-phase commit has no phase {state['phase']!r}") from None


def write_keys(intent: TransactionIntent) -> list[str]:
    return sorted({k for step in intent["steps"] for k in lock_keys(step["operation"])})
