"""Which prepared PostgreSQL batch each two-phase step is in, what was decided for its members, and when a
batch may be settled: pure bookkeeping, no I/O.

Many global transactions share one PostgreSQL prepared transaction (a *batch*, gid `pc_<space>_b<hex>`):
one PREPARE TRANSACTION and one COMMIT PREPARED serve them all, where one per step cost PostgreSQL more
than everything else on the 2PC path. The decision stays per global transaction, so a batch is settled
by its members' decisions:

- every member decided COMMIT -> COMMIT PREPARED, and each member's COMMIT is acknowledged;
- any member decided ABORT    -> ROLLBACK PREPARED at once; the members decided COMMIT so far are redone
  from their COMMIT commands (which carry the write-set) by the ordinary exactly-once path, the ABORTs
  leave their fence, and the members not decided yet are forgotten here: their COMMIT, when it comes,
  finds no batch and is redone, their ABORT is fenced. A redo is safe because the coordinator holds each
  member's exclusive locks until its phase 2 is acknowledged, so nothing of polycommit's touched its keys;
- otherwise the batch waits, and the phase-2 commands of its decided members are *held*: their outcomes
  are published when the batch settles (`Participant.released`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from consumers.command import TypedCommand

Member = tuple[str, int]  # (tx_id, step_index)


def member_of(command: TypedCommand) -> Member:
    return (command.tx_id, command.step_index)


@dataclass
class Batch:
    gid: str
    members: frozenset[Member]
    decided: dict[Member, TypedCommand] = field(default_factory=dict)  # each decided member's phase-2 command


@dataclass(frozen=True)
class Settlement:
    """What to do with a batch now: COMMIT PREPARED or ROLLBACK PREPARED; `commands` are the phase-2
    commands of its decided members, whose outcomes follow from it."""

    gid: str
    verb: Literal["COMMIT", "ROLLBACK"]
    commands: tuple[TypedCommand, ...]


class BatchRegistry:
    """The batches this participant prepared (or adopted from the membership table) and not yet settled."""

    def __init__(self) -> None:
        self._batches: dict[str, Batch] = {}
        self._gid_of: dict[Member, str] = {}

    def __len__(self) -> int:
        return len(self._batches)

    def __contains__(self, gid: str) -> bool:
        return gid in self._batches

    def add(self, gid: str, members: Iterable[Member]) -> None:
        """A batch prepared (or found prepared). A member named again keeps its latest batch."""
        if gid in self._batches:
            return
        batch = Batch(gid, frozenset(members))
        self._batches[gid] = batch
        for member in batch.members:
            self._gid_of[member] = gid

    def gid_of(self, member: Member) -> str | None:
        return self._gid_of.get(member)

    def decide(self, command: TypedCommand) -> str:
        """Record a member's COMMIT / ABORT (a repeated one replaces the earlier); returns its batch's gid."""
        member = member_of(command)
        gid = self._gid_of[member]
        self._batches[gid].decided[member] = command
        return gid

    def settlement(self, gid: str) -> Settlement | None:
        """What the batch's decisions so far call for: None while it must wait for more of them."""
        batch = self._batches.get(gid)
        if batch is None:
            return None
        commands = tuple(batch.decided.values())
        if any(c.action == "ABORT" for c in commands):
            return Settlement(gid, "ROLLBACK", commands)
        if batch.decided.keys() >= batch.members:
            return Settlement(gid, "COMMIT", commands)
        return None

    def drop(self, gid: str) -> None:
        """The batch is settled (or gone): forget it and the members that still name it."""
        batch = self._batches.pop(gid, None)
        if batch is None:
            return
        for member in batch.members:
            if self._gid_of.get(member) == gid:
                del self._gid_of[member]

    def held(self) -> int:
        """Phase-2 commands waiting for their batch mates' decisions."""
        return sum(len(b.decided) for b in self._batches.values())

    def clear(self) -> None:
        self._batches.clear()
        self._gid_of.clear()
