"""What a Qdrant command writes, without I/O: point writes, before-images and the writes that restore one.

A step's before-image is `{"points": {"<id>": null | {"vector": [...], "payload": {...}}}, "versions":
{"<id>": n}}` for every point it writes; restoring it deletes the points that did not exist and rewrites
the others. Markers are points of their own collection, with ids derived from the marker's name.

Versions (polycommit.versioning) live in the point's payload (`_polycommit_version`), so a point and its
version are written by one upsert; a deleted point's version goes to a tombstone point in
`_polycommit_versions`. Payloads in before-images are the user's, without the version: a restore writes
them back with a NEW version (a compensation is a write like any other).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from consumers.qdrant.backend import PointData
from polycommit.errors import InvalidOperationError, VersionConflict
from polycommit.parsed import PointsOperation, canonical_id, dumps
from polycommit.versioning import (
    TOMBSTONES,
    VERSION_FIELD,
    conflict,
    point_version,
    tombstone_id,
    without_version,
)

MARKERS = "_polycommit_markers"
# Fixed forever: marker point ids derive from it, and a new value would orphan every existing marker.
MARKER_NAMESPACE = uuid.UUID("0b6c1f5e-8d3a-4e57-9c1d-7a2e4f6b8c90")
MARKER_VECTOR = [1.0]  # Qdrant points need a vector; markers are only ever read by id
_NAMESPACE_BYTES = MARKER_NAMESPACE.bytes


def marker_point_id(marker: str) -> str:
    """The point id of a marker in `_polycommit_markers`: uuid5(MARKER_NAMESPACE, marker).

    Deterministic, so a rewrite overwrites the marker. Spelled out rather than `str(uuid.uuid5(...))`,
    which builds two UUID objects and costs 3 µs, a tenth of a whole command's budget (3 per command).
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + marker.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class PointWrites:
    """Point writes by collection. Within a generation no point repeats, so their order is free."""

    upserts: dict[str, dict[str, PointData]] = field(default_factory=dict)
    deletes: dict[str, list[str]] = field(default_factory=dict)

    def upsert(self, collection: str, point_id: str, point: PointData) -> None:
        self.upserts.setdefault(collection, {})[point_id] = point

    def delete(self, collection: str, point_id: str) -> None:
        self.deletes.setdefault(collection, []).append(point_id)

    def merge(self, other: PointWrites) -> None:
        for collection, points in other.upserts.items():
            self.upserts.setdefault(collection, {}).update(points)
        for collection, ids in other.deletes.items():
            self.deletes.setdefault(collection, []).extend(ids)

    def touched(self) -> list[tuple[str, str]]:
        """(collection, point id) of every point written, upserts first."""
        pairs = [(c, i) for c, points in self.upserts.items() for i in points]
        return pairs + [(c, i) for c, ids in self.deletes.items() for i in ids]


def writes_of(op: PointsOperation, sizes: Mapping[str, int]) -> PointWrites:
    """Check an operation against the store's collections (`sizes`: vector size by existing collection)
    and turn it into point writes."""
    target = op.collection
    if target in (MARKERS, TOMBSTONES):
        raise InvalidOperationError(f"collection {target} is reserved for polycommit")
    size = sizes.get(target)
    if size is None:
        raise InvalidOperationError(f"collection {target} does not exist")
    writes = PointWrites()
    if op.kind == "delete_points":
        for point_id in op.ids:
            writes.delete(target, point_id)
        return writes
    for p in op.points:
        if len(p.vector) != size:
            raise InvalidOperationError(f"wrong vector size: expected {size}, got {len(p.vector)}")
        if VERSION_FIELD in p.payload:
            raise InvalidOperationError(f"payload field {VERSION_FIELD} is reserved for polycommit's versions")
        writes.upsert(target, p.id, {"vector": p.vector, "payload": p.payload})
    return writes


def restore_writes(collection: str, before_image: str | None) -> PointWrites:
    """The writes that put back a before-image: points that did not exist are deleted, others rewritten."""
    if before_image is None:
        raise InvalidOperationError("the step's EXECUTE marker holds no before-image to restore")
    points = json.loads(before_image).get("points")
    if not isinstance(points, dict):
        raise InvalidOperationError("the step's before-image has no 'points' object")
    writes = PointWrites()
    for point_id, old in points.items():
        if old is None:
            writes.delete(collection, canonical_id(point_id))
        else:
            vector = [float(x) for x in old["vector"]]
            payload = without_version(old["payload"])
            writes.upsert(collection, canonical_id(point_id), {"vector": vector, "payload": payload})
    return writes


def _users(point: PointData | None) -> PointData | None:
    return None if point is None else {"vector": point["vector"], "payload": without_version(point["payload"])}


def before_image(writes: PointWrites, found: Mapping[str, Mapping[str, PointData]], versions: Mapping[str, int]) -> str:
    """`{"points": {"<id>": null | {"vector": [...], "payload": {...}}}, "versions": {"<id>": n}}` for every
    point the step writes (the versions recorded too: a re-applied step checks and bumps from them)."""
    touched = writes.touched()
    points = {i: _users(found.get(c, {}).get(i)) for c, i in touched}
    return dumps({"points": points, "versions": {i: versions.get(i, 0) for _, i in touched}})


# -- versions -----------------------------------------------------------------------------------------


def current_versions(
    touched: Iterable[tuple[str, str]],
    found: Mapping[str, Mapping[str, PointData]],
    tombstones: Mapping[str, PointData],
) -> dict[str, int]:
    """The version of each (collection, point id) as read (`found`: points by collection and id;
    `tombstones`: tombstone points by their id), by point id."""
    versions: dict[str, int] = {}
    for collection, point_id in touched:
        point = found.get(collection, {}).get(point_id)
        tombstone = tombstones.get(tombstone_id(collection, point_id))
        versions[point_id] = point_version(
            point["payload"] if point is not None else None, tombstone["payload"] if tombstone is not None else None
        )
    return versions


def recorded_versions(image: str | None) -> dict[str, int]:
    """The versions a before-image recorded (none in an image written before versions existed: all 0)."""
    versions = json.loads(image).get("versions") if image else None
    return {str(k): int(v) for k, v in versions.items()} if isinstance(versions, dict) else {}


def version_conflict(op: PointsOperation, versions: Mapping[str, int]) -> VersionConflict | None:
    """The first point of `op` not at its expected version (one expected version for every point)."""
    for point_id in op.ids:
        problem = conflict(f"qdrant:{op.collection}:{point_id}", op.expected_version, versions.get(point_id, 0))
        if problem is not None:
            return problem
    return None


def versioned(writes: PointWrites, versions: Mapping[str, int]) -> PointWrites:
    """The writes as stored: each upserted point carries its new version, each deleted one a tombstone."""
    stored = PointWrites()
    for collection, points in writes.upserts.items():
        for point_id, point in points.items():
            payload = {**point["payload"], VERSION_FIELD: versions.get(point_id, 0) + 1}
            stored.upsert(collection, point_id, {"vector": point["vector"], "payload": payload})
    for collection, ids in writes.deletes.items():
        for point_id in ids:
            stored.delete(collection, point_id)
            tombstone = {VERSION_FIELD: versions.get(point_id, 0) + 1, "collection": collection, "id": point_id}
            stored.upsert(
                TOMBSTONES, tombstone_id(collection, point_id), {"vector": MARKER_VECTOR, "payload": tombstone}
            )
    return stored
