"""The SDK's versioned reads without servers: what they refuse, and how a Qdrant read turns points into versions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from polycommit import operations as ops
from polycommit import versioning
from polycommit.config import Settings, load_settings
from polycommit.errors import InvalidOperationError, UnsupportedError
from polycommit.reads import StoreReads, _node_query, _row_query


class Points:
    """A PointSource holding points by (collection, canonical id)."""

    def __init__(self, stored: Mapping[tuple[str, str], dict[str, Any]]) -> None:
        self.stored = stored

    async def retrieve(
        self, collection: str, ids: Sequence[str], with_vectors: bool = True
    ) -> dict[str, dict[str, Any]]:
        return {i: self.stored[(collection, i)] for i in ids if (collection, i) in self.stored}


def edge_settings() -> Settings:
    base = load_settings()
    return dataclasses.replace(base, qdrant=dataclasses.replace(base.qdrant, url=None, local_path=None))


async def test_qdrant_edge_cannot_be_read_from_the_client_without_the_consumers_backend() -> None:
    with pytest.raises(UnsupportedError, match="one process per storage path"):
        await StoreReads(edge_settings()).read_point("c", 1)


async def test_a_point_read_strips_the_version_from_the_payload_and_falls_back_to_its_tombstone() -> None:
    live, gone = ops.point_id("live"), ops.point_id("gone")
    source = Points(
        {
            ("c", live): {"vector": [1.0, 0.0], "payload": {"n": 3, versioning.VERSION_FIELD: 7}},
            (versioning.TOMBSTONES, versioning.tombstone_id("c", gone)): {
                "vector": [1.0],
                "payload": {versioning.VERSION_FIELD: 4},
            },
        }
    )
    reads = StoreReads(edge_settings(), point_source=source)
    found = await reads.read_point("c", "live")
    assert (found.value, found.version, found.vector, found.exists) == ({"n": 3}, 7, [1.0, 0.0], True)
    deleted = await reads.read_point("c", "gone")
    assert (deleted.value, deleted.version, deleted.exists) == (None, 4, False)
    never = await reads.read_point("c", "never")
    assert (never.value, never.version) == (None, 0)


def test_read_queries_take_plain_identifiers_only() -> None:
    assert '"documents"' in _row_query("documents", {"id": 1})
    with pytest.raises(InvalidOperationError):
        _row_query("documents; DROP TABLE x", {"id": 1})
    with pytest.raises(InvalidOperationError):
        _row_query("documents", {"id) OR (1": 1})
    assert "`Document`" in _node_query("Document", {"id": 1})
    with pytest.raises(InvalidOperationError):
        _node_query("Document`) DETACH DELETE (n", {"id": 1})
    with pytest.raises(InvalidOperationError):
        _node_query("Document", {"id`}) RETURN 1 //": 1})
