"""The dead-letter topic as operators see it: records in, the decoded letters (oldest first) out.

Payloads are shown by size only: a dead letter's payload is the record that could not be handled, which
may hold user data and may be large.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from polycommit.codec import EventCodec
from polycommit.errors import CodecError


def letter(codec: EventCodec, value: bytes | None) -> dict[str, Any] | None:
    """One record of the topic as a letter to show, or None for bytes that are not a DeadLetter."""
    try:
        decoded = codec.decode_as(value, "DeadLetter")
    except CodecError:
        return None  # not a letter of ours: nothing to show, and no reason to stop listing the others
    decoded["payload"] = f"{decoded['payload_size']} bytes"
    decoded["key"] = decoded["key"].decode(errors="replace") if decoded["key"] else None
    return decoded


def fold(codec: EventCodec, values: Iterable[bytes | None], limit: int | None = None) -> list[dict[str, Any]]:
    """Every letter, oldest first; with `limit`, only the last `limit` of them."""
    letters = [found for found in (letter(codec, value) for value in values) if found is not None]
    letters.sort(key=lambda found: found["at_ms"])
    return letters[-limit:] if limit else letters


def fold_positioned(
    codec: EventCodec, records: Iterable[tuple[str, bytes | None]], limit: int | None = None
) -> list[dict[str, Any]]:
    """`fold`, each letter with its id (`dead-letters/<partition>/<offset>`, what a replay names)."""
    letters = []
    for letter_id, value in records:
        found = letter(codec, value)
        if found is not None:
            letters.append({"id": letter_id, **found})
    letters.sort(key=lambda found: found["at_ms"])
    return letters[-limit:] if limit else letters
