"""The active-standby assignment of coordinator members, without a broker: who is chosen, what each member
is given, what a member tells the group of itself, and the setting that picks the mode."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from orchestrator.members import (
    ActiveStandbyAssignor,
    Claim,
    assignment_note,
    assignor_for,
    choose_active,
    member_views,
    members_mode,
)
from polycommit.config import load_settings
from polycommit.errors import InvalidOperationError
from polycommit.tooling.inspect import coordinator_members, describe_members

TOPICS = {"p.intents": {0, 1, 2, 3}, "p.outcomes": {0, 1, 2, 3}, "p.deadlocks": {0, 1, 2, 3}}


class Cluster:
    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return TOPICS.get(topic)


def joined(*members: tuple[str, ActiveStandbyAssignor]) -> dict[str, Any]:
    """What the group leader receives: each member's subscription metadata, decoded."""
    return {member_id: assignor.metadata(sorted(TOPICS)) for member_id, assignor in members}


def test_the_member_active_before_stays_active_else_the_lowest_instance_is_chosen() -> None:
    assert choose_active({}) is None
    assert choose_active({"m1": Claim("b", False), "m2": Claim("a", False)}) == "m2"
    assert choose_active({"m1": Claim("b", True), "m2": Claim("a", False)}) == "m1"  # a joining does not move it
    assert choose_active({"m1": Claim("c", True), "m2": Claim("b", True)}) == "m2"  # a split: one of them, agreed


def test_one_member_gets_every_partition_of_every_topic_and_the_others_none() -> None:
    a, b, c = ActiveStandbyAssignor("a"), ActiveStandbyAssignor("b"), ActiveStandbyAssignor("c")
    b.active = True
    given = b.assign(Cluster(), joined(("m-a", a), ("m-b", b), ("m-c", c)))  # type: ignore[arg-type]
    assert {topic: sorted(parts) for topic, parts in given["m-b"].assignment} == {t: [0, 1, 2, 3] for t in TOPICS}
    assert given["m-a"].assignment == [] and given["m-c"].assignment == []


def test_a_member_remembers_whether_it_was_given_partitions_and_says_so_when_it_joins_again() -> None:
    member = ActiveStandbyAssignor("a")
    assert Claim.decode("m", member.metadata(["t"]).user_data) == Claim("a", False)
    member.on_assignment(ConsumerProtocolMemberAssignment(0, [("t", [0, 1])], b""))
    assert Claim.decode("m", member.metadata(["t"]).user_data) == Claim("a", True)
    member.on_assignment(ConsumerProtocolMemberAssignment(0, [], b""))
    assert not member.active


def test_a_member_without_a_readable_claim_is_named_by_its_id_and_never_preferred() -> None:
    assert Claim.decode("m-9", b"") == Claim("m-9", False)
    assert Claim.decode("m-9", b'{"instance": 3}') == Claim("m-9", False)
    assert choose_active({"m-9": Claim.decode("m-9", b"not json"), "m-1": Claim("z", True)}) == "m-1"


def test_the_mode_comes_from_the_environment_and_a_wrong_one_is_a_typed_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("POLYCOMMIT_COORDINATOR_MEMBERS", raising=False)
    assert load_settings().coordinator_members == "active-standby"
    monkeypatch.setenv("POLYCOMMIT_COORDINATOR_MEMBERS", "partitioned")
    settings = load_settings()
    assert members_mode(settings.coordinator_members) == "partitioned"
    assert assignor_for(settings.coordinator_members, "0") is RangePartitionAssignor
    assert isinstance(assignor_for("active-standby", "0"), ActiveStandbyAssignor)
    with pytest.raises(InvalidOperationError, match="active-standby, partitioned"):
        assignor_for("sharded", "0")


def test_each_member_logs_what_it_was_given() -> None:
    assert assignment_note("a", {0, 1}, 2, standby=True) == (
        logging.INFO,
        "coordinator member a: active, owns all 2 of the transaction partitions",
    )
    assert assignment_note("b", set(), 2, standby=True) == (
        logging.INFO,
        "coordinator member b: standing by, owns none of the transaction partitions",
    )
    note = assignment_note("b", {1}, 2, standby=False)
    assert note is not None and note[0] == logging.WARNING and "owns 1 of 2" in note[1]
    assert assignment_note("a", {0, 1}, 2, standby=False) is None


def test_status_shows_each_member_from_what_the_group_describes() -> None:
    active, standby = ActiveStandbyAssignor("a"), ActiveStandbyAssignor("b")
    active.active = True
    owned = ConsumerProtocolMemberAssignment(0, [("p.intents", [0, 1]), ("p.outcomes", [0, 1])], b"")
    described = [
        ("m-b", "coordinator", "/127.0.0.1", standby.metadata(["p.intents"]).encode(), b""),
        ("m-a", "coordinator", "/127.0.0.1", active.metadata(["p.intents"]).encode(), owned.encode()),
    ]
    views = member_views(described)
    assert [(v["instance"], v["active"], v["partitions"]) for v in views] == [("a", True, [0, 1]), ("b", False, [])]
    assert describe_members(views) == "coordinator members: a active (2 partitions), b standing by"
    assert describe_members([]) == "coordinator members: none running"
    one = [{"instance": "a", "active": True, "partitions": [0]}]
    assert describe_members(one) == "coordinator members: a active (1 partition)"


async def test_status_says_why_when_the_group_cannot_be_described() -> None:
    settings = load_settings()
    unreachable = dataclasses.replace(settings, kafka=dataclasses.replace(settings.kafka, bootstrap="127.0.0.1:9"))
    members = await coordinator_members(unreachable)
    assert isinstance(members, str) and members.startswith("unknown (")
    assert describe_members(members).startswith("coordinator members: unknown (")
