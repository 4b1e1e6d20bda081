"""What every store participant does with a batch of commands, and the exactly-once rules they share.

Each store keeps an *applied-step marker* per (transaction, step, action), written in the same local
transaction as the step's effect where the store has transactions. The marker decides what a command
may still do (property P4 of DESIGN.md):

- EXECUTE after the step's COMPENSATE marker      -> SKIPPED: a late step never lands after its undo;
- EXECUTE or COMPENSATE whose own marker exists   -> ALREADY_APPLIED: redelivery changes nothing;
- COMPENSATE with no EXECUTE marker               -> NOOP, and the COMPENSATE marker is written so that
                                                    the late EXECUTE, if it ever comes, is skipped;
- otherwise                                       -> apply, and write the marker with the before-image.

`plan()` is that table as a pure function (`consumers.planner` applies it to a whole batch); adapters do
only the I/O around it. Nothing here reads a clock: a participant measures its batch and passes `Timing`.
"""

from __future__ import annotations

import abc
import enum
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumers.command import TypedCommand, marker_id, parse_command
from polycommit.config import Settings
from polycommit.errors import PolycommitError, UnsupportedError, describe
from polycommit.events import ErrorInfo, OutcomeStatus, StepOutcome, Store, StoreCommand, error_info
from polycommit.failpoints import failpoint

__all__ = [
    "INLINE_BEFORE_IMAGE_BYTES",
    "Marker",
    "Participant",
    "Plan",
    "Timing",
    "before_image_reference",
    "failed",
    "generations",
    "is_reference",
    "marker_id",
    "outcome",
    "plan",
    "status_for",
    "travelling",
]


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


# A before-image travels in the step's outcome, then in the coordinator's snapshots and back in the
# COMPENSATE command, all Kafka records of at most 4 MiB (polycommit.bus.MAX_RECORD_BYTES) that hold
# other fields too. Past this size only a reference travels: the image stays in the store's EXECUTE
# marker, written with the effect, which is where every participant restores from anyway.
INLINE_BEFORE_IMAGE_BYTES = 64 * 1024


def before_image_reference(command: StoreCommand) -> str:
    """`{"in_marker": "<tx_id>/<step_index>/EXECUTE"}`: the image is the one in the step's EXECUTE marker."""
    return json.dumps({"in_marker": marker_id(command["tx_id"], command["step_index"], "EXECUTE")})


def is_reference(before_image: str | None) -> bool:
    return before_image is not None and before_image.startswith('{"in_marker":')


def travelling(command: StoreCommand, before_image: str | None) -> str | None:
    """The before-image as it may travel: itself, or a reference to the marker when it is too big."""
    if before_image is not None and len(before_image) > INLINE_BEFORE_IMAGE_BYTES:
        return before_image_reference(command)
    return before_image


@dataclass(frozen=True)
class Timing:
    """When a batch's outcomes were made (`at_ms`, wall clock) and how long it took: measured by the caller."""

    at_ms: int
    duration_us: int


def outcome(
    command: StoreCommand,
    store: Store,
    status: OutcomeStatus,
    timing: Timing,
    *,
    before_image: str | None = None,
    error: ErrorInfo | None = None,
) -> StepOutcome:
    return {
        "tx_id": command["tx_id"],
        "step_index": command["step_index"],
        "action": command["action"],
        "attempt": command["attempt"],
        "store": store,
        "status": status,
        "before_image": travelling(command, before_image),
        "error": error,
        "at_ms": timing.at_ms,
        "duration_us": timing.duration_us,
    }


def failed(command: StoreCommand, store: Store, exc: BaseException, timing: Timing) -> StepOutcome:
    cls, message, retriable = describe(exc)
    return outcome(command, store, "FAILED", timing, error=error_info(cls, message, retriable))


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


_TWO_PHASE = "this store does not vote in two-phase commit"


