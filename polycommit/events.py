"""Typed views of the Avro records in `schemas/`: plain dicts at run time, checked shapes for mypy.

Events are facts in the past tense (StepOutcome, Decision, DeadLetter); a StoreCommand is an order.
Keeping them as the dicts fastavro reads and writes costs nothing on the hot path.
"""

from __future__ import annotations

import time
from typing import Literal, NotRequired, TypedDict

Store = Literal["postgres", "qdrant", "neo4j"]
STORES: tuple[Store, ...] = ("postgres", "qdrant", "neo4j")

StepAction = Literal["EXECUTE", "COMPENSATE", "PREPARE", "COMMIT", "ABORT"]
OutcomeStatus = Literal["APPLIED", "ALREADY_APPLIED", "SKIPPED", "NOOP", "FAILED", "PREPARED", "VOTED_NO"]
TransactionStatus = Literal["COMPLETED", "COMPENSATED", "STUCK", "FAILED", "COMMITTED", "ABORTED"]
Consistency = Literal["EVENTUAL", "STRONG"]
Isolation = Literal["READ_UNCOMMITTED", "READ_COMMITTED", "REPEATABLE_READ", "SERIALIZABLE"]


class NodeRef(TypedDict):
    label: str
    key: str


class Point(TypedDict):
    id: str
    vector: list[float]
    payload: str


class Operation(TypedDict):
    store: str
    kind: str
    target: str
    key: str
    values: str
    points: list[Point]
    point_ids: list[str]
    from_node: NodeRef | None
    to_node: NodeRef | None
    statement: str
    params: str
    lock_keys: list[str]
    expected_version: int | None


class Step(TypedDict):
    index: int
    name: str
    operation: Operation
    compensation: Operation | None
    retries: int
    timeout_ms: int
    after: NotRequired[list[int]]  # earlier steps this one runs after; the schema's default is []


class ErrorInfo(TypedDict):
    error_class: str
    message: str
    retriable: bool


class TransactionIntent(TypedDict):
    tx_id: str
    name: str
    consistency: Consistency
    isolation: Isolation
    priority: int
    steps: list[Step]
    reply_to: str
    client_id: str
    created_at_ms: int
    # v2 (decoded intents always carry them, with the schema's defaults): the saga's semantic lock, and
    # how long it may wait for its locks (0: the coordinator's default).
    locks: NotRequired[bool]
    lock_wait_ms: NotRequired[int]


class StoreCommand(TypedDict):
    tx_id: str
    step_index: int
    action: StepAction
    attempt: int
    operation: Operation
    compensation: Operation | None
    before_image: str | None
    issued_at_ms: int
    isolation: Isolation  # v2: the transaction's level (PostgreSQL's batch runs at its commands' strictest)


class StepOutcome(TypedDict):
    tx_id: str
    step_index: int
    action: StepAction
    attempt: int
    store: str
    status: OutcomeStatus
    before_image: str | None
    error: ErrorInfo | None
    at_ms: int
    duration_us: int


class StepResult(TypedDict):
    index: int
    name: str
    store: str
    status: str
    attempts: int
    compensation_attempts: int
    error: ErrorInfo | None
    compensation_error: ErrorInfo | None
    resolved_by: str


class TransactionResult(TypedDict):
    tx_id: str
    name: str
    status: TransactionStatus
    steps: list[StepResult]
    error: ErrorInfo | None
    started_at_ms: int
    finished_at_ms: int


class StepFlight(TypedDict):
    """One saga step's command in the current phase: in flight, its attempt, when it is due, done."""

    waiting: bool
    attempt: int
    due_at_ms: int
    done: bool


class SagaSnapshot(TypedDict):
    """The coordinator's state of one transaction, for every protocol (`protocol` names which one;
    snapshots written before the field existed decode with its default, "saga")."""

    intent: TransactionIntent
    protocol: str
    phase: str
    current: int
    attempt: int
    due_at_ms: int
    waiting: bool
    steps: list[StepResult]
    before_images: list[str | None]
    # Sagas only (v4): one per step, and each step's dependencies. Other protocols leave them out (the
    # schema's default is []); a saga restored from an older snapshot rebuilds them (orchestrator/saga_order.py).
    flights: NotRequired[list[StepFlight]]
    waits_for: NotRequired[list[list[int]]]
    error: ErrorInfo | None
    started_at_ms: int
    updated_at_ms: int


