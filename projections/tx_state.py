"""The coordinator's state as a fold over its changelog (`polycommit.tx-state`): latest snapshot per tx.

A snapshot is written for every transaction a coordinator step touched, in the same Kafka transaction
as the commands it decided; a tombstone follows once the transaction ends. Folding the changelog from
offset 0 therefore gives exactly the transactions still in flight (or stuck) and where each one stands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from polycommit.events import SagaSnapshot

IN_FLIGHT_PHASES = frozenset({"forward", "compensating", "stuck"})


def apply(state: dict[str, SagaSnapshot], tx_id: str, snapshot: SagaSnapshot | None) -> dict[str, SagaSnapshot]:
    """One changelog record: a snapshot replaces the transaction's state, a tombstone removes it."""
    if snapshot is None or snapshot["phase"] not in IN_FLIGHT_PHASES:
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
    return sorted((s for s in state.values() if s["phase"] == "stuck"), key=lambda s: s["started_at_ms"])


def summary(state: Mapping[str, SagaSnapshot]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for snapshot in state.values():
        counts[snapshot["phase"]] = counts.get(snapshot["phase"], 0) + 1
    return counts
