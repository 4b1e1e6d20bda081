"""Versions per key in each participant, on the real stores: bumped by every write, kept across a delete,
checked against `expected_version` atomically with the write (saga EXECUTE) or in the vote (PREPARE).

Qdrant runs on both backends of its adapter tests (Edge and qdrant-client local mode, in a tmp dir).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from consumers.base import Participant
from consumers.command import parse_command
from consumers.neo4j import Neo4jParticipant
from consumers.postgres import PostgresParticipant
from consumers.qdrant import QdrantParticipant
from consumers.qdrant_backends import ClientBackend, EdgeBackend
from polycommit import operations as ops
from polycommit.config import QdrantSettings, Settings
from polycommit.events import Operation, StepAction, StepOutcome, store_command
from polycommit.parsed import keys_of, parse_operation

pytestmark = pytest.mark.servers

TABLE = "versions_test_rows"
LABEL = "PolycommitVersionTest"
COLLECTION = "versions"


def uid() -> str:
    return uuid.uuid4().hex


async def run(p: Participant, *steps: tuple[str, StepAction, Operation]) -> list[StepOutcome]:
    """One batch of (tx id, action, operation), each the step 0 of its transaction."""
    typed = [
        parse_command(store_command(tx, 0, action, op, issued_at_ms=0), p.store, 1 << 20) for tx, action, op in steps
    ]
    outcomes = await p.apply_any(typed)
    assert all(o is not None for o in outcomes), "only a batched 2PC COMMIT is ever held"
    return [o for o in outcomes if o is not None]


def error_class(outcome: StepOutcome) -> str | None:
    return outcome["error"]["error_class"] if outcome["error"] else None


# -- the three stores behind one small interface -----------------------------------------------------


@dataclasses.dataclass
class Store:
    participant: Participant
    key: dict[str, Any]

    def write(self, value: int, expected: int | None = None) -> Operation:
        raise NotImplementedError

    def delete(self, expected: int | None = None) -> Operation:
        raise NotImplementedError

    async def version(self) -> int:
        raise NotImplementedError

    async def value(self) -> int | None:
        raise NotImplementedError


class Rows(Store):
    def write(self, value: int, expected: int | None = None) -> Operation:
        return ops.upsert_row(TABLE, self.key, {"n": value}, expected_version=expected)

    def delete(self, expected: int | None = None) -> Operation:
        return ops.delete_row(TABLE, self.key, expected_version=expected)

    async def version(self) -> int:
        assert isinstance(self.participant, PostgresParticipant)
        return await self.participant.read_version(TABLE, self.key)

    async def value(self) -> int | None:
        assert isinstance(self.participant, PostgresParticipant)
        row = await self.participant.read_row(TABLE, self.key)
        return None if row is None else int(row["n"])


class Nodes(Store):
    def write(self, value: int, expected: int | None = None) -> Operation:
        return ops.merge_node(LABEL, self.key, {"n": value}, expected_version=expected)

    def delete(self, expected: int | None = None) -> Operation:
        return ops.delete_node(LABEL, self.key, expected_version=expected)

    async def version(self) -> int:
        assert isinstance(self.participant, Neo4jParticipant)
        return await self.participant.read_version(keys_of(parse_operation(self.delete(), 1 << 20))[0])

    async def value(self) -> int | None:
        assert isinstance(self.participant, Neo4jParticipant)
        node = await self.participant.read_node(LABEL, self.key)
        return None if node is None else int(node["n"])


class Points(Store):
    def write(self, value: int, expected: int | None = None) -> Operation:
        point = ops.point(self.key["id"], [1.0, 0.0], {"n": value})
        return ops.upsert_points(COLLECTION, [point], expected_version=expected)

    def delete(self, expected: int | None = None) -> Operation:
        return ops.delete_points(COLLECTION, [self.key["id"]], expected_version=expected)

    async def version(self) -> int:
        assert isinstance(self.participant, QdrantParticipant)
        return (await self.participant.read_versions(COLLECTION, [ops.point_id(self.key["id"])]))[
            ops.point_id(self.key["id"])
        ]

    async def value(self) -> int | None:
        assert isinstance(self.participant, QdrantParticipant)
        found = await self.participant.read_points(COLLECTION, [ops.point_id(self.key["id"])])
        return None if not found else int(next(iter(found.values()))["payload"]["n"])


@pytest.fixture(scope="module")
async def postgres(settings: Settings) -> AsyncIterator[PostgresParticipant]:
    participant = PostgresParticipant(settings)
    await participant.start()
    async with participant.pool.acquire() as conn:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, n integer)")
    yield participant
    await participant.close()


@pytest.fixture(scope="module")
async def neo4j(settings: Settings) -> AsyncIterator[Neo4jParticipant]:
    participant = Neo4jParticipant(settings)
    await participant.start()
    yield participant
    await participant.close()


@pytest.fixture(params=["postgres", "neo4j", "qdrant-edge", "qdrant-local"])
async def store(
    request: pytest.FixtureRequest,
    settings: Settings,
    tmp_path: Path,
    postgres: PostgresParticipant,
    neo4j: Neo4jParticipant,
) -> AsyncIterator[Store]:
    kind = str(request.param)
    key = {"id": uid()}
    if kind == "postgres":
        yield Rows(postgres, key)
        return
    if kind == "neo4j":
        yield Nodes(neo4j, key)
        return
    backend = EdgeBackend(tmp_path / "edge") if kind == "qdrant-edge" else ClientBackend(path=tmp_path / "local")
    qdrant = QdrantSettings(url=None, api_key=None, edge_path=tmp_path / "edge", local_path=None)
    participant = QdrantParticipant(dataclasses.replace(settings, qdrant=qdrant), backend=backend)
    await participant.start()
    await participant.ensure_collection(COLLECTION, 2)
    yield Points(participant, key)
    await participant.close()


def statuses(outcomes: Sequence[StepOutcome]) -> list[str]:
    return [o["status"] for o in outcomes]


# -- the tests --------------------------------------------------------------------------------------


async def test_every_write_bumps_the_version_and_a_delete_keeps_it(store: Store) -> None:
    p = store.participant
    assert await store.version() == 0
    assert statuses(await run(p, (uid(), "EXECUTE", store.write(1, expected=0)))) == ["APPLIED"]
    assert statuses(await run(p, (uid(), "EXECUTE", store.write(2)))) == ["APPLIED"]
    assert (await store.version(), await store.value()) == (2, 2)
    assert statuses(await run(p, (uid(), "EXECUTE", store.delete(expected=2)))) == ["APPLIED"]
    assert (await store.version(), await store.value()) == (3, None)
    # A writer who read "absent" before the key was first written cannot win after its delete.
    [stale] = await run(p, (uid(), "EXECUTE", store.write(9, expected=0)))
    assert stale["status"] == "FAILED" and error_class(stale) == "VersionConflict"
    assert stale["error"] is not None and stale["error"]["retriable"] is False
    assert (await store.version(), await store.value()) == (3, None)
    assert statuses(await run(p, (uid(), "EXECUTE", store.write(4, expected=3)))) == ["APPLIED"]
    assert (await store.version(), await store.value()) == (4, 4)


async def test_a_conflicting_step_writes_nothing_and_its_compensation_is_a_no_op(store: Store) -> None:
    p = store.participant
    await run(p, (uid(), "EXECUTE", store.write(1)))
    tx, op = uid(), store.write(5, expected=7)
    [failed] = await run(p, (tx, "EXECUTE", op))
    assert error_class(failed) == "VersionConflict"
    [undo] = await run(p, (tx, "COMPENSATE", op))
    assert undo["status"] == "NOOP"  # no EXECUTE marker: nothing was applied
    assert (await store.version(), await store.value()) == (1, 1)


async def test_a_compensation_is_a_new_write_with_a_new_version(store: Store) -> None:
    p = store.participant
    await run(p, (uid(), "EXECUTE", store.write(1)))
    tx, op = uid(), store.write(2, expected=1)
    assert statuses(await run(p, (tx, "EXECUTE", op))) == ["APPLIED"]
    assert statuses(await run(p, (tx, "COMPENSATE", op))) == ["APPLIED"]
    # The value is restored; the version goes on: a reader of the undone value must not write over it.
    assert (await store.value(), await store.version()) == (1, 3)


async def test_two_writers_of_one_key_in_one_batch_see_each_others_bump(store: Store) -> None:
    p = store.participant
    outcomes = await run(
        p,
        (uid(), "EXECUTE", store.write(1, expected=0)),
        (uid(), "EXECUTE", store.write(2, expected=1)),
        (uid(), "EXECUTE", store.write(3, expected=1)),  # read the same version as the one before: loses
    )
    assert statuses(outcomes) == ["APPLIED", "APPLIED", "FAILED"]
    assert error_class(outcomes[2]) == "VersionConflict"
    assert (await store.value(), await store.version()) == (2, 2)


async def test_a_stale_prepare_votes_no_with_a_version_conflict_and_changes_nothing(store: Store) -> None:
    p = store.participant
    await run(p, (uid(), "EXECUTE", store.write(1)))
    [no] = await run(p, (uid(), "PREPARE", store.write(7, expected=0)))
    assert no["status"] == "VOTED_NO" and error_class(no) == "VersionConflict"
    assert (await store.value(), await store.version()) == (1, 1)
    ok_tx = uid()
    [current] = await run(p, (ok_tx, "PREPARE", store.write(9, expected=1)))
    assert current["status"] == "PREPARED"
    [commit] = await run(p, (ok_tx, "COMMIT", store.write(9, expected=1)))
    assert commit["status"] in ("APPLIED", "ALREADY_APPLIED")
    assert (await store.value(), await store.version()) == (9, 2)
    # The same PREPARE redelivered after its COMMIT: its own write moved the version, the vote stands.
    [again] = await run(p, (ok_tx, "PREPARE", store.write(9, expected=1)))
    assert again["status"] == "PREPARED", again
    assert (await store.value(), await store.version()) == (9, 2)


@pytest.mark.parametrize("kind", ["edge", "local"])
async def test_qdrant_judges_one_point_id_in_two_collections_apart(
    kind: str, settings: Settings, tmp_path: Path
) -> None:
    backend = EdgeBackend(tmp_path / "edge") if kind == "edge" else ClientBackend(path=tmp_path / "local")
    participant = QdrantParticipant(settings, backend=backend)
    await participant.start()
    try:
        await participant.ensure_collection("left", 2)
        await participant.ensure_collection("right", 2)
        point = ops.point(7, [1.0, 0.0], {"n": 1})
        await run(participant, (uid(), "EXECUTE", ops.upsert_points("left", [point])))
        await run(participant, (uid(), "EXECUTE", ops.upsert_points("left", [point])))
        votes = await run(
            participant,
            (uid(), "PREPARE", ops.upsert_points("left", [point], expected_version=2)),
            (uid(), "PREPARE", ops.upsert_points("right", [point], expected_version=0)),
            (uid(), "PREPARE", ops.upsert_points("right", [point], expected_version=2)),
        )
        assert statuses(votes) == ["PREPARED", "PREPARED", "VOTED_NO"]
        assert error_class(votes[2]) == "VersionConflict"
    finally:
        await participant.close()
