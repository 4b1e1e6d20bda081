"""The transaction modes polycommit refuses, by the client SDK and by the coordinator alike.

An intent may ask for a mode whose guarantee polycommit cannot give; accepting it would silently give the
caller less than it asked for. Each row below is one refusal: the change that builds the missing part
deletes its row (consistency=STRONG left when two-phase commit was built; a priority other than 0 and the
isolation levels REPEATABLE_READ and SERIALIZABLE with interactive transactions, whose reads take SHARED
locks at those levels: `InteractiveScope.lock_for_read`). What is left: a strict level with `locks=False`,
which gives up the very locks the level is built on.
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
    locks: bool = True


@dataclass(frozen=True)
class UnsupportedMode:
    name: str  # as the error message names it
    needs: str  # what has to be built first
    asked: Callable[[Modes], bool]


_NEEDS_LOCKS = "the transaction's locks (locks=False gives up isolation)"
UNSUPPORTED_MODES: tuple[UnsupportedMode, ...] = (
    UnsupportedMode(
        "isolation=REPEATABLE_READ with locks=False",
        _NEEDS_LOCKS,
        lambda m: m.isolation == "REPEATABLE_READ" and not m.locks,
    ),
    UnsupportedMode(
        "isolation=SERIALIZABLE with locks=False", _NEEDS_LOCKS, lambda m: m.isolation == "SERIALIZABLE" and not m.locks
    ),
)


def refuse_unsupported(consistency: str, isolation: str, priority: int, locks: bool = True) -> None:
    """Raise UnsupportedError naming the first mode asked for that polycommit does not run."""
    modes = Modes(consistency, isolation, priority, locks)
    for mode in UNSUPPORTED_MODES:
        if mode.asked(modes):
            raise UnsupportedError(f"{mode.name} is not supported yet: it needs {mode.needs}")
