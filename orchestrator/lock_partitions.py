"""The lock manager split by resource key: the protocol between a transaction and the partitions owning its
keys, without I/O (step 1 of docs/lock-partitioning.md; the service is orchestrator/lock_manager.py; sagas
ask it through orchestrator/partitioned_locking.py).

Each partition of the lock manager owns the keys that hash to it and keeps one `LockTable` for them. A
transaction does not see the partitions' tables: it sends a `PartitionRequest` (its keys of one partition,
all at once) and waits for a `PartitionGrant`; a partition answers every request at once (GRANTED, or
WAITING with whom it waits for) and sends a further GRANTED when a release lets a waiter through. The end
of a transaction sends a release to every partition it asked.

**Ordered acquisition.** A transaction asks its partitions one at a time, in partition order, the next only
once the last granted (`Acquisition`). Keys known up front then never deadlock, across partitions too:
- in one partition, the keys of a request are queued at one arrival, so a waiter only ever waits for
  transactions that arrived there before it (the `LockTable` argument): no cycle stays inside a partition;
- a transaction waits in one partition at a time, and holds keys only in partitions before it; whoever it
  waits for in partition p either waits in p too (arrived before it), or holds p and so waits, if at all,
  in a partition after p. Every edge of the wait-for graph goes to an earlier arrival in the same partition
  or to a later partition, so no path comes back to where it started.
Asking every partition at once would be one round trip instead of one per partition, and deadlocks: two
transactions granted one partition each, each queued behind the other in the other one
(tests/unit/test_lock_partitions.py shows it). The price is a round trip per partition touched before a
transaction starts; at high concurrency grants travel in batches.

Delivery: requests and releases of one partition travel on that partition of the log, so a partition
reads each transaction's request before its release, also when it reads them again after a crash; asking
again for what is held or queued changes nothing, and is answered again (`LockTable.request`).

On the wire (orchestrator/lock_manager.py, the service) a request or release is a `LockPartitionRequest`
record on that partition of `lock-requests`, an answer a `LockPartitionGrant` on `lock-grants`; the
functions at the end translate, and refuse a record that contradicts where it travels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.locks import EXCLUSIVE, SHARED, LockMode, LockTable
from polycommit.errors import InvalidEventError
from polycommit.events import LockPartitionGrant, LockPartitionRequest


@dataclass(frozen=True)
class PartitionRequest:
    """A transaction's keys of one partition, in their modes (sorted by key), asked at once."""

    tx_id: str
    partition: int
    keys: tuple[tuple[str, LockMode], ...]
    deadline_ms: int | None = None


@dataclass(frozen=True)
class PartitionGrant:
    """A partition's answer: the transaction holds every key it asked there, or waits for `blockers`."""

    tx_id: str
    partition: int
    granted: bool
    blockers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PartitionRelease:
    """The transaction ended: whatever it holds or waits for in the partition goes."""

    tx_id: str
    partition: int


