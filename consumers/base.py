"""What every store participant does with a batch of commands, and the exactly-once rules they share.

Each store keeps an *applied-step marker* per (transaction, step, action), written in the same local
transaction as the step's effect where the store has transactions. The marker decides what a command
may still do (property P4 of DESIGN.md):

- EXECUTE after the step's COMPENSATE marker      -> SKIPPED: a late step never lands after its undo;
- EXECUTE or COMPENSATE whose own marker exists   -> ALREADY_APPLIED: redelivery changes nothing;
- COMPENSATE with no EXECUTE marker               -> NOOP, and the COMPENSATE marker is written so that
                                                    the late EXECUTE, if it ever comes, is skipped;
- otherwise                                       -> apply, and write the marker with the before-image.

`plan()` is that table as a pure function; adapters do only the I/O around it.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polycommit.errors import describe
from polycommit.events import ErrorInfo, OutcomeStatus, StepOutcome, Store, StoreCommand, error_info, now_ms


@dataclass(frozen=True)
class Marker:
    """A step action recorded in a store; `before_image` is JSON text (None: nothing existed before)."""

    before_image: str | None
    pending: bool = False  # written ahead of a non-transactional effect (Qdrant), not yet confirmed


class Plan(enum.Enum):
    APPLY_EXECUTE = "apply_execute"
    APPLY_COMPENSATION = "apply_compensation"
    RECORD_NOOP_COMPENSATION = "record_noop_compensation"
    ALREADY_APPLIED = "already_applied"
    SKIP = "skip"


def marker_id(tx_id: str, step_index: int, action: str) -> str:
    return f"{tx_id}/{step_index}/{action}"


def plan(command: StoreCommand, execute: Marker | None, compensate: Marker | None) -> Plan:
    """What a command may do, given the markers its step already has in the store."""
    if command["action"] == "EXECUTE":
        if compensate is not None:
            return Plan.SKIP
        if execute is not None and not execute.pending:
            return Plan.ALREADY_APPLIED
        return Plan.APPLY_EXECUTE
    if command["action"] == "COMPENSATE":
        if compensate is not None and not compensate.pending:
            return Plan.ALREADY_APPLIED
        if execute is None:
            return Plan.RECORD_NOOP_COMPENSATION
        return Plan.APPLY_COMPENSATION
    raise ValueError(f"saga participants do not handle {command['action']}")


def outcome(
    command: StoreCommand,
    store: Store,
    status: OutcomeStatus,
    *,
    before_image: str | None = None,
    error: ErrorInfo | None = None,
    started_ns: int | None = None,
) -> StepOutcome:
    duration_us = (time.perf_counter_ns() - started_ns) // 1000 if started_ns is not None else 0
    return {
        "tx_id": command["tx_id"],
        "step_index": command["step_index"],
        "action": command["action"],
        "attempt": command["attempt"],
        "store": store,
        "status": status,
        "before_image": before_image,
        "error": error,
        "at_ms": now_ms(),
        "duration_us": duration_us,
    }


def failed(command: StoreCommand, store: Store, exc: BaseException, started_ns: int | None = None) -> StepOutcome:
    cls, message, retriable = describe(exc)
    return outcome(command, store, "FAILED", error=error_info(cls, message, retriable), started_ns=started_ns)


def status_for(plan_: Plan) -> OutcomeStatus:
    statuses: dict[Plan, OutcomeStatus] = {
        Plan.APPLY_EXECUTE: "APPLIED",
        Plan.APPLY_COMPENSATION: "APPLIED",
        Plan.RECORD_NOOP_COMPENSATION: "NOOP",
        Plan.ALREADY_APPLIED: "ALREADY_APPLIED",
        Plan.SKIP: "SKIPPED",
    }
    return statuses[plan_]


def generations(
    commands: Sequence[StoreCommand], keys: Mapping[int, Sequence[str]], alone: Collection[int] = ()
) -> list[list[int]]:
    """Split a batch (by position) into consecutive groups in which no resource key repeats.

    Within a group, writes to different keys may be applied together (one UNWIND, one upsert call),
    and each before-image is read before the group's writes. A key seen again starts a new group, so
    the second writer's before-image is the first writer's result, as if applied one by one. A position
    in `alone` (a raw statement whose keys are unknown) is a group of its own, in order.
    """
    groups: list[list[int]] = []
    seen: set[str] = set()
    current: list[int] = []
    for position in range(len(commands)):
        if position in alone:
            if current:
                groups.append(current)
            groups.append([position])
            current, seen = [], set()
            continue
        command_keys = keys.get(position, ())
        if any(k in seen for k in command_keys):
            groups.append(current)
            current, seen = [], set()
        current.append(position)
        seen.update(command_keys)
    if current:
        groups.append(current)
    return groups


class Participant(abc.ABC):
    """A store's side of the protocol: takes a batch of commands, returns one outcome per command.

    `apply_batch` never raises for a single bad command: that command's outcome is FAILED with a typed
    error (`error.retriable` says whether the coordinator should try again), and the others still run.
    It raises only when the store itself is unreachable, so the consume loop retries the whole batch.
    """

    store: Store

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, and create the marker table/constraints the adapter needs."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]:
        """A live check against the store: {'healthy': bool, 'version': str, ...}."""

    @abc.abstractmethod
    async def apply_batch(self, commands: Sequence[StoreCommand]) -> list[StepOutcome]:
        """Run EXECUTE/COMPENSATE commands in order; one outcome per command, in the same order."""
