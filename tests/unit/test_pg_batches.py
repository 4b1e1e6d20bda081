"""PostgreSQL's prepared batches: a batch settles by its members' decisions, never before they allow it."""

from __future__ import annotations

from consumers.command import TypedCommand, parse_command
from consumers.postgres.batches import BatchRegistry
from consumers.postgres.effects import batch_isolation, begin_statement
from polycommit import operations as ops
from polycommit.events import store_command


def phase2(tx_id: str, action: str, step: int = 0) -> TypedCommand:
    operation = ops.upsert_row("documents", {"id": tx_id}, {"title": "t"})
    return parse_command(store_command(tx_id, step, action, operation), "postgres", 1 << 20)  # type: ignore[arg-type]


def registry_with(gid: str, *txs: str) -> BatchRegistry:
    registry = BatchRegistry()
    registry.add(gid, [(tx, 0) for tx in txs])
    return registry


def test_a_batch_commits_only_once_every_member_decided_commit() -> None:
    registry = registry_with("g", "a", "b", "c")
    assert registry.decide(phase2("a", "COMMIT")) == "g"
    registry.decide(phase2("b", "COMMIT"))
    assert registry.settlement("g") is None  # c undecided: a and b are held
    assert registry.held() == 2
    registry.decide(phase2("c", "COMMIT"))
    settlement = registry.settlement("g")
    assert settlement is not None and settlement.verb == "COMMIT"
    assert sorted(c.tx_id for c in settlement.commands) == ["a", "b", "c"]


def test_one_abort_rolls_the_batch_back_at_once_with_the_decided_members() -> None:
    registry = registry_with("g", "a", "b", "c")
    registry.decide(phase2("a", "COMMIT"))
    registry.decide(phase2("b", "ABORT"))
    settlement = registry.settlement("g")
    assert settlement is not None and settlement.verb == "ROLLBACK"
    assert {(c.tx_id, c.action) for c in settlement.commands} == {("a", "COMMIT"), ("b", "ABORT")}


def test_a_repeated_decision_replaces_the_held_command() -> None:
    registry = registry_with("g", "a", "b")
    registry.decide(phase2("a", "COMMIT"))
    registry.decide(phase2("a", "COMMIT"))
    assert registry.held() == 1


def test_dropping_a_batch_forgets_its_members() -> None:
    registry = registry_with("g", "a", "b")
    registry.decide(phase2("a", "COMMIT"))
    registry.drop("g")
    assert registry.gid_of(("a", 0)) is None and registry.settlement("g") is None and len(registry) == 0


def test_a_member_named_by_a_later_batch_keeps_the_later_one_when_the_first_is_dropped() -> None:
    registry = registry_with("g1", "a")
    registry.add("g2", [("a", 0), ("b", 0)])
    registry.drop("g1")
    assert registry.gid_of(("a", 0)) == "g2"


def test_a_batch_runs_at_the_strictest_level_its_commands_ask() -> None:
    assert batch_isolation([]) == "read_committed"
    assert batch_isolation(["READ_UNCOMMITTED"]) == "read_uncommitted"  # PostgreSQL runs it as READ COMMITTED
    assert batch_isolation(["READ_COMMITTED", "SERIALIZABLE", "REPEATABLE_READ"]) == "serializable"
    assert batch_isolation(["REPEATABLE_READ", "READ_COMMITTED"]) == "repeatable_read"
    assert begin_statement("repeatable_read") == "BEGIN ISOLATION LEVEL REPEATABLE READ"