class LockPartition:
    """The lock manager of one partition: its keys' `LockTable`, answering requests and releases."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.table = LockTable()

    def on_request(self, request: PartitionRequest) -> PartitionGrant:
        if request.partition != self.partition:
            raise ValueError(f"partition {self.partition} was sent a request of partition {request.partition}")
        # One `request` call per mode, one after the other: nothing arrives between them, so the keys
        # still queue at one arrival.
        for mode in (SHARED, EXCLUSIVE):
            keys = [key for key, wanted in request.keys if wanted == mode]
            if keys:
                self.table.request(request.tx_id, keys, mode, request.deadline_ms)
        return self._answer(request.tx_id)

    def on_release(self, tx_id: str) -> list[PartitionGrant]:
        """Drop `tx_id` here; the grants of the waiters that now hold every key they asked here."""
        return [self._answer(woken) for woken in self.table.release(tx_id)]

    def on_message(self, message: PartitionRequest | PartitionRelease) -> list[PartitionGrant]:
        """A request (its one answer) or a release (the answers it lets through), read from the log."""
        if isinstance(message, PartitionRelease):
            return self.on_release(message.tx_id)
        return [self.on_request(message)]

    def _answer(self, tx_id: str) -> PartitionGrant:
        if self.table.holds_all(tx_id):
            return PartitionGrant(tx_id, self.partition, True)
        return PartitionGrant(tx_id, self.partition, False, tuple(self.table.blockers(tx_id)))


class Acquisition:
    """One transaction's side of ordered acquisition: its keys split by partition, asked partition after
    partition in partition order, each once the one before granted."""

    def __init__(
        self,
        tx_id: str,
        wanted: Mapping[str, LockMode],
        partition_of: Callable[[str], int],
        deadline_ms: int | None = None,
        granted: int = 0,
    ) -> None:
        """`granted`: how many of its partitions granted already (a transaction's state kept elsewhere, as a
        coordinator's snapshot keeps it)."""
        by_partition: dict[int, list[tuple[str, LockMode]]] = {}
        for key in sorted(wanted):
            by_partition.setdefault(partition_of(key), []).append((key, wanted[key]))
        self.tx_id = tx_id
        self._requests = [
            PartitionRequest(tx_id, partition, tuple(keys), deadline_ms)
            for partition, keys in sorted(by_partition.items())
        ]
        self._next = granted  # the request asked last, or to ask first
        self.blockers: tuple[str, ...] = ()  # whom it waits for, as the partition it waits in said

    @property
    def done(self) -> bool:
        """Every partition granted: the transaction holds all its keys."""
        return self._next >= len(self._requests)

    @property
    def waiting_in(self) -> int | None:
        """The partition asked and not granted yet (None when done)."""
        return None if self.done else self._requests[self._next].partition

    def first(self) -> PartitionRequest | None:
        """The first request to send (None: no keys, nothing to wait for)."""
        return None if self.done else self._requests[0]

    def on_grant(self, grant: PartitionGrant) -> PartitionRequest | None:
        """A partition's answer; returns the next request to send, if this answer lets it go. An answer of
        another partition than the one waited in (a repeat after a redelivery) changes nothing."""
        if grant.tx_id != self.tx_id or self.done or grant.partition != self._requests[self._next].partition:
            return None
        if not grant.granted:
            self.blockers = grant.blockers
            return None
        self.blockers = ()
        self._next += 1
        return None if self.done else self._requests[self._next]

    def granted(self) -> list[int]:
        """The partitions that granted: the transaction holds their keys."""
        return [r.partition for r in self._requests[: self._next]]

    def request(self) -> PartitionRequest | None:
        """The request waited on now (None when done): asked again after a restart loses nothing, since a
        partition answers a repeat again and queues it once."""
        return None if self.done else self._requests[self._next]

    def asked(self) -> list[int]:
        """The partitions asked so far: the end of the transaction sends each a release."""
        return [r.partition for r in self._requests[: min(self._next + 1, len(self._requests))]]

    def partitions(self) -> Sequence[int]:
        """Every partition its keys fall in, in the order they are asked: the round trips it costs."""
        return [r.partition for r in self._requests]


# -- records ------------------------------------------------------------------------------------------


def request_record(request: PartitionRequest, at_ms: int) -> LockPartitionRequest:
    return {
        "tx_id": request.tx_id,
        "partition": request.partition,
        "keys": [{"key": key, "exclusive": mode == EXCLUSIVE} for key, mode in request.keys],
        "release": False,
        "deadline_ms": request.deadline_ms or 0,
        "at_ms": at_ms,
    }


def release_record(release: PartitionRelease, at_ms: int) -> LockPartitionRequest:
    return {
        "tx_id": release.tx_id,
        "partition": release.partition,
        "keys": [],
        "release": True,
        "deadline_ms": 0,
        "at_ms": at_ms,
    }


def partition_record(message: PartitionRequest | PartitionRelease, at_ms: int) -> LockPartitionRequest:
    if isinstance(message, PartitionRelease):
        return release_record(message, at_ms)
    return request_record(message, at_ms)


def message_of(record: LockPartitionRequest, partition: int) -> PartitionRequest | PartitionRelease:
    """A decoded record read from `partition` of lock-requests; InvalidEventError when it names another
    partition (its keys would be judged where they do not live) or asks for nothing."""
    if record["partition"] != partition:
        named = record["partition"]
        raise InvalidEventError(f"a lock request of partition {named} was read from partition {partition}")
    if record["release"]:
        return PartitionRelease(record["tx_id"], partition)
    keys = {k["key"]: EXCLUSIVE if k["exclusive"] else SHARED for k in record["keys"]}
    if not keys:
        raise InvalidEventError(f"a lock request of {record['tx_id']} names no key")
    deadline = record["deadline_ms"] or None
    return PartitionRequest(record["tx_id"], partition, tuple(sorted(keys.items())), deadline)


def grant_record(grant: PartitionGrant, at_ms: int) -> LockPartitionGrant:
    return {
        "tx_id": grant.tx_id,
        "partition": grant.partition,
        "granted": grant.granted,
        "blockers": list(grant.blockers),
        "at_ms": at_ms,
    }


def grant_of(record: LockPartitionGrant) -> PartitionGrant:
    return PartitionGrant(record["tx_id"], record["partition"], record["granted"], tuple(record["blockers"]))
