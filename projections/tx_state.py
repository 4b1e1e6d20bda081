"""The coordinator's state as a fold over its changelog (`polycommit.tx-state`): latest snapshot per tx.

A snapshot is written for every transaction a coordinator step touched, in the same Kafka transaction
as the commands it decided; a tombstone follows once the transaction ends. Folding the changelog from
offset 0 therefore gives exactly the transactions still in flight (or stuck) and where each one stands.
Which phases are in flight or stuck is asked of each snapshot's protocol (orchestrator/registry.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.positions import is_reserved
from orchestrator.registry import is_in_flight, is_stuck
from polycommit.canonical import canonical_intent
from polycommit.codec import EventCodec
from polycommit.errors import CodecError, ProtocolError
from polycommit.events import InputPosition, SagaSnapshot, TransactionIntent


def apply(state: dict[str, SagaSnapshot], tx_id: str, snapshot: SagaSnapshot | None) -> dict[str, SagaSnapshot]:
    """One changelog record: a snapshot replaces the transaction's state, a tombstone removes it."""
    if snapshot is None or not is_in_flight(snapshot):
        state.pop(tx_id, None)
    else:
        state[tx_id] = snapshot
    return state


def fold(records: Iterable[tuple[str, SagaSnapshot | None]]) -> dict[str, SagaSnapshot]:
    state: dict[str, SagaSnapshot] = {}
    for tx_id, snapshot in records:
        apply(state, tx_id, snapshot)
    return state


def stuck(state: Mapping[str, SagaSnapshot]) -> list[SagaSnapshot]:
    return sorted((s for s in state.values() if is_stuck(s)), key=lambda s: s["started_at_ms"])


def summary(state: Mapping[str, SagaSnapshot]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for snapshot in state.values():
        counts[snapshot["phase"]] = counts.get(snapshot["phase"], 0) + 1
    return counts


def to_record(state: SagaSnapshot, intent_bytes: bytes) -> dict[str, Any]:
    """The changelog record of a state: the intent travels as the bytes it was published as, so a
    snapshot costs the encoding of a few progress fields, not of every operation and vector again."""
    return {**state, "intent": intent_bytes}


def from_record(codec: EventCodec, record: dict[str, Any]) -> tuple[SagaSnapshot, bytes]:
    intent_bytes = bytes(record["intent"])
    intent: TransactionIntent = codec.decode_as(intent_bytes, "TransactionIntent")  # type: ignore[assignment]
    # The bytes are the intent as its producer wrote it; the coordinator admitted its canonical form.
    intent = canonical_intent(intent)
    state: SagaSnapshot = {**record, "intent": intent}  # type: ignore[typeddict-item]
    return state, intent_bytes


def decode(codec: EventCodec, value: bytes | None) -> tuple[SagaSnapshot, bytes] | None:
    """A changelog record's value: a snapshot, or None for a tombstone. Raises CodecError for bytes
    that are not a snapshot: callers skip and count them (a bad record must not stop a restore)."""
    if value is None:
        return None
    return from_record(codec, codec.decode_as(value, "SagaSnapshot"))


@dataclass
class Changelog:
    """The changelog folded: the transactions in flight (and each one's intent bytes), the coordinator's
    input positions (orchestrator/positions.py), and the records of either kind skipped as corrupt."""

    states: dict[str, SagaSnapshot] = field(default_factory=dict)
    intents: dict[str, bytes] = field(default_factory=dict)
    positions: list[InputPosition] = field(default_factory=list)
    corrupt_snapshots: int = 0
    corrupt_positions: int = 0


def fold_changelog(codec: EventCodec, records: Iterable[tuple[str, bytes | None]]) -> Changelog:
    """Fold raw changelog records: keep the last value per key first, then decode only the survivors.

    Most keys end in a tombstone (the transaction finished), so this decodes the transactions still in
    flight rather than every snapshot ever written: restore time follows what is open, not the history
    that compaction has not yet removed. A bad record is skipped and counted: not ours (or of a protocol
    this build lacks), skipping it loses nothing we wrote."""
    latest: dict[str, bytes | None] = {}
    for key, value in records:
        latest[key] = value
    folded = Changelog()
    for key, value in latest.items():
        if is_reserved(key):  # the coordinator's input positions, not a transaction
            try:
                folded.positions.append(codec.decode_as(value, "InputPosition"))  # type: ignore[arg-type]
            except CodecError:
                folded.corrupt_positions += 1
            continue
        try:
            decoded = decode(codec, value)
            in_flight = decoded is not None and is_in_flight(decoded[0])
        except (CodecError, ProtocolError):
            folded.corrupt_snapshots += 1
            continue
        if decoded is not None and in_flight:
            folded.states[key], folded.intents[key] = decoded
    return folded
