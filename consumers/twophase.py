"""Two-phase commit on the participants' side: PREPARE votes, COMMIT/ABORT through the saga markers.

A batch may mix saga commands and 2PC commands. PREPAREs are voted on by the store (`Participant.vote`)
after the rest ran (see `Participant.apply_any` for why any order is safe): a vote changes no store
state in Neo4j and Qdrant, and in PostgreSQL a prepare is its own prepared transaction. For the stores that
cannot hold a prepared transaction durably (Neo4j, Qdrant: DESIGN.md's shape (b)), phase 2 runs on the
exactly-once markers the saga path already has: COMMIT is an EXECUTE of the write-set (batched with the
rest: UNWIND, one upsert call), ABORT a COMPENSATE that finds no EXECUTE marker, so it only records its
fence marker (NOOP) and any later PREPARE/COMMIT of the step is refused. Pure translation here; the
participant does the I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from consumers.command import TypedCommand
from polycommit.events import OutcomeStatus, StepAction, StepOutcome, error_info
from polycommit.parsed import ParsedOperation, RawOperation

TWO_PHASE_ACTIONS = frozenset({"PREPARE", "COMMIT", "ABORT"})
_SAGA_ACTION: dict[str, StepAction] = {"COMMIT": "EXECUTE", "ABORT": "COMPENSATE"}


def as_saga(command: TypedCommand) -> TypedCommand:
    """COMMIT -> EXECUTE, ABORT -> COMPENSATE (with no compensation: nothing was applied to undo).

    The write-set applies without its expected version: the vote checked it, under the coordinator's
    exclusive locks held until phase 2 ends; a decided COMMIT must not fail on it afterwards (it would
    be a hazard retried forever)."""
    action = _SAGA_ACTION.get(command.action)
    if action is None:
        return command
    source = {**command.source, "action": action, "compensation": None}
    return TypedCommand(source, without_expected_version(command.operation), None)  # type: ignore[arg-type]


def without_expected_version(operation: ParsedOperation) -> ParsedOperation:
    if isinstance(operation, RawOperation) or operation.expected_version is None:
        return operation
    return dataclasses.replace(operation, expected_version=None)


def from_saga(original: TypedCommand, result: StepOutcome) -> StepOutcome:
    """The saga path's outcome, reported as the phase-2 action it stood for."""
    if original.action not in _SAGA_ACTION:
        return result
    status: OutcomeStatus = result["status"]
    error = result["error"]
    if original.action == "COMMIT" and status == "SKIPPED":
        # The step was fenced by an ABORT: a COMMIT here means the decision log and this store disagree.
        status, error = "FAILED", error_info("CommitAfterAbort", "the step was aborted here before", False)
    return {**result, "action": original.source["action"], "status": status, "error": error, "before_image": None}


def split(commands: Sequence[TypedCommand]) -> tuple[list[int], list[int]]:
    """Positions of the PREPAREs, and of everything else (saga commands and phase 2)."""
    prepares = [i for i, c in enumerate(commands) if c.action == "PREPARE"]
    others = [i for i, c in enumerate(commands) if c.action != "PREPARE"]
    return prepares, others


def has_two_phase(commands: Sequence[TypedCommand]) -> bool:
    return any(c.action in TWO_PHASE_ACTIONS for c in commands)
