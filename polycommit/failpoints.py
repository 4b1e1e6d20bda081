"""Named crash points for fault tests: `POLYCOMMIT_FAILPOINT=name[:n]` kills this process with SIGKILL
the n-th time (default 1st) execution reaches `failpoint("name")`.

The point is to crash *between* two protocol steps (after the store committed, before the outcome was
published; after the outcome, before the offset commit; ...) exactly as kill -9 would, so recovery is
tested at every step rather than wherever a random kill happens to land. Unset, a failpoint costs one
dict lookup.
"""

from __future__ import annotations

import os
import signal

# Every failpoint the code has, with its one-line meaning (`polycommit failpoints`), so a test (or a typo)
# can be checked against the list.
MEANINGS: dict[str, str] = {
    "coordinator.before_commit": "decisions folded, Kafka transaction not yet committed",
    "coordinator.after_commit": "Kafka transaction committed (commands, snapshots, offsets)",
    "worker.after_apply": "the store committed the batch, no outcome published yet",
    "worker.after_publish": "outcomes acknowledged by Kafka, command offsets not yet committed",
    "postgres.after_prepare": "PREPARE TRANSACTION done, the vote not yet published",
    "neo4j.after_validate": "a PREPARE batch validated, the votes not yet published",
    "qdrant.between_points_and_marker": "Qdrant wrote the points, its marker not yet confirmed",
    "postgres.phase2": "COMMIT/ROLLBACK PREPARED done, its outcome not yet published",
    "postgres.after_batch_rollback": "a prepared batch rolled back for an ABORT, its COMMIT members not redone",
    "neo4j.phase2": "the COMMIT write-set / ABORT fence applied, its outcome not yet published",
    "qdrant.phase2": "the COMMIT write-set / ABORT fence applied, its outcome not yet published",
    "coordinator.after_decision": "a Decision committed with its phase-2 commands, nothing else done yet",
    "lock_manager.before_offsets": "a lock manager's answers acknowledged, the offsets it read not committed",
}
FAILPOINTS: tuple[str, ...] = tuple(MEANINGS)
# The failpoints only two-phase commit reaches (tests/fault/test_twopc_crash_points.py); sagas never do.
TWO_PHASE_ONLY: frozenset[str] = frozenset(
    {
        "postgres.after_prepare",
        "neo4j.after_validate",
        "postgres.phase2",
        "postgres.after_batch_rollback",
        "neo4j.phase2",
        "qdrant.phase2",
        "coordinator.after_decision",
    }
)

# The lock manager's (tests/integration/test_lock_manager.py); the coordinator does not ask it yet.
LOCK_MANAGER_ONLY: frozenset[str] = frozenset({"lock_manager.before_offsets"})

_hits: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("POLYCOMMIT_FAILPOINT", "")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count) if count.isdigit() else 1


def failpoint(name: str) -> None:
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
