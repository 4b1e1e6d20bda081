"""The coordinator's exclusive lock table for two-phase commit: grant, FIFO queue and release, no I/O.

A transaction asks for all its write keys at once (`request`), in one canonical (sorted) order; each key
has a FIFO queue whose head holds the key. Because one table serves requests one at a time, every key's
queue orders its transactions by arrival, the same order on every key, so a waiter only ever waits for
transactions that arrived before it: no cycle, no deadlock, and no detector needed for keys known up
front. A transaction holds its locks when it heads the queue of every one of its keys.

Limitation: one table per coordinator member (transactions are partitioned by tx id, not by key), so
two members do not see each other's locks; a lock manager partitioned by resource key is a later issue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class LockTable:
    """Exclusive locks: key -> FIFO queue of transaction ids (the head holds the key)."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[str]] = {}
        self._keys: dict[str, tuple[str, ...]] = {}
        self._arrival: dict[str, int] = {}
        self._next = 0

    def __contains__(self, tx_id: str) -> bool:
        return tx_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def request(self, tx_id: str, keys: Iterable[str]) -> bool:
        """Queue `tx_id` on every key (sorted, each once); True when it now holds them all.

        Asking again for a transaction already queued changes nothing (a restored or redelivered intent).
        """
        if tx_id not in self._keys:
            ordered = tuple(sorted(set(keys)))
            self._keys[tx_id] = ordered
            self._arrival[tx_id] = self._next
            self._next += 1
            for key in ordered:
                self._queues.setdefault(key, deque()).append(tx_id)
        return self.holds_all(tx_id)

    def holds_all(self, tx_id: str) -> bool:
        keys = self._keys.get(tx_id)
        return keys is not None and all(self._queues[k][0] == tx_id for k in keys)

    def keys_of(self, tx_id: str) -> tuple[str, ...]:
        return self._keys.get(tx_id, ())

    def holder(self, key: str) -> str | None:
        queue = self._queues.get(key)
        return queue[0] if queue else None

    def blockers(self, tx_id: str) -> list[str]:
        """The holders of the keys `tx_id` waits for (sorted, each once)."""
        found = {self._queues[k][0] for k in self._keys.get(tx_id, ())} - {tx_id}
        return sorted(found)

    def release(self, tx_id: str) -> list[str]:
        """Drop `tx_id` from every queue (held or waiting); returns the transactions that now hold all
        their keys and did not before, in the order they asked."""
        keys = self._keys.pop(tx_id, ())
        self._arrival.pop(tx_id, None)
        candidates: list[str] = []
        for key in keys:
            queue = self._queues[key]
            was_head = queue[0] == tx_id
            queue.remove(tx_id)
            if not queue:
                del self._queues[key]
            elif was_head and queue[0] not in candidates:
                candidates.append(queue[0])
        return sorted((t for t in candidates if self.holds_all(t)), key=self._arrival.__getitem__)

    def clear(self) -> None:
        self._queues.clear()
        self._keys.clear()
        self._arrival.clear()

    def waiting(self) -> list[str]:
        """Transactions queued that do not hold all their keys."""
        return [t for t in self._keys if not self.holds_all(t)]


class Admission:
    """At most `capacity` transactions past their locks at once (preparing or in phase 2), the others
    queued FIFO: PostgreSQL holds a bounded number of prepared transactions (max_prepared_transactions),
    so a flood of prepares would make most of them vote no. Only transactions holding their locks queue."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.active: set[str] = set()
        self.queue: deque[str] = deque()

    def admit(self, tx_id: str) -> bool:
        """True when `tx_id` may go on now; otherwise it is queued (once)."""
        if tx_id in self.active:
            return True
        if len(self.active) < self.capacity and (not self.queue or self.queue[0] == tx_id):
            if self.queue:
                self.queue.popleft()
            self.active.add(tx_id)
            return True
        if tx_id not in self.queue:
            self.queue.append(tx_id)
        return False

    def leave(self, tx_id: str) -> list[str]:
        """`tx_id` ended (or was never admitted): the queued transactions admitted in its place."""
        self.active.discard(tx_id)
        if tx_id in self.queue:
            self.queue.remove(tx_id)
        admitted: list[str] = []
        while self.queue and len(self.active) < self.capacity:
            head = self.queue.popleft()
            self.active.add(head)
            admitted.append(head)
        return admitted

    def clear(self) -> None:
        self.active.clear()
        self.queue.clear()