class Participant(abc.ABC):
    """A store's side of the protocol: takes a batch of commands, returns one outcome per command.

    `apply_commands` never raises for a single bad command: that command's outcome is FAILED with a typed
    error (`error.retriable` says whether the coordinator should try again), and the others still run.
    It raises only when the store itself is unreachable, so the consume loop retries the whole batch.
    Two-phase commit adds `vote` (PREPARE) and `finish` (COMMIT / ABORT, with the saga commands), called
    through `apply_any`.
    """

    store: Store
    settings: Settings

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, and create the marker table/constraints the adapter needs."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]:
        """A live check against the store: {'healthy': bool, 'version': str, ...}."""

    @abc.abstractmethod
    async def apply_commands(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        """Run parsed EXECUTE/COMPENSATE commands in order; one outcome per command, in the same order."""

    async def apply_batch(self, commands: Sequence[StoreCommand]) -> list[StepOutcome]:
        """Parse, then `apply_commands`: a command that does not parse fails alone (the worker parses
        before it calls `apply_commands`; this entry serves callers holding wire commands)."""
        from consumers import timing  # the clock stays out of this module's pure functions

        begun = timing.started()
        outcomes: dict[int, StepOutcome] = {}
        typed: list[tuple[int, TypedCommand]] = []
        for position, command in enumerate(commands):
            try:
                typed.append((position, parse_command(command, self.store, self.settings.max_payload_bytes)))
            except PolycommitError as exc:
                outcomes[position] = failed(command, self.store, exc, timing.since(begun))
        applied = await self.apply_commands([t for _, t in typed]) if typed else []
        outcomes.update((position, result) for (position, _), result in zip(typed, applied, strict=True))
        return [outcomes[i] for i in range(len(commands))]

    async def apply_any(self, commands: Sequence[TypedCommand]) -> list[StepOutcome | None]:
        """Saga and two-phase commit commands together: the saga commands and phase 2 run (`finish`), then
        the PREPAREs are voted on (`vote`); one outcome per command, in the same order. None: the command
        is held (a phase 2 waiting for others, see PostgreSQL's batches); its outcome comes from `released`."""
        from consumers import twophase

        if not twophase.has_two_phase(commands):
            return list(await self.apply_commands(commands))
        prepares, others = twophase.split(commands)
        results: dict[int, StepOutcome | None] = {}
        # Phase 2 first: it frees PostgreSQL's prepared-transaction slots. Safe in any order: an ABORT
        # before its PREPARE fences it (the PREPARE then votes no), and a COMMIT is only ever sent after
        # its PREPARE voted, so a PREPARE met after it is a redelivery (its step is already committed).
        if others:
            results.update(zip(others, await self.finish([commands[i] for i in others]), strict=True))
        if prepares:
            results.update(zip(prepares, await self.vote([commands[i] for i in prepares]), strict=True))
        return [results[i] for i in range(len(commands))]

    def released(self) -> list[StepOutcome]:
        """Outcomes of commands held by earlier batches (None in `apply_any`) that are settled now; each is
        returned once. A held command lost in a crash is sent again by the coordinator (phase-2 resend)."""
        return []

    async def vote(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        """Phase 1: one vote per PREPARE, PREPARED or VOTED_NO (its error says why)."""
        raise UnsupportedError(_TWO_PHASE)

    async def finish(self, commands: Sequence[TypedCommand]) -> Sequence[StepOutcome | None]:
        """Saga commands and phase 2 (COMMIT / ABORT). The default is DESIGN.md's shape (b), for stores
        without a durable prepare: COMMIT applies the write-set as an EXECUTE, ABORT records its fence
        as a COMPENSATE that finds nothing to undo; both exactly once by the markers."""
        from consumers import twophase

        outcomes = await self.apply_commands([twophase.as_saga(c) for c in commands])
        if twophase.has_two_phase(commands):
            failpoint(f"{self.store}.phase2")  # the phase-2 effect is in the store, its outcome not published
        return [twophase.from_saga(c, o) for c, o in zip(commands, outcomes, strict=True)]

    async def in_doubt(self) -> list[str]:
        """Transactions prepared here and not yet settled (a store with a durable prepare only)."""
        return []
