"""The state each key must be in, from every transaction that wrote it: the checker's model of the data.

Pure. A key (a row, a point, a node) may be written by several transactions, and may have existed before
any of them. Its expected final state is therefore not "what one transaction wrote" but:

- when a transaction still in flight (or stuck) wrote it: *pending*, not judged — its writer has not
  finished, so any value is still possible;
- else, when some writer completed (or committed): the value of the last completed writer, in the order
  the lock table granted the key (the log's GRANTED lock events: with locks, the order every store
  applied the writes in), or, when some writer took no lock (opted out, or no lock log at hand), in
  applied order (from markers and outcomes); a compensated or aborted writer contributes nothing;
- else (every writer was undone): the value the key had before the first of them, as that writer's
  before-image recorded it — a compensation restores the old row, it does not delete it; a compensated
  delete brings the row back;
- else (no writer ever applied, so no before-image exists): absent when the caller knows the keys were
  fresh (a workload that owns its keys), otherwise not judged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polycommit.parsed import dumps
from polycommit.results import SUCCEEDED
from polycommit.tooling.checker.expectations import Expect, frozen

COMPLETED = SUCCEEDED
UNDONE = ("compensated", "failed", "aborted")
StepRef = tuple[str, int]  # (tx_id, step index)
# resource (a lock key) -> the transactions granted it, in the log's order (one resource, one partition)
Grants = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Applied:
    """A step's EXECUTE as the stores or the log saw it: when (for ordering writers) and the before-image."""

    at_ms: float = math.inf  # unknown: after every known one, in invocation order
    before: str | None = None


@dataclass(frozen=True)
class KeyState:
    """What one key must hold: `values` (None: absent) and, for points, the vector; `restored` when it is
    a before-image put back by compensation or abort, so a mismatch means an undone write is still visible."""

    expect: Expect  # the writer the verdict is about (store, key, where, describe)
    values: dict[str, Any] | None
    vector: list[float] | None
    restored: bool


def image_of(e: Expect, before: str) -> tuple[dict[str, Any] | None, list[float] | None] | None:
    """The key's state as a before-image recorded it (values, vector; values None when it was absent),
    or None when the image cannot be read (then the key is not judged: nothing says what it held)."""
    try:
        image = json.loads(before)
        if e.store == "postgres":
            return image["row"], None
        if e.store == "neo4j":
            return image["node"], None
        point = image["points"].get(str(e.key))
        if point is None:
            return None, None
        return dict(point.get("payload") or {}), point.get("vector")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def resource_of(e: Expect) -> str:
    """The lock key naming the resource an expectation is about (the format of `polycommit.parsed.keys_of`)."""
    if e.store == "qdrant":
        return f"qdrant:{e.where[0]}:{e.key}"
    return f"{e.store}:{e.where[0]}:{dumps(e.key)}"


def writing_order(writers: list[Expect], applied: Mapping[StepRef, Applied], grants: Grants) -> list[Expect]:
    """The key's writers in the order their writes took effect: by lock grant when every one of them that
    may have written was granted the key, else by applied time; then by applied time and invocation order.
    A writer never granted the key and never applied (a lock wait that timed out, a two-phase commit
    aborted while it waited: nothing of it ran) cannot have written it, so it does not force the fallback
    to applied times, which do not order a saga's write and a two-phase commit's across stores; one that
    applied without a grant (it opted out of locks) does."""
    position = {id(w): i for i, w in enumerate(writers)}

    def at(w: Expect) -> float:
        return applied.get((w.tx_id, w.step), Applied()).at_ms

    rank: dict[str, int] = {}
    for i, tx in enumerate(grants.get(resource_of(writers[0]), ())):
        rank.setdefault(tx, i)
    unranked = [w for w in writers if w.tx_id not in rank]
    if rank and all(at(w) == math.inf for w in unranked):
        last = len(rank)  # the never-applied ones contribute nothing; after the granted ones, harmlessly
        return sorted(writers, key=lambda w: (rank.get(w.tx_id, last), at(w), position[id(w)]))
    return sorted(writers, key=lambda w: (at(w), position[id(w)]))


def group_by_key(expects: Iterable[Expect]) -> dict[tuple[Any, ...], list[Expect]]:
    groups: dict[tuple[Any, ...], list[Expect]] = {}
    for e in expects:
        groups.setdefault((e.store, *e.where, frozen(e.key)), []).append(e)
    return groups


def key_state(
    writers: list[Expect],
    finals: Mapping[str, str],
    applied: Mapping[StepRef, Applied],
    fresh_keys: bool,
    grants: Grants | None = None,
) -> KeyState | None:
    """The state one key must hold, from its writers in invocation order; None when pending or unknowable."""
    if any(finals.get(w.tx_id) not in (*COMPLETED, *UNDONE) for w in writers):
        return None
    ordered = writing_order(writers, applied, grants or {})
    completed = [w for w in ordered if finals[w.tx_id] in COMPLETED]
    if completed:
        last = completed[-1]
        return KeyState(last, last.values, last.vector, restored=False)
    with_image = [w for w in ordered if applied.get((w.tx_id, w.step), Applied()).before is not None]
    if with_image:
        first = with_image[0]
        before = applied[(first.tx_id, first.step)].before
        assert before is not None
        image = image_of(first, before)
        return None if image is None else KeyState(first, *image, restored=True)
    if fresh_keys and any(w.values is not None for w in writers):
        return KeyState(ordered[-1], None, None, restored=True)
    return None


def key_states(
    expects: Iterable[Expect],
    finals: Mapping[str, str],
    applied: Mapping[StepRef, Applied],
    fresh_keys: bool,
    grants: Grants | None = None,
) -> tuple[list[KeyState], int]:
    """The state every written key must hold, and how many keys are pending (left unjudged)."""
    states: list[KeyState] = []
    pending = 0
    for writers in group_by_key(expects).values():
        state = key_state(writers, finals, applied, fresh_keys, grants)
        if state is not None:
            states.append(state)
        elif any(finals.get(w.tx_id) not in (*COMPLETED, *UNDONE) for w in writers):
            pending += 1
    return states, pending
