"""What a PostgreSQL command does, without I/O: its before-image, the compensation that restores one, its groups.

A structured step's before-image is `{"row": <the row as JSON> | null}`, read under FOR UPDATE in the
step's own transaction. Its compensation, unless the step declares one, puts that row back (an upsert of
the whole row) or, when there was none, deletes the row the step created.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from consumers.base import Plan
from consumers.planner import Planned
from polycommit import versioning
from polycommit.errors import InvalidOperationError, VersionConflict
from polycommit.parsed import RowOperation, keys_of

Shape = tuple[str, str, tuple[str, ...], tuple[str, ...]]  # (kind, table, key columns, other columns)


def row_image(row_json: str | None) -> str:
    """The before-image of a row as found (None: absent), in the marker's and the outcome's format."""
    return '{"row":' + (row_json or "null") + "}"


def restoring(op: RowOperation, before_image: str | None) -> RowOperation:
    """The operation that puts `op`'s row back as the before-image recorded it."""
    row: Any = None
    if before_image:
        try:
            row = json.loads(before_image)["row"]
        except (ValueError, TypeError, KeyError):
            raise InvalidOperationError(f"before-image {before_image[:200]!r} has no 'row'") from None
    if row is None:
        return RowOperation("delete_row", op.table, op.key, {})
    if not isinstance(row, dict):
        raise InvalidOperationError("the before-image's 'row' is not an object")
    return RowOperation("upsert_row", op.table, op.key, row)


def shape(op: RowOperation) -> Shape:
    """Steps of one shape share statements: same kind, table, key columns and written columns."""
    return op.kind, op.table, tuple(sorted(op.key)), tuple(sorted(k for k in op.values if k not in op.key))


def key_doc(op: RowOperation) -> str:
    return json.dumps(op.key)


def row_doc(op: RowOperation) -> str:
    """The row an upsert writes: its values, with the key columns winning."""
    return json.dumps({**op.values, **op.key})


def set_based(p: Planned) -> bool:
    """Structured EXECUTEs share set-based statements with the rest of their group; anything else (raw
    SQL, a compensation) runs on its own, in order, so the batch behaves as if applied one by one."""
    return p.decision is Plan.APPLY_EXECUTE and isinstance(p.command.operation, RowOperation)


def writes(p: Planned) -> list[str]:
    return keys_of(p.command.operation) if set_based(p) else []


# -- versions (polycommit.versioning: a polycommit-owned table, bumped in the write's own transaction) --


def resource(op: RowOperation) -> str:
    """The row's version key: its lock key."""
    return keys_of(op)[0]


def checks_versions(ops: list[RowOperation]) -> bool:
    """Whether a group must read its versions under lock before writing (any expected version in it)."""
    return any(op.expected_version is not None for op in ops)


def version_conflicts(members: list[tuple[int, RowOperation]], versions: dict[str, int]) -> dict[int, VersionConflict]:
    """The members (by position) whose expected version is not the locked one (absent: 0, never written)."""
    found: dict[int, VersionConflict] = {}
    for position, op in members:
        name = resource(op)
        problem = versioning.conflict(name, op.expected_version, versions.get(name, 0))
        if problem is not None:
            found[position] = problem
    return found


# The isolation levels, weakest first, by their names in asyncpg's `transaction(isolation=...)`.
# PostgreSQL runs READ UNCOMMITTED as READ COMMITTED.
_LEVELS = {
    "READ_UNCOMMITTED": "read_uncommitted",
    "READ_COMMITTED": "read_committed",
    "REPEATABLE_READ": "repeatable_read",
    "SERIALIZABLE": "serializable",
}


def batch_isolation(levels: Iterable[str]) -> str:
    """The level a batch's transaction runs at: the strictest its commands ask (each command's
    transaction gets at least its own level; READ COMMITTED for a batch of none)."""
    order = list(_LEVELS)
    strictest = max((order.index(level) for level in levels if level in _LEVELS), default=1)
    return _LEVELS[order[strictest]]


def begin_statement(isolation: str) -> str:
    """BEGIN at an asyncpg level name (`batch_isolation`), for the batches that begin by hand."""
    return f"BEGIN ISOLATION LEVEL {isolation.replace('_', ' ').upper()}"
