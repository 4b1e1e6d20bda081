"""How the Qdrant participant plans a batch, without I/O: each command's way through it as a `Step`.

The shared planner decides what each command may do; here each decision becomes point writes, and a
step whose operation expects versions its points are not at fails (`check_versions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from consumers.base import Marker, Plan
from consumers.command import TypedCommand
from consumers.planner import Planned, plan_batch
from consumers.qdrant.effects import (
    PointWrites,
    marker_point_id,
    recorded_versions,
    restore_writes,
    version_conflict,
    writes_of,
)
from polycommit.errors import InvalidOperationError
from polycommit.parsed import PointsOperation, keys_of


@dataclass(eq=False)
class Step:
    """One planned command's way through the batch (`index`: its position in the batch as given)."""

    planned: Planned
    index: int
    writes: PointWrites | None = None  # None for a compensation derived from an EXECUTE earlier in the batch
    source: Step | None = None  # that EXECUTE, or the twin an ALREADY_APPLIED repeats
    before: str | None = None
    before_known: bool = False
    versions: dict[str, int] = field(default_factory=dict)  # each written point's version before this step
    error: BaseException | None = None
    keys: list[str] = field(default_factory=list)
    marker: str = field(init=False)  # this command's own marker id...
    marker_point: str = field(init=False)  # ...and its point id in MARKERS

    def __post_init__(self) -> None:
        self.marker = self.planned.command.own_id
        self.marker_point = marker_point_id(self.marker)

    @property
    def decision(self) -> Plan:
        return self.planned.decision


def points_op(op: object) -> PointsOperation:
    if not isinstance(op, PointsOperation):  # parse_command admits no other qdrant operation
        raise InvalidOperationError(f"the qdrant participant cannot run {type(op).__name__}")
    return op


def targets(command: TypedCommand) -> set[str]:
    return {op.collection for op in (command.operation, command.compensation) if isinstance(op, PointsOperation)}


# -- planning (pure) --------------------------------------------------------------------------------


def plan_steps(
    commands: Sequence[TypedCommand], markers: dict[str, Marker], sizes: dict[str, int]
) -> tuple[list[Step], dict[int, BaseException]]:
    """Plan the batch with the shared planner, then turn each decision into point writes. A command the
    store refuses (a missing collection, a wrong vector size) is left out and the rest planned again,
    so it never counts as recorded for the commands after it."""
    rejected: dict[int, BaseException] = {}
    while True:
        kept = [i for i in range(len(commands)) if i not in rejected]
        steps = [Step(p, kept[p.position]) for p in plan_batch([commands[i] for i in kept], markers)]
        fresh: dict[int, BaseException] = {}
        for step in steps:
            try:
                prepare_step(step, steps, sizes)
            except Exception as exc:  # anything wrong with one command fails that command alone
                fresh[step.index] = exc
        if not fresh:
            return steps, rejected
        rejected.update(fresh)


def prepare_step(step: Step, steps: Sequence[Step], sizes: dict[str, int]) -> None:
    p = step.planned
    command = p.command
    if p.earlier is not None:
        step.source = steps[p.earlier]
    if p.decision is Plan.APPLY_EXECUTE:
        step.writes = writes_of(points_op(command.operation), sizes)
        step.keys = keys_of(command.operation)
        if p.own is not None and p.own.pending:
            # An earlier attempt may have written the data already, so the store may show our own
            # write: the before-image (and the versions) recorded ahead of it are the only true ones.
            step.before, step.before_known = p.own.before_image, True
            step.versions = recorded_versions(step.before)
    elif p.decision is Plan.APPLY_COMPENSATION:
        # A restore writes back exactly the points its EXECUTE wrote (the before-image names them all).
        step.keys = keys_of(command.compensation or command.operation)
        if command.compensation is not None:
            step.writes = writes_of(points_op(command.compensation), sizes)
        elif p.execute is not None:
            step.writes = restore_writes(points_op(command.operation).collection, p.execute.before_image)
        # else: the EXECUTE is earlier in this batch; its before-image exists once its generation ran


def check_versions(steps: Sequence[Step]) -> None:
    """Fail the steps whose operation expects versions its points are not at. Atomic with the write: a
    participant applies one batch at a time (`_lock`), and Qdrant Edge admits one process per storage
    path, so no other writer can come between this check and the write; against a Qdrant server with
    several consumers of commands.qdrant, keys are serialised by the coordinator's locks (2PC)."""
    for step in steps:
        command = step.planned.command
        if step.decision is Plan.APPLY_EXECUTE:
            op = command.operation
        elif step.decision is Plan.APPLY_COMPENSATION and command.compensation is not None:
            op = command.compensation
        else:
            continue
        if isinstance(op, PointsOperation) and op.expected_version is not None:
            step.error = version_conflict(op, step.versions)
