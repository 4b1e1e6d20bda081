"""The PostgreSQL participant: pure effects (effects.py), SQL text (sql.py) and the I/O (participant.py)."""

from consumers.postgres.failures import classify
from consumers.postgres.participant import PostgresParticipant
from consumers.postgres.sql import MARKER_TABLE

__all__ = ["MARKER_TABLE", "PostgresParticipant", "classify"]
