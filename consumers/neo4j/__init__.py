"""The Neo4j participant: pure effects (effects.py), Cypher text (cypher.py) and the I/O (participant.py)."""

from consumers.neo4j.cypher import MARKER_LABEL
from consumers.neo4j.participant import Neo4jParticipant, classify

__all__ = ["MARKER_LABEL", "Neo4jParticipant", "classify"]
