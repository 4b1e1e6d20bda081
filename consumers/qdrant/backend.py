"""What the Qdrant participant needs from Qdrant: one small interface, and the helpers its two backends share.

The two backends are the embedded Qdrant Edge engine (edge.py) and qdrant-client (client.py). The
participant (`consumers/qdrant/participant.py`) speaks only `QdrantBackend`: collections by name, points by
string id (an unsigned integer as text, or a UUID), each point a dense default vector plus a JSON
payload. A backend converts ids to what its engine takes and turns engine failures into polycommit's
typed errors: `StoreUnavailableError` when trying again later may help (a lock held by another
process, a server that cannot be reached), `StoreError` otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypedDict, TypeVar

from polycommit.errors import InvalidOperationError, StoreError
from polycommit.parsed import IDENTIFIER, canonical_id

T = TypeVar("T")

DISTANCES = ("Cosine", "Euclid", "Dot", "Manhattan")

__all__ = ["DISTANCES", "PointData", "QdrantBackend", "canonical_id", "dense_vector", "engine_id", "point_data"]


class PointData(TypedDict):
    vector: list[float]
    payload: dict[str, Any]


class QdrantBackend(Protocol):
    """What the participant needs from Qdrant; every call is one round trip (or one engine call)."""

    name: str  # "edge" | "client" | "local"
    address: str

    async def ensure_collection(self, name: str, size: int, distance: str) -> int:
        """Create the collection if it is missing; return its vector size (which may differ from `size`)."""
        ...

    async def collection_info(self, name: str) -> int | None:
        """The collection's vector size, or None when it does not exist."""
        ...

    async def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = True) -> dict[str, PointData]:
        """The points that exist among `ids`, by canonical id; missing ids are absent from the result."""
        ...

    async def upsert(self, collection: str, points: Mapping[str, PointData]) -> None: ...

    async def delete(self, collection: str, ids: Sequence[str]) -> None: ...

    async def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        """Merge `payload` into the payload of existing points (all of `ids` must exist)."""
        ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    async def version(self) -> str:
        """The engine's version; a live call where the engine is remote."""
        ...


# -- point ids --------------------------------------------------------------------------------------


def engine_id(point_id: str) -> int | str:
    """An id in the form both engines take: an int, or the UUID text (numeric text is refused by Edge)."""
    return int(point_id) if point_id.isdigit() else point_id


def dense_vector(vector: object) -> list[float]:
    """The default (unnamed) dense vector of a stored point, whichever shape the engine returns it in."""
    if isinstance(vector, dict):
        vector = vector.get("")
    if not isinstance(vector, list):
        raise StoreError(
            f"expected a dense default vector, got {type(vector).__name__}", retriable=False, store="qdrant"
        )
    return [float(x) for x in vector]


def check_name(name: str) -> None:
    # Edge maps a collection to a directory: a plain identifier can never escape the storage root.
    if not IDENTIFIER.match(name):
        raise InvalidOperationError(f"collection name {name!r} is not a plain identifier")


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise InvalidOperationError(f"unknown distance {distance!r}; Qdrant has {', '.join(DISTANCES)}")


def point_data(records: Iterable[Any], with_vectors: bool) -> dict[str, PointData]:
    """Retrieved records (Edge's or qdrant-client's: both have id, vector, payload) by canonical id."""
    return {
        canonical_id(r.id): {
            "vector": dense_vector(r.vector) if with_vectors else [],
            "payload": dict(r.payload or {}),
        }
        for r in records
    }
