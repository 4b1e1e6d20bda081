"""How coordinator members share the work: one active member and hot standbys (the default), or the
transaction partitions split among members.

The lock table is per member (one table for every protocol, `registry.protocols`): it orders only the
transactions its member coordinates. Split among members, two transactions on one key coordinated by two
members would not wait for each other, so a compensation could undo the other's write in one store and
not in another. Until a lock manager partitioned by resource key exists, the safe way to run several
members is **active-standby**: a partition assignor gives every partition of every input topic to one
member; the others hold nothing and take over, restoring the state from the changelog, when the group
rebalances without the active one (it died: after the session timeout; it left: at once).

The active member stays active across rebalances (a member joining or coming back does not move the
work): each member tells the group, in its subscription's user data, its instance name and whether it
held partitions in the last generation; the group leader keeps the member that did (the lowest instance
name, if a split ever left two claiming it), else picks the lowest instance name.

`partitioned` (POLYCOMMIT_COORDINATOR_MEMBERS=partitioned) splits the partitions by range as before:
more coordinator throughput, isolation only between transactions of the same member (README: Scaling) —
unless the members ask the lock manager partitioned by key (POLYCOMMIT_LOCK_MANAGER=partitioned, sagas
only): then one lock manager orders every member's sagas, and members may run active-active.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocol,
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from polycommit.errors import InvalidOperationError

log = logging.getLogger(__name__)

MembersMode = Literal["active-standby", "partitioned"]
MODES: tuple[MembersMode, ...] = ("active-standby", "partitioned")
ASSIGNOR_NAME = "polycommit-active-standby"  # the same on every member: the group's agreed protocol
# How a member's ownership lines read ("coordinator member 2: active, owns all 4 ..."): `polycommit chaos`
# finds the active member and waits for a takeover by them (polycommit/tooling/processes.py).
NOTE_PREFIX = "coordinator member "
ACTIVE_NOTE = ": active, "


def members_mode(text: str) -> MembersMode:
    """The mode named by POLYCOMMIT_COORDINATOR_MEMBERS; a typed error names the accepted ones."""
    for mode in MODES:
        if text == mode:
            return mode
    raise InvalidOperationError(f"POLYCOMMIT_COORDINATOR_MEMBERS={text!r}: expected one of {', '.join(MODES)}")


@dataclass(frozen=True)
class Claim:
    """What a member says of itself when it joins: its instance name, and whether it was the active one."""

    instance: str
    active: bool

    def encode(self) -> bytes:
        return json.dumps({"instance": self.instance, "active": self.active}).encode()

    @classmethod
    def decode(cls, member_id: str, data: bytes | None) -> Claim:
        """A member that sent no readable claim (another version) is named by its member id, not active."""
        try:
            fields = json.loads(data or b"")
            return cls(str(fields["instance"]), bool(fields["active"]))
        except (ValueError, TypeError, KeyError):
            return cls(member_id, False)


def choose_active(claims: Mapping[str, Claim]) -> str | None:
    """The member id that gets every partition: the one active before (the lowest instance name among
    several), else the lowest instance name; None for an empty group. Pure, so every leader agrees."""
    if not claims:
        return None
    ranked = sorted(claims.items(), key=lambda item: (not item[1].active, item[1].instance, item[0]))
    return ranked[0][0]


class ActiveStandbyAssignor:
    """aiokafka's partition-assignor interface (`name`, `metadata`, `assign`, `on_assignment`), with the
    member's own claim: an instance, since the claim belongs to one consumer, not to the class."""

    name = ASSIGNOR_NAME
    version = 0

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.active = False  # held partitions in the last generation it was given an assignment

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, list(topics), Claim(self.instance, self.active).encode())

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        claims = {member_id: Claim.decode(member_id, meta.user_data) for member_id, meta in members.items()}
        chosen = choose_active(claims)
        everything: dict[str, list[int]] = {}
        for meta in members.values():
            for topic in meta.subscription:
                partitions = cluster.partitions_for_topic(topic)
                if partitions is None:
                    log.warning("no partition metadata for topic %s", topic)
                    continue
                everything[topic] = sorted(partitions)
        if chosen is not None:
            log.info("coordinator members: %s is active, %d standing by", claims[chosen].instance, len(claims) - 1)
        return {
            member_id: ConsumerProtocolMemberAssignment(
                self.version, sorted(everything.items()) if member_id == chosen else [], b""
            )
            for member_id in members
        }

    def on_assignment(self, assignment: Any) -> None:
        self.active = bool(assignment.partitions())


def assignor_for(mode_name: str, instance: str) -> ActiveStandbyAssignor | type[RangePartitionAssignor]:
    """The coordinator consumer's partition assignor for POLYCOMMIT_COORDINATOR_MEMBERS (checked here, so
    a wrong value stops the coordinator at start with the accepted ones named)."""
    return ActiveStandbyAssignor(instance) if members_mode(mode_name) == "active-standby" else RangePartitionAssignor


def lock_scope_warning(owned: set[int], partitions: int) -> str | None:
    """What to tell an operator when a `partitioned` member coordinates only some of the transaction
    partitions: its lock table covers only its own transactions, so another member's transactions on the
    same keys do not wait for its locks. None when it owns them all."""
    if not owned or partitions <= 0 or len(owned) >= partitions:
        return None
    return (
        f"this coordinator member owns {len(owned)} of {partitions} transaction partitions: its lock table "
        "covers only the transactions it coordinates, so another member's transactions on the same keys do "
        "not wait for its locks (README: Scaling). Run one coordinator member unless they never share a key."
    )


def assignment_note(
    instance: str, owned: set[int], partitions: int, standby: bool, shared_locks: bool = False
) -> tuple[int, str] | None:
    """What a member logs (level, message) when the group gave it `owned`: active or standing by, or, split
    among members, the lock-scope warning (unless every member asks one lock manager: `shared_locks`)."""
    if standby:
        state = f"{ACTIVE_NOTE}owns all {len(owned)}" if owned else ": standing by, owns none"
        return logging.INFO, f"{NOTE_PREFIX}{instance}{state} of the transaction partitions"
    if shared_locks:
        return logging.INFO, f"{NOTE_PREFIX}{instance}: owns {len(owned)} of {partitions} transaction partitions"
    warning = lock_scope_warning(owned, partitions)
    return None if warning is None else (logging.WARNING, warning)


def report_assignment(instance: str, owned: set[int], partitions: int, standby: bool, shared_locks: bool) -> None:
    """Log what the group gave this member, on this module's logger: `polycommit run` shows it at INFO,
    so an operator (and `polycommit chaos`) sees which member is active without --verbose."""
    note = assignment_note(instance, owned, partitions, standby, shared_locks)
    if note is not None:
        log.log(*note)


def member_views(members: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """The coordinator group's members as `polycommit status` shows them, from a DescribeGroups response's
    members (member id, client id, host, subscription metadata, assignment): each one's instance name,
    the transaction partitions it owns, and whether it is the active one. Active first, then by name."""
    views = []
    for member_id, _client_id, host, metadata, assignment in (tuple(m)[:5] for m in members):
        user_data = ConsumerProtocol.METADATA.decode(metadata).user_data if metadata else None
        owned = ConsumerProtocol.ASSIGNMENT.decode(assignment).partitions() if assignment else []
        partitions = sorted({tp.partition for tp in owned})
        claim = Claim.decode(member_id, user_data)
        views.append({"instance": claim.instance, "host": host, "partitions": partitions, "active": bool(owned)})
    return sorted(views, key=lambda v: (not v["active"], v["instance"]))
