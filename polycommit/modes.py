"""The transaction modes polycommit does not run yet, refused by the client SDK and by the coordinator alike.

An intent may ask for a stricter isolation level; until its mapping onto locks exists, accepting it would
silently give the caller less than it asked for. (A priority is accepted: it weighs in the choice of a
deadlock victim, orchestrator/interactive.py.) Each row below is one refusal: the change
that builds the missing part deletes its row (consistency=STRONG left when two-phase commit was built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from polycommit.errors import UnsupportedError


@dataclass(frozen=True)
class Modes:
    consistency: str
    isolation: str
    priority: int


@dataclass(frozen=True)
class UnsupportedMode:
    name: str  # as the error message names it
    needs: str  # what has to be built first
    asked: Callable[[Modes], bool]


UNSUPPORTED_MODES: tuple[UnsupportedMode, ...] = (
    UnsupportedMode("isolation=REPEATABLE_READ", "the lock manager", lambda m: m.isolation == "REPEATABLE_READ"),
    UnsupportedMode("isolation=SERIALIZABLE", "the lock manager", lambda m: m.isolation == "SERIALIZABLE"),
)


def refuse_unsupported(consistency: str, isolation: str, priority: int) -> None:
    """Raise UnsupportedError naming the first mode asked for that polycommit does not run yet."""
    modes = Modes(consistency, isolation, priority)
    for mode in UNSUPPORTED_MODES:
        if mode.asked(modes):
            raise UnsupportedError(f"{mode.name} is not supported yet: it needs {mode.needs}")
