"""What `polycommit status` reports: the transactions in flight and the stuck ones, from the tx-state fold.

Pure: the state comes from `projections.tx_state` (the coordinator's changelog folded); this module only
shapes it for operators.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from polycommit.events import ErrorInfo, InputPosition, SagaSnapshot
from projections import tx_state


def describe(snapshot: SagaSnapshot) -> dict[str, Any]:
    """One transaction in flight, in the fields an operator reads (errors as `class: message`)."""
    error = snapshot["error"]
    current = snapshot["steps"][snapshot["current"]] if 0 <= snapshot["current"] < len(snapshot["steps"]) else None
    # The compensation's own error and attempts: what an operator must repair (the step's error is why
    # compensation began, not why it cannot end).
    compensation_error = None if current is None else current.get("compensation_error")
    return {
        "tx_id": snapshot["intent"]["tx_id"],
        "name": snapshot["intent"]["name"],
        "phase": snapshot["phase"],
        "step": snapshot["current"],
        "attempt": snapshot["attempt"],
        "steps": [f"{s['index']}:{s['store']}:{s['status']}" for s in snapshot["steps"]],
        "error": _text(error),
        "started_at_ms": snapshot["started_at_ms"],
        "compensation_error": _text(compensation_error),
        "compensation_attempts": 0 if current is None else current["compensation_attempts"],
    }


def _text(error: ErrorInfo | None) -> str | None:
    return None if error is None else f"{error['error_class']}: {error['message']}"


def report(state: Mapping[str, SagaSnapshot]) -> dict[str, Any]:
    """Counts by phase, the stuck transactions (oldest first) and every transaction in flight."""
    return {
        "in_flight": tx_state.summary(state),
        "stuck": [describe(s) for s in tx_state.stuck(state)],
        "transactions": [describe(s) for s in state.values()],
    }


def backlog(positions: Iterable[InputPosition], ends: Mapping[tuple[str, int], int]) -> dict[str, int]:
    """Per input topic, the offsets the coordinator has not folded yet: each partition's end less the
    position its changelog holds (orchestrator/positions.py). Exact to the last committed Kafka transaction
    of the coordinator, unlike the group's lagging copy; transaction markers count as offsets, as in every
    lag tool. A partition without a position (nothing folded since positions were kept) counts from 0."""
    folded = {(p["topic"], p["partition"]): p["next_offset"] for p in positions}
    behind: dict[str, int] = {}
    for (topic, partition), end in ends.items():
        behind[topic] = behind.get(topic, 0) + max(0, end - folded.get((topic, partition), 0))
    return behind
