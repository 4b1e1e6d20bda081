"""The Qdrant backends under their old import path; they live in the `consumers.qdrant` package now."""

from consumers.qdrant.backend import DISTANCES, PointData, QdrantBackend, canonical_id, dense_vector, engine_id
from consumers.qdrant.client import ClientBackend
from consumers.qdrant.edge import THREAD_THRESHOLD_POINTS, EdgeBackend

__all__ = [
    "DISTANCES",
    "THREAD_THRESHOLD_POINTS",
    "ClientBackend",
    "EdgeBackend",
    "PointData",
    "QdrantBackend",
    "canonical_id",
    "dense_vector",
    "engine_id",
]
