"""The outcome a store would report for a command: one builder for the protocol tables' unit tests."""

from __future__ import annotations

from polycommit.events import ErrorInfo, StepOutcome, StoreCommand


def reply(
    command: StoreCommand, status: str, message: str = "boom", *, retriable: bool = False, before: str | None = None
) -> StepOutcome:
    """`status` for `command`; a FAILED outcome or a VOTED_NO vote carries a StoreError with `message`."""
    error: ErrorInfo | None = None
    if status in ("FAILED", "VOTED_NO"):
        error = {"error_class": "StoreError", "message": message, "retriable": retriable}
    return {
        "tx_id": command["tx_id"],
        "step_index": command["step_index"],
        "action": command["action"],
        "attempt": command["attempt"],
        "store": command["operation"]["store"],
        "status": status,  # type: ignore[typeddict-item]
        "before_image": before,
        "error": error,
        "at_ms": 0,
        "duration_us": 0,
    }
