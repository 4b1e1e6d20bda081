"""The coordinator's lock table: shared and exclusive locks per key, FIFO queues, upgrades, lock-wait
deadlines and release, with no I/O and no clock (`now` is passed in).

A key has holders (all SHARED, or one EXCLUSIVE) and a FIFO queue of waiting requests. A request is
granted only when it is compatible with the holders AND nobody is queued on the key before it, so a
stream of SHARED requests never starves an EXCLUSIVE one (no overtaking). An upgrade (a SHARED holder
asking EXCLUSIVE) is granted at once when the asker is the key's only holder; otherwise it waits at the
front of the queue, ahead of every other waiter (it already holds the key: queueing it behind newcomers
that wait for it would deadlock). Two holders upgrading the same key is a real deadlock; the detector
finds it from the WAITING events (`blockers`).

A transaction asks for all the keys it knows at once (`request`, sorted, each once). Because one table
serves requests one at a time, every key's queue orders its transactions by arrival, the same order on
every key, so a waiter only ever waits for transactions that arrived before it: keys known up front never
deadlock. Everything a transaction holds or waits for goes with `release` when it ends.

Limitation: one table per coordinator member (transactions are partitioned by tx id, not by key), so
two members do not see each other's locks; members are therefore active-standby. A lock manager
partitioned by resource key (docs/lock-partitioning.md) serves sagas when POLYCOMMIT_LOCK_MANAGER=partitioned:
orchestrator/lock_partitions.py, lock_manager.py and partitioned_locking.py; then members may run active-active.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class LockMode(StrEnum):
    """The modes of `polycommit.LockEvent.mode` (the same strings)."""

    SHARED = "SHARED"
    EXCLUSIVE = "EXCLUSIVE"


SHARED, EXCLUSIVE = LockMode.SHARED, LockMode.EXCLUSIVE


def covers(held: LockMode, wanted: LockMode) -> bool:
    """A lock held in `held` mode gives what `wanted` asks (EXCLUSIVE gives SHARED too)."""
    return held == EXCLUSIVE or wanted == SHARED


@dataclass
class _Waiter:
    tx_id: str
    mode: LockMode


class LockTable:
    """key -> holders and FIFO waiters; transaction -> the keys it asked for, in which mode."""

    def __init__(self) -> None:
        self._holders: dict[str, dict[str, LockMode]] = {}
        self._queues: dict[str, deque[_Waiter]] = {}
        self._wanted: dict[str, dict[str, LockMode]] = {}  # tx -> key -> the strongest mode it asked
        self._arrival: dict[str, int] = {}
        self._deadline: dict[str, int] = {}
        self._next = 0

    def __contains__(self, tx_id: str) -> bool:
        return tx_id in self._wanted

    def __len__(self) -> int:
        return len(self._wanted)

    # -- asking -------------------------------------------------------------------------------------

    def request(
        self, tx_id: str, keys: Iterable[str], mode: LockMode = EXCLUSIVE, deadline_ms: int | None = None
    ) -> bool:
        """Ask for `keys` in `mode` (sorted, each once); True when `tx_id` now holds every key it asked for.

        Asking again for what a transaction already holds or waits for changes nothing (a restored or
        redelivered intent); asking EXCLUSIVE for a key held SHARED is an upgrade. `deadline_ms` is when
        its wait ends (see `expired`); a later request may move it."""
        if tx_id not in self._wanted:
            self._wanted[tx_id] = {}
            self._arrival[tx_id] = self._next
            self._next += 1
        if deadline_ms is not None:
            self._deadline[tx_id] = deadline_ms
        for key in sorted(set(keys)):
            self._ask(tx_id, key, mode)
        return self.holds_all(tx_id)

    def _ask(self, tx_id: str, key: str, mode: LockMode) -> None:
        wanted = self._wanted[tx_id]
        before = wanted.get(key)
        if before is not None and covers(before, mode):
            return  # held or queued already in this mode or a stronger one
        wanted[key] = mode
        holders = self._holders.setdefault(key, {})
        queue = self._queues.setdefault(key, deque())
        if tx_id in holders:  # an upgrade: SHARED held, EXCLUSIVE asked
            if len(holders) == 1:
                holders[tx_id] = mode
            else:  # ahead of every waiter, behind any earlier upgrade (those hold the key too)
                upgrades = sum(1 for w in queue if w.tx_id in holders)
                queue.insert(upgrades, _Waiter(tx_id, mode))
            return
        for waiter in queue:
            if waiter.tx_id == tx_id:  # queued SHARED, now asks EXCLUSIVE: same place, stronger mode
                waiter.mode = mode
                return
        if not queue and _compatible(tx_id, mode, holders):
            holders[tx_id] = mode
        else:
            queue.append(_Waiter(tx_id, mode))

    # -- questions ----------------------------------------------------------------------------------

    def holds(self, tx_id: str, key: str) -> bool:
        """`tx_id` holds `key` in the mode it asked for."""
        wanted = self._wanted.get(tx_id, {}).get(key)
        held = self._holders.get(key, {}).get(tx_id)
        return wanted is not None and held is not None and covers(held, wanted)

    def holds_all(self, tx_id: str) -> bool:
        wanted = self._wanted.get(tx_id)
        return wanted is not None and all(self.holds(tx_id, key) for key in wanted)

    def keys_of(self, tx_id: str) -> tuple[str, ...]:
        return tuple(sorted(self._wanted.get(tx_id, {})))

    def mode_of(self, tx_id: str, key: str) -> LockMode | None:
        """The mode `tx_id` asked for on `key` (held or not), None if it never asked."""
        return self._wanted.get(tx_id, {}).get(key)

    def holders(self, key: str) -> dict[str, LockMode]:
        """Who holds `key` now, in which mode (in grant order)."""
        return dict(self._holders.get(key, {}))

    def holder(self, key: str) -> str | None:
        """The first of the key's holders (the only one, when it is held EXCLUSIVE)."""
        return next(iter(self._holders.get(key, {})), None)

    def queued(self, key: str) -> list[str]:
        """The transactions waiting on `key`, first in line first."""
        return [w.tx_id for w in self._queues.get(key, ())]

    def blockers_on(self, tx_id: str, key: str) -> list[str]:
        """Whom `tx_id` waits for on `key`: the holders it is not compatible with, and everybody queued
        before it (FIFO: it cannot pass them). Empty when it holds the key."""
        if self.holds(tx_id, key):
            return []
        mode = self._wanted.get(tx_id, {}).get(key)
        if mode is None:
            return []
        found = [h for h, held in self._holders.get(key, {}).items() if h != tx_id and not _fits(mode, held)]
        for waiter in self._queues.get(key, ()):
            if waiter.tx_id == tx_id:
                break
            if waiter.tx_id not in found:
                found.append(waiter.tx_id)
        return found

    def blockers(self, tx_id: str) -> list[str]:
        """Everyone `tx_id` waits for, on any of its keys (sorted, each once): the wait-for graph's edges."""
        return sorted({b for key in self._wanted.get(tx_id, {}) for b in self.blockers_on(tx_id, key)})

    def mutual_waits(self, tx_id: str) -> list[str]:
        """The transactions `tx_id` waits for that wait for it too: a deadlock of two, known the moment the
        second of them queues (two readers of a key both upgrading to EXCLUSIVE meet this way)."""
        return [b for b in self.blockers(tx_id) if tx_id in self.blockers(b)]

    def waiting(self) -> list[str]:
        """Transactions that do not hold every key they asked for, in arrival order."""
        return sorted((t for t in self._wanted if not self.holds_all(t)), key=self._arrival.__getitem__)

    def expired(self, now: int) -> list[str]:
        """Waiters whose lock-wait deadline has passed at `now`, in arrival order: the caller ends them
        (and `release`s them). A transaction holding all its keys never expires."""
        return [t for t in self.waiting() if self._deadline.get(t, now + 1) <= now]

    # -- ending -------------------------------------------------------------------------------------

    def release(self, tx_id: str) -> list[str]:
        """Drop `tx_id` from every key (held or waiting); returns the transactions that now hold all
        their keys and did not before, in the order they arrived."""
        woken = self.release_keys(tx_id, list(self._wanted.get(tx_id, {})))
        self._wanted.pop(tx_id, None)
        self._arrival.pop(tx_id, None)
        self._deadline.pop(tx_id, None)
        return woken

    def release_keys(self, tx_id: str, keys: Iterable[str]) -> list[str]:
        """Drop `tx_id` from `keys` only (it keeps its other locks); returns the transactions that now hold
        all their keys and did not before, in the order they arrived."""
        wanted = self._wanted.get(tx_id, {})
        granted: set[str] = set()
        for key in [k for k in keys if k in wanted]:
            del wanted[key]
            holders, queue = self._holders[key], self._queues[key]
            holders.pop(tx_id, None)
            for waiter in [w for w in queue if w.tx_id == tx_id]:
                queue.remove(waiter)
            granted.update(self._grant_queued(key))
            if not holders and not queue:
                del self._holders[key], self._queues[key]
        return sorted((t for t in granted if self.holds_all(t)), key=self._arrival.__getitem__)

    def _grant_queued(self, key: str) -> list[str]:
        """Grant the key to the head of its queue while it fits the holders (FIFO: never past a waiter)."""
        holders, queue = self._holders[key], self._queues[key]
        granted: list[str] = []
        while queue and _compatible(queue[0].tx_id, queue[0].mode, holders):
            waiter = queue.popleft()
            holders[waiter.tx_id] = waiter.mode
            granted.append(waiter.tx_id)
        return granted

    def clear(self) -> None:
        self._holders.clear()
        self._queues.clear()
        self._wanted.clear()
        self._arrival.clear()
        self._deadline.clear()


def _fits(wanted: LockMode, held: LockMode) -> bool:
    """Two transactions may hold one key at once only when both hold it SHARED."""
    return wanted == SHARED and held == SHARED


def _compatible(tx_id: str, mode: LockMode, holders: dict[str, LockMode]) -> bool:
    return all(_fits(mode, held) for other, held in holders.items() if other != tx_id)


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
