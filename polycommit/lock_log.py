"""How lock events travel on `polycommit.locks`: one record for several resources. Pure.

The lock table reports one event per resource (orchestrator/locking.py, twopc.py, interactive.py): a
3-store saga's grant and release are six, a third of the records of its whole path. On the log, events
of one transaction alike but for their resource (same action, mode, blockers, instant) that fall in the
same partition of the topic, which is keyed by resource, travel as one record: the first resource is the
record's key and `resource`, the others are in `also` (LockEvent v2). A partition still holds every event
of each of its resources in the lock table's order, which is what the checker (the order a key was
granted in) and the detector (a wait ends when its waiter is granted or its holder releases) read; with
the default single partition a saga's grant and its release are one record each.

Readers take `expand`, which gives back one event per resource; a v1 record expands to itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from polycommit.events import LockEvent
from polycommit.partitioning import partition_of

_ALIKE = ("tx_id", "action", "mode", "blockers", "priority", "started_at_ms", "work_done", "at_ms")


def merged(events: Sequence[LockEvent], partitions: Sequence[int]) -> list[LockEvent]:
    """The records for `events` (in the lock table's order) on a topic of `partitions` (sorted): each run
    of events alike but for their resource becomes one record per partition it touches. Only events of
    one run merge, and a run's resources are its own transaction's, so no resource's events change order."""
    out: list[LockEvent] = []
    start = 0
    while start < len(events):
        end = start + 1
        while end < len(events) and _alike(events[end], events[start]):
            end += 1
        by_partition: dict[int, LockEvent] = {}
        for event in events[start:end]:
            partition = partition_of(event["resource"], partitions)
            record = by_partition.get(partition)
            if record is None:
                by_partition[partition] = record = {**event, "also": []}
                out.append(record)
            else:
                record["also"].append(event["resource"])
        start = end
    return out


def expand(record: Mapping[str, Any]) -> list[LockEvent]:
    """One event per resource of a record (its `resource`, then each of `also`), each without `also`."""
    first = cast(LockEvent, {**record, "also": []})
    return [first, *(cast(LockEvent, {**first, "resource": r}) for r in record.get("also") or ())]


def expand_all(records: Iterable[Mapping[str, Any]]) -> Iterator[LockEvent]:
    for record in records:
        yield from expand(record)


def _alike(a: LockEvent, b: LockEvent) -> bool:
    return all(a[name] == b[name] for name in _ALIKE)  # type: ignore[literal-required]
