"""Dead-letter records: a Kafka record that could not be processed, kept with where it came from and why.

Every consumer (the coordinator and each store's group) writes them to `polycommit.dead-letters` instead
of crashing or blocking its partition (P7).
"""

from __future__ import annotations

from typing import Any

from polycommit.errors import describe
from polycommit.events import DeadLetter, now_ms

DEAD_LETTER_PAYLOAD_LIMIT = 64 * 1024  # enough to inspect a poison record; a 2 MiB one is cut
# Set by `polycommit dead-letters replay` on a replayed record: a replay that fails again becomes a dead
# letter that names the one it replayed, and nothing replays it by itself (no loop).
REPLAY_HEADER = "polycommit-replay-of"


def replay_of(record: Any) -> str:
    """The dead-letter id a record replays (its REPLAY_HEADER), or ""."""
    for key, value in getattr(record, "headers", None) or ():
        if key == REPLAY_HEADER:
            return bytes(value).decode(errors="replace")
    return ""


def dead_letter(record: Any, exc: BaseException, consumer: str, tx_id: str | None = None) -> DeadLetter:
    """A dead-letter record for a Kafka record: where it came from, why it failed, and (part of) its bytes."""
    error_class, message, _ = describe(exc)
    payload = bytes(record.value or b"")
    return {
        "original_topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": bytes(record.key) if record.key is not None else None,
        "payload": payload[:DEAD_LETTER_PAYLOAD_LIMIT],
        "payload_size": len(payload),
        "error_class": error_class,
        "error_message": message[:4000],
        "tx_id": tx_id,
        "consumer": consumer,
        "replay_of": replay_of(record),
        "at_ms": now_ms(),
    }
