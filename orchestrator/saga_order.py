"""Which saga steps may run now: each step's dependencies, its own flight, and which steps are ready.

A step waits for the steps it names in `after`, for every earlier step of its store (steps of one store
may depend on each other, e.g. insert then update a row; a raw step without lock keys is covered by this
too) and for every earlier step sharing a lock key with it. Everything else runs in parallel: one write
per store goes out in one transition. Compensation runs in the reverse order: a step is compensated only
once every step that waits for it is compensated (or needs no compensation).

Each step has its own flight (in flight, attempt, due time, done); the saga-level `current`, `attempt`,
`waiting` and `due_at_ms` are a summary of them (`summarise`), so the driver's single timer at
`due_at_ms` (the earliest step's) and the status views work unchanged. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator

from orchestrator.saga_model import APPLIED, PENDING, TO_COMPENSATE, SagaPhase, idle, waits_for
from polycommit.events import SagaSnapshot, StepFlight

_COMPENSATING = frozenset({SagaPhase.COMPENSATING, SagaPhase.STUCK})


def flights(state: SagaSnapshot) -> list[StepFlight]:
    return state["flights"]


def is_compensating(state: SagaSnapshot) -> bool:
    return state["phase"] in _COMPENSATING


def ready_to_execute(state: SagaSnapshot) -> Iterator[int]:
    """Steps never sent whose every dependency applied."""
    statuses = [s["status"] for s in state["steps"]]
    for i, flight in enumerate(flights(state)):
        never_sent = statuses[i] == PENDING and flight["attempt"] == 0
        if never_sent and all(statuses[j] == APPLIED for j in state["waits_for"][i]):
            yield i


def ready_to_compensate(state: SagaSnapshot) -> Iterator[int]:
    """Steps to compensate, not yet sent, whose every dependent is compensated (or needs nothing)."""
    all_flights = flights(state)
    for i, flight in enumerate(all_flights):
        if flight["done"] or flight["attempt"]:
            continue
        dependents = (j for j, deps in enumerate(state["waits_for"]) if i in deps)
        if all(all_flights[j]["done"] for j in dependents):
            yield i


def due_steps(state: SagaSnapshot, now: int) -> list[int]:
    return [i for i, f in enumerate(flights(state)) if f["due_at_ms"] and f["due_at_ms"] <= now]


def in_flight(state: SagaSnapshot) -> list[int]:
    return [i for i, f in enumerate(flights(state)) if f["waiting"]]


def retry_scheduled(state: SagaSnapshot) -> list[int]:
    """Steps waiting for their backoff (a failed attempt, to be sent again)."""
    return [i for i, f in enumerate(flights(state)) if not f["waiting"] and f["due_at_ms"]]


def being_compensated(state: SagaSnapshot) -> list[int]:
    """Steps whose compensation was sent and has not succeeded (in flight, or waiting for a retry)."""
    if not is_compensating(state):
        return []
    return [i for i, f in enumerate(flights(state)) if f["attempt"] and not f["done"]]


def summarise(state: SagaSnapshot) -> None:
    """Set the saga-level fields from the steps' flights (in place: on a state a transition owns)."""
    all_flights = flights(state)
    dues = [f["due_at_ms"] for f in all_flights if f["due_at_ms"]]
    state["due_at_ms"] = min(dues) if dues else 0
    state["waiting"] = any(f["waiting"] for f in all_flights)
    active = [i for i, f in enumerate(all_flights) if f["waiting"] or f["due_at_ms"]]
    if active:
        state["current"] = max(active) if is_compensating(state) else min(active)
        state["attempt"] = all_flights[state["current"]]["attempt"]


def upgrade(state: SagaSnapshot) -> SagaSnapshot:
    """A saga restored from a snapshot written before per-step flights (v3 and older, which ran one step
    at a time): the same saga with each step's flight rebuilt from `current`, `attempt`, `waiting` and
    `due_at_ms`, so a saga in flight across an upgrade goes on and finishes."""
    if len(state.get("flights", [])) == len(state["steps"]) and len(state.get("waits_for", [])) == len(state["steps"]):
        return state
    new: SagaSnapshot = {**state}  # type: ignore[typeddict-item]
    new["waits_for"] = waits_for(state["intent"])
    compensating = is_compensating(state)
    current = state["current"]
    rebuilt = []
    for i, step in enumerate(state["steps"]):
        flight = idle()
        if i == current and state["phase"] in (SagaPhase.FORWARD, *_COMPENSATING):
            flight.update({"waiting": state["waiting"], "attempt": state["attempt"], "due_at_ms": state["due_at_ms"]})
        elif compensating:
            # The old saga compensated downwards: steps above the current one are finished with, and
            # those below still to compensate unless their status says they need nothing.
            flight["done"] = i > current or step["status"] not in TO_COMPENSATE
        else:
            flight["done"] = step["status"] != PENDING
            flight["attempt"] = step["attempts"]
        rebuilt.append(flight)
    new["flights"] = rebuilt
    return new
