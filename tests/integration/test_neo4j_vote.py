"""Neo4j's vote in two-phase commit, on the real server: a structured write votes PREPARED from its
markers alone (one auto-commit read), a raw statement that does not compile and a step aborted here
before vote no, and an expected version that is not the key's votes no with a VersionConflict."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from consumers.command import TypedCommand, parse_command
from consumers.neo4j import Neo4jParticipant
from polycommit import operations as ops
from polycommit.config import Settings
from polycommit.events import Operation, StepAction, store_command

pytestmark = pytest.mark.servers

LABEL = "PolycommitVoteItem"


@pytest.fixture(scope="module")
async def neo4j(settings: Settings) -> AsyncIterator[Neo4jParticipant]:
    participant = Neo4jParticipant(settings)
    await participant.start()
    yield participant
    await participant.close()


def command(tx_id: str, action: StepAction, operation: Operation) -> TypedCommand:
    return parse_command(store_command(tx_id, 0, action, operation), "neo4j", 1 << 20)  # type: ignore[arg-type]


def merge(key: str, expected_version: int | None = None) -> Operation:
    return ops.merge_node(LABEL, {"id": key}, {"v": 1}, expected_version=expected_version)


async def test_votes_of_a_batch_each_on_its_own_merits(neo4j: Neo4jParticipant) -> None:
    run = uuid.uuid4().hex[:8]
    plain = command(f"{run}-plain", "PREPARE", merge(f"{run}-a"))
    broken = command(f"{run}-raw", "PREPARE", ops.cypher("MERGE (n:Thing {id: $id) RETURN n", {"id": 1}))
    aborted = command(f"{run}-aborted", "PREPARE", merge(f"{run}-b"))
    (fenced,) = await neo4j.finish([command(f"{run}-aborted", "ABORT", merge(f"{run}-b"))])
    assert fenced is not None and fenced["status"] in ("NOOP", "APPLIED"), fenced
    plain_vote, broken_vote, aborted_vote = await neo4j.vote([plain, broken, aborted])
    assert plain_vote["status"] == "PREPARED", plain_vote
    assert broken_vote["status"] == "VOTED_NO" and broken_vote["error"] is not None
    assert aborted_vote["status"] == "VOTED_NO" and aborted_vote["error"] is not None
    assert "aborted here before" in aborted_vote["error"]["message"]


async def test_a_write_expecting_another_version_votes_no_with_a_version_conflict(neo4j: Neo4jParticipant) -> None:
    run = uuid.uuid4().hex[:8]
    (vote,) = await neo4j.vote([command(f"{run}-x", "PREPARE", merge(f"{run}-x"))])
    assert vote["status"] == "PREPARED", vote
    (stale,) = await neo4j.vote([command(f"{run}-y", "PREPARE", merge(f"{run}-y", expected_version=3))])
    assert stale["status"] == "VOTED_NO" and stale["error"] is not None
    assert stale["error"]["error_class"] == "VersionConflict", stale
