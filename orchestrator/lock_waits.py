"""The waits a coordinator member has announced to the deadlock detector, kept so they can be announced
again: every REANNOUNCE_MS (a detector that starts reads only from then on), and whenever a release
changes who a waiter waits for. Pure: no I/O. One per member, shared like the lock table by every
protocol that locks (`orchestrator.registry.protocols`), so a release by a saga re-announces a waiting
two-phase commit's edge too."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from orchestrator.locks import LockTable
from orchestrator.protocol import Transition
from polycommit.events import LockEvent


@dataclass
class AnnouncedWaits:
    """The member's lock table and the waits announced on it: one object, so the protocols that share the
    table cannot be handed a table and announcements that disagree."""

    locks: LockTable = field(default_factory=LockTable)
    # key -> waiter -> the WAITING event last published for it there: the detector's edges. A release
    # changes them (the next holder is one the detector cannot guess), so `reannounce` publishes them again.
    by_key: dict[str, dict[str, LockEvent]] = field(default_factory=dict)

    def noted(self, t: Transition) -> Transition:
        """Remember every wait `t` announces; forget it once granted or released."""
        for event in t.lock_requests:
            waits = self.by_key.setdefault(event["resource"], {})
            if event["action"] == "WAITING":
                waits[event["tx_id"]] = event
            else:
                waits.pop(event["tx_id"], None)
            if not waits:
                del self.by_key[event["resource"]]
        return t

    def current(self, now: int) -> list[LockEvent]:
        """Every wait announced and not yet granted or released, announced again at `now` (see
        `projections.wait_for.REANNOUNCE_MS`)."""
        return [{**event, "at_ms": now} for waits in self.by_key.values() for event in waits.values()]

    def reannounce(self, t: Transition, keys: Iterable[str], now: int) -> None:
        """`keys` were released: each transaction still announced as waiting on one of them is announced
        again, WAITING behind its blockers now (a holder granted meanwhile, or the next in line) or GRANTED.
        Without this the detector drops the edge to the releaser and never learns the new one, and a
        deadlock through that wait would last until a lock-wait timeout."""
        for key in keys:
            for tx, last in list(self.by_key.get(key, {}).items()):
                if tx not in self.locks:
                    continue
                blockers = self.locks.blockers_on(tx, key)
                if not blockers and tx in t.wake:
                    continue  # it holds all its keys now: its own wake-up says GRANTED
                if blockers != last["blockers"]:
                    action = "WAITING" if blockers else "GRANTED"
                    t.lock_requests.append({**last, "action": action, "blockers": blockers, "at_ms": now})  # type: ignore[typeddict-item]


def waits_of(protocols: Mapping[str, object], now: int) -> list[LockEvent]:
    """The current waits of every lock-taking protocol (each member's announcements once), announced
    again at `now`."""
    shared = {id(a): a for p in protocols.values() if isinstance(a := getattr(p, "waits", None), AnnouncedWaits)}
    return [event for waits in shared.values() for event in waits.current(now)]