class InputPosition(TypedDict):
    """How far a coordinator member folded one input partition, in its changelog (orchestrator/positions.py)."""

    topic: str
    partition: int
    next_offset: int


class DeadLetter(TypedDict):
    original_topic: str
    partition: int
    offset: int
    key: bytes | None
    payload: bytes
    payload_size: int
    error_class: str
    error_message: str
    tx_id: str | None
    consumer: str
    replay_of: str
    at_ms: int


class DeadlockVerdict(TypedDict):
    cycle: list[str]
    victim: str
    scores: dict[str, float]
    at_ms: int


class Decision(TypedDict):
    tx_id: str
    outcome: Literal["COMMIT", "ABORT"]
    participants: list[str]
    reason: str
    at_ms: int


class LockEvent(TypedDict):
    tx_id: str
    resource: str
    also: NotRequired[list[str]]  # more resources in one record (polycommit/lock_log.py); absent: none
    mode: Literal["SHARED", "EXCLUSIVE"]
    action: Literal["REQUESTED", "GRANTED", "WAITING", "RELEASED"]
    blockers: list[str]
    priority: int
    started_at_ms: int
    work_done: int
    at_ms: int


class LockRequest(TypedDict):
    """An interactive transaction asks for locks before its intent (or gives up, with `release`)."""

    tx_id: str
    request: int
    keys: list[str]
    mode: Literal["SHARED", "EXCLUSIVE"]
    shared_keys: list[str]
    release: bool
    name: str
    isolation: Isolation
    priority: int
    reply_to: str
    client_id: str
    lock_wait_ms: int
    created_at_ms: int


class LockReply(TypedDict):
    """The coordinator's answer to one LockRequest: GRANTED, or REFUSED with the error that ended it."""

    tx_id: str
    request: int
    status: Literal["GRANTED", "REFUSED"]
    error: ErrorInfo | None
    at_ms: int


class PartitionKey(TypedDict):
    key: str
    exclusive: bool


class LockPartitionRequest(TypedDict):
    """A transaction's keys of one lock-manager partition, asked at once, or (`release`) given up."""

    tx_id: str
    partition: int
    keys: list[PartitionKey]
    release: bool
    deadline_ms: int
    at_ms: int


class LockPartitionGrant(TypedDict):
    """A lock-manager partition's answer: the transaction holds its keys there, or waits for `blockers`."""

    tx_id: str
    partition: int
    granted: bool
    blockers: list[str]
    at_ms: int


class Alert(TypedDict):
    kind: str
    tx_id: str
    message: str
    at_ms: int


OperatorAction = Literal["RETRY", "RESOLVE_STEP"]


class OperatorCommand(TypedDict):
    """An operator's order about one transaction in flight (`polycommit tx retry|resolve`)."""

    tx_id: str
    action: OperatorAction
    step_index: int
    operator: str
    note: str
    at_ms: int


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def store_command(
    tx_id: str,
    step_index: int,
    action: StepAction,
    operation: Operation,
    *,
    compensation: Operation | None = None,
    attempt: int = 1,
    before_image: str | None = None,
    issued_at_ms: int | None = None,
    isolation: Isolation = "READ_COMMITTED",
) -> StoreCommand:
    return {
        "tx_id": tx_id,
        "step_index": step_index,
        "action": action,
        "attempt": attempt,
        "operation": operation,
        "compensation": compensation,
        "before_image": before_image,
        "issued_at_ms": now_ms() if issued_at_ms is None else issued_at_ms,
        "isolation": isolation,
    }


def error_info(error_class: str, message: str, retriable: bool) -> ErrorInfo:
    return {"error_class": error_class, "message": message[:2000], "retriable": retriable}
