"""What a Qdrant command writes, without I/O: point writes, before-images and the writes that restore one.

A step's before-image is `{"points": {"<id>": null | {"vector": [...], "payload": {...}}}}` for every
point it writes; restoring it deletes the points that did not exist and rewrites the others. Markers are
points of their own collection, with ids derived from the marker's name.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from consumers.qdrant.backend import PointData
from polycommit.errors import InvalidOperationError
from polycommit.parsed import PointsOperation, canonical_id, dumps

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
    if target == MARKERS:
        raise InvalidOperationError(f"collection {MARKERS} is reserved for polycommit's markers")
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
            writes.upsert(collection, canonical_id(point_id), {"vector": vector, "payload": dict(old["payload"])})
    return writes


def before_image(writes: PointWrites, found: Mapping[str, Mapping[str, PointData]]) -> str:
    """`{"points": {"<id>": null | {"vector": [...], "payload": {...}}}}` for every point the step writes."""
    return dumps({"points": {i: found.get(c, {}).get(i) for c, i in writes.touched()}})
