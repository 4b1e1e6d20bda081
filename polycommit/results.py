"""How a transaction ended, as the client SDK shows it: the coordinator's TransactionResult record made typed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepOutcomeView:
    index: int
    name: str
    store: str
    status: str
    attempts: int
    compensation_attempts: int
    error: str | None
    compensation_error: str | None = None  # the compensation's own error, apart from the step's
    resolved_by: str = ""  # the operator who repaired the step by hand (status resolved_by_operator)


SUCCEEDED = ("completed", "committed")  # a saga's success, a two-phase commit's: every effect applied


@dataclass(frozen=True)
class TransactionResult:
    """How a transaction ended, as the coordinator reported it."""

    tx_id: str
    status: str  # completed | compensated | stuck | failed (sagas); committed | aborted (two-phase)
    steps: tuple[StepOutcomeView, ...]
    error: str | None
    duration_ms: int
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in SUCCEEDED

    @property
    def error_class(self) -> str | None:
        """The class of the error that ended the transaction (e.g. `VersionConflict`), None without one."""
        error = self.raw.get("error")
        return str(error["error_class"]) if error else None

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> TransactionResult:
        def describe(error: Mapping[str, Any] | None) -> str | None:
            return None if error is None else f"{error['error_class']}: {error['message']}"

        steps = tuple(
            StepOutcomeView(
                s["index"],
                s["name"],
                s["store"],
                s["status"],
                s["attempts"],
                s["compensation_attempts"],
                describe(s["error"]),
                describe(s.get("compensation_error")),
                s.get("resolved_by", ""),
            )
            for s in event["steps"]
        )
        return cls(
            tx_id=event["tx_id"],
            status=str(event["status"]).lower(),
            steps=steps,
            error=describe(event["error"]),
            duration_ms=int(event["finished_at_ms"]) - int(event["started_at_ms"]),
            raw=event,
        )
