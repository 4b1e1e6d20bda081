"""One transaction's history as operators read it: the log's records about it, in order, each summarised.

Pure: the caller reads the topics (polycommit/tooling/tx.py) and hands each decoded record here with its
topic, partition, offset and timestamp. Records are keyed by tx id; lock events are keyed by resource, so
they are matched on their own `tx_id` field, as are dead letters (keyed by tx id or by their origin).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The order of topics when two records share a timestamp: the order in which the protocol writes them.
TOPIC_ORDER = ("intents", "commands", "outcomes", "decisions", "locks", "alerts", "results", "dead-letters")


@dataclass(frozen=True)
class LogRecord:
    """A decoded record and where it was read."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    event_type: str
    record: Mapping[str, Any]


def _error(error: Mapping[str, Any] | None) -> str | None:
    return None if error is None else f"{error['error_class']}: {error['message']}"


def _size(value: Any) -> int | None:
    return None if value is None else len(value)


def _summary(event_type: str, r: Mapping[str, Any]) -> dict[str, Any]:
    """The fields an operator reads of each kind of record (store: the store it touched, if any)."""
    if event_type == "TransactionIntent":
        return {"name": r["name"], "steps": len(r["steps"]), "consistency": r["consistency"]}
    if event_type == "OperatorCommand":
        return {k: r[k] for k in ("action", "step_index", "operator", "note")}
    if event_type == "StoreCommand":
        return {
            "store": r["operation"]["store"],
            "action": r["action"],
            "step": r["step_index"],
            "attempt": r["attempt"],
        }
    if event_type == "StepOutcome":
        return {
            "store": r["store"],
            "action": r["action"],
            "step": r["step_index"],
            "attempt": r["attempt"],
            "status": r["status"],
            "error": _error(r["error"]),
            "before_image_bytes": _size(r["before_image"]),
        }
    if event_type == "Decision":
        return {"outcome": r["outcome"], "participants": list(r["participants"]), "reason": r["reason"]}
    if event_type == "LockEvent":
        return {"resources": [r["resource"], *r.get("also", ())], "mode": r["mode"], "action": r["action"]}
    if event_type == "Alert":
        return {"kind": r["kind"], "message": r["message"]}
    if event_type == "TransactionResult":
        steps = [f"{s['index']}:{s['store']}:{s['status']}" for s in r["steps"]]
        return {"status": r["status"], "error": _error(r["error"]), "steps": steps}
    if event_type == "DeadLetter":
        return {
            "original": f"{r['original_topic']}/{r['partition']}/{r['offset']}",
            "error": f"{r['error_class']}: {r['error_message']}",
            "consumer": r["consumer"],
        }
    return {}


def concerns(event_type: str, record: Mapping[str, Any], key: str | None, tx_id: str) -> bool:
    """Whether a record is about the transaction: its key, or (locks, dead letters) its tx_id field."""
    if event_type in ("LockEvent", "DeadLetter"):
        return record.get("tx_id") == tx_id or (event_type == "DeadLetter" and key == tx_id)
    return key == tx_id


def _rank(record: LogRecord) -> tuple[int, int, int]:
    short = record.topic.rsplit(".", 1)[-1] if ".commands." not in record.topic else "commands"
    order = TOPIC_ORDER.index(short) if short in TOPIC_ORDER else len(TOPIC_ORDER)
    return record.timestamp_ms, order, record.offset


def history(records: Iterable[LogRecord]) -> list[dict[str, Any]]:
    """The records in order (log time, then the protocol's order of topics), each summarised."""
    return [
        {
            "at_ms": r.timestamp_ms,
            "topic": r.topic,
            "position": f"{r.partition}/{r.offset}",
            "event": r.event_type,
            **_summary(r.event_type, r.record),
        }
        for r in sorted(records, key=_rank)
    ]


def stores_touched(events: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted({e["store"] for e in events if e.get("store")})
