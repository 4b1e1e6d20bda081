"""Where a transaction's result goes besides `results`: the `reply_to` its intent names."""

from __future__ import annotations


def reply_target(reply_to: str) -> tuple[str, int | None] | None:
    """`topic` or `topic:partition` -> (topic, partition); empty -> None."""
    if not reply_to:
        return None
    topic, _, partition = reply_to.rpartition(":")
    if topic and partition.isdigit():
        return topic, int(partition)
    return reply_to, None
