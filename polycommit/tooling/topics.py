"""`polycommit topics list`: each polycommit topic with its partitions and replication factor, from the broker.

One metadata request through the admin client (which never creates a topic it is asked about); a topic
the broker does not have is listed as missing.
"""

from __future__ import annotations

from typing import Any

from polycommit.bus import topics_for
from polycommit.config import Settings
from polycommit.kafka_client import make_admin

UNKNOWN_TOPIC = 3  # Kafka's UNKNOWN_TOPIC_OR_PARTITION error code


def shape(described: dict[str, Any]) -> dict[str, Any]:
    """One topic of a metadata response as listed: partitions, replication factor, in-sync replicas."""
    if described["error_code"] == UNKNOWN_TOPIC:
        return {"exists": False, "partitions": 0, "replication_factor": 0, "in_sync_replicas_min": 0}
    partitions = described["partitions"]
    return {
        "exists": True,
        "partitions": len(partitions),
        "replication_factor": max((len(p["replicas"]) for p in partitions), default=0),
        "in_sync_replicas_min": min((len(p["isr"]) for p in partitions), default=0),
    }


async def list_topics(settings: Settings) -> dict[str, dict[str, Any]]:
    names = topics_for(settings).all()
    admin = make_admin(settings, request_timeout_ms=15000)
    await admin.start()
    try:
        described = {d["topic"]: d for d in await admin.describe_topics(names)}
    finally:
        await admin.close()
    return {name: shape(described.get(name, {"error_code": UNKNOWN_TOPIC})) for name in names}
