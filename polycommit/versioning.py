"""Where each store keeps polycommit's version of a key, and the one rule that judges an expected version.

Every structured write polycommit applies (a row, a point, a node, a relationship) raises its key's
version by one, compensations included (a compensation is a new write: a reader who saw the undone
value must not be able to write over the restored one). A key never written has version 0, so an
`expected_version` of 0 means "must not exist yet". A deleted key keeps its version (a tombstone), so a
writer who read it before the delete cannot win with a version that restarted at 0.

Where the version lives, per store (the consumers write it; the SDK reads in `polycommit.reads` read it):

- PostgreSQL: a polycommit-owned table `polycommit_versions (resource, version)`, not a column of the
  user's table (their schema stays theirs). Its row is locked (FOR UPDATE) and bumped in the same local
  transaction as the write, and it survives the user row's delete: it is the tombstone.
- Neo4j: a polycommit-owned `(:PolycommitVersion {key, version})` node per key, written in the same
  transaction as the effect; as in PostgreSQL it covers relationships too, outlives a delete, and keeps
  the version out of the user's properties (and so out of before-images and restores).
- Qdrant: a payload field `_polycommit_version` of the point itself, so a point and its version are one
  atomic write and one atomic read (Qdrant has no multi-point transaction to keep a separate record in
  step). A deleted point's version goes to a tombstone point in `_polycommit_versions`.

Resources are named as lock keys are (`polycommit.parsed.keys_of`), so a version and a lock speak of the
same thing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from polycommit.errors import VersionConflict

VERSION_TABLE = "polycommit_versions"
VERSION_LABEL = "PolycommitVersion"
VERSION_FIELD = "_polycommit_version"
TOMBSTONES = "_polycommit_versions"
# Fixed forever: tombstone point ids derive from it.
_TOMBSTONE_NAMESPACE = uuid.UUID("3d0f8a52-61b4-4c7e-a1f9-5e2b7c9d4a18")


def conflict(resource: str, expected: int | None, actual: int) -> VersionConflict | None:
    """The conflict of a write that expects `expected` (None: no expectation) on a key at `actual`."""
    if expected is None or expected == actual:
        return None
    return VersionConflict(resource, expected, actual)


def tombstone_id(collection: str, point_id: str) -> str:
    """The point id, in TOMBSTONES, of the version of a deleted point (`point_id` canonical)."""
    return str(uuid.uuid5(_TOMBSTONE_NAMESPACE, f"{collection}/{point_id}"))


def payload_version(payload: Mapping[str, Any] | None) -> int | None:
    """A stored point's version (None: the point is absent or predates versions)."""
    if payload is None:
        return None
    value = payload.get(VERSION_FIELD)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def without_version(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The user's payload: what polycommit keeps beside it removed."""
    return {k: v for k, v in payload.items() if k != VERSION_FIELD}


def point_version(payload: Mapping[str, Any] | None, tombstone: Mapping[str, Any] | None) -> int:
    """A point's version: its payload's while it exists, else its tombstone's, else 0 (never written).

    A point written before versions existed counts as version 0 too: it was never versioned."""
    if payload is not None:
        return payload_version(payload) or 0
    return (payload_version(tombstone) or 0) if tombstone is not None else 0
