"""The Qdrant participant: pure effects (effects.py), the two backends that build Qdrant's requests
(backend.py, edge.py, client.py) and the I/O (participant.py)."""

from consumers.qdrant.backend import canonical_id
from consumers.qdrant.effects import MARKER_NAMESPACE, MARKERS, marker_point_id
from consumers.qdrant.participant import QdrantParticipant, backend_for

__all__ = ["MARKERS", "MARKER_NAMESPACE", "QdrantParticipant", "backend_for", "canonical_id", "marker_point_id"]
