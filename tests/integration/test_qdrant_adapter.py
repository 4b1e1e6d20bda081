"""The Qdrant participant against real engines: Qdrant Edge and qdrant-client local mode, each in a tmp dir.

Every test runs on both backends. Vectors are one-hot so that Cosine normalisation stores them unchanged
and reads can be compared exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from consumers.qdrant import MARKERS, QdrantParticipant
from consumers.qdrant_backends import ClientBackend, EdgeBackend, PointData, QdrantBackend
from polycommit.config import QdrantSettings, Settings, load_settings
from polycommit.errors import StoreUnavailableError
from polycommit.events import Operation, StepAction, StepOutcome, StoreCommand, store_command
from polycommit.operations import delete_points, point, upsert_points

REPO = Path(__file__).resolve().parents[2]
DIM = 4
COLLECTION = "docs"
BACKENDS = ["edge", "local"]


def unit(axis: int) -> list[float]:
    return [1.0 if i == axis else 0.0 for i in range(DIM)]


def command(
    tx: str, step: int, action: StepAction, op: Operation, compensation: Operation | None = None
) -> StoreCommand:
    return store_command(tx, step, action, op, compensation=compensation, issued_at_ms=0)


def upsert(tx: str, *points: tuple[int | str, int, dict[str, Any]], collection: str = COLLECTION) -> StoreCommand:
    """EXECUTE step 0 of `tx`: upsert (id, axis of its one-hot vector, payload) points."""
    return command(tx, 0, "EXECUTE", upsert_points(collection, [point(i, unit(a), p) for i, a, p in points]))


def stored(axis: int, payload: dict[str, Any]) -> dict[str, Any]:
    return {"vector": unit(axis), "payload": payload}


def before(outcome: StepOutcome) -> dict[str, Any]:
    assert outcome["before_image"] is not None
    points = json.loads(outcome["before_image"])["points"]
    assert isinstance(points, dict)
    return points


def statuses(outcomes: Sequence[StepOutcome]) -> list[str]:
    return [o["status"] for o in outcomes]


def make_backend(kind: str, root: Path) -> QdrantBackend:
    return EdgeBackend(root / "edge") if kind == "edge" else ClientBackend(path=root / "local")


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    qdrant = QdrantSettings(url=None, api_key=None, edge_path=tmp_path / "edge", local_path=None)
    return dataclasses.replace(load_settings(), qdrant=qdrant, max_payload_bytes=1024 * 1024)


async def open_participant(
    kind: str, root: Path, settings: Settings, backend: QdrantBackend | None = None
) -> QdrantParticipant:
    participant = QdrantParticipant(settings, backend=backend or make_backend(kind, root))
    await participant.start()
    await participant.ensure_collection(COLLECTION, DIM)
    return participant


@pytest.fixture
async def qp(kind: str, tmp_path: Path, settings: Settings) -> AsyncIterator[QdrantParticipant]:
    participant = await open_participant(kind, tmp_path, settings)
    yield participant
    await participant.close()


async def points(qp: QdrantParticipant, *ids: int | str) -> dict[str, PointData]:
    return await qp.read_points(COLLECTION, ids)


# -- storage ----------------------------------------------------------------------------------------


async def test_upsert_reads_back_and_survives_reopen(
    qp: QdrantParticipant, kind: str, tmp_path: Path, settings: Settings
) -> None:
    uid = "0e5b1f0c-4bb4-4a0e-9d55-6f1d8a3b2c11"
    [result] = await qp.apply_batch([upsert("t1", (1, 0, {"n": 1}), (uid, 2, {"tag": "x"}))])
    assert result["status"] == "APPLIED"
    assert result["error"] is None
    expected = {"1": stored(0, {"n": 1}), uid: stored(2, {"tag": "x"})}
    assert await points(qp, 1, uid) == expected

    await qp.close()
    reopened = await open_participant(kind, tmp_path, settings)
    try:
        assert await points(reopened, 1, uid) == expected
        marker = await reopened.read_marker("t1", 0, "EXECUTE")
        assert marker is not None and not marker.pending
    finally:
        await reopened.close()


async def test_write_survives_a_killed_process(kind: str, tmp_path: Path) -> None:
    """A process that applies a batch and dies without closing anything loses nothing it reported."""
    script = textwrap.dedent(
        f"""
        import asyncio, dataclasses, os, sys
        from pathlib import Path
        from consumers.qdrant import QdrantParticipant
        from consumers.qdrant_backends import ClientBackend, EdgeBackend
        from polycommit.config import load_settings
        from polycommit.operations import point, upsert_points

        async def main():
            root = Path({str(tmp_path)!r})
            backend = EdgeBackend(root / "edge") if {kind!r} == "edge" else ClientBackend(path=root / "local")
            qp = QdrantParticipant(load_settings(), backend=backend)
            await qp.start()
            await qp.ensure_collection("docs", 4)
            op = upsert_points("docs", [point(7, [0.0, 1.0, 0.0, 0.0], {{"kept": True}})])
            cmd = {{"tx_id": "k", "step_index": 0, "action": "EXECUTE", "attempt": 1, "operation": op,
                    "compensation": None, "before_image": None, "issued_at_ms": 0}}
            [out] = await qp.apply_batch([cmd])
            assert out["status"] == "APPLIED", out
            sys.stdout.flush()
            os._exit(0)  # no close, no flush: like a crash right after the outcome was published

        asyncio.run(main())
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(child.communicate(), timeout=120)
    assert child.returncode == 0, stderr.decode()
    qp = QdrantParticipant(load_settings(), backend=make_backend(kind, tmp_path))
    await qp.start()
    try:
        assert await points(qp, 7) == {"7": stored(1, {"kept": True})}
        marker = await qp.read_marker("k", 0, "EXECUTE")
        assert marker is not None and not marker.pending
    finally:
        await qp.close()


async def test_a_second_opener_of_the_storage_is_refused(
    qp: QdrantParticipant, kind: str, tmp_path: Path, settings: Settings
) -> None:
    other = QdrantParticipant(settings, backend=make_backend(kind, tmp_path))
    with pytest.raises(StoreUnavailableError) as refused:
        await other.start()
    assert str(tmp_path / kind) in str(refused.value)
    await other.close()
    # The first opener is unaffected.
    [result] = await qp.apply_batch([upsert("t1", (1, 0, {}))])
    assert result["status"] == "APPLIED"


async def test_the_backend_is_chosen_from_the_settings(kind: str, tmp_path: Path, settings: Settings) -> None:
    if kind == "local":
        local = dataclasses.replace(settings.qdrant, local_path=tmp_path / "loc")
        settings = dataclasses.replace(settings, qdrant=local)
    qp = QdrantParticipant(settings)
    assert qp.backend.name == kind
    await qp.start()
    try:
        await qp.ensure_collection(COLLECTION, DIM)
        [result] = await qp.apply_batch([upsert("t1", (1, 0, {}))])
        assert result["status"] == "APPLIED"
        health = await qp.health()
        assert health["healthy"] is True
        assert health["address"] == settings.qdrant.address
    finally:
        await qp.close()
    assert (tmp_path / ("edge" if kind == "edge" else "loc")).is_dir()


async def test_health_and_idempotent_ensure_collection(qp: QdrantParticipant, kind: str) -> None:
    health = await qp.health()
    assert health["healthy"] is True
    assert health["backend"] == kind
    assert health["version"]
    await qp.ensure_collection(COLLECTION, DIM)  # again: no error, nothing lost
    await qp.apply_batch([upsert("t1", (1, 0, {}))])
    await qp.ensure_collection(COLLECTION, DIM)
    assert set(await points(qp, 1)) == {"1"}
    with pytest.raises(Exception, match="vector size 4, not 8"):
        await qp.ensure_collection(COLLECTION, 8)


# -- before-images and markers ----------------------------------------------------------------------


async def test_before_image_of_existing_and_missing_points(qp: QdrantParticipant) -> None:
    await qp.apply_batch([upsert("seed", (1, 0, {"v": 0}))])
    [result] = await qp.apply_batch([upsert("t1", (1, 1, {"v": 1}), (2, 2, {"v": 1}))])
    assert result["status"] == "APPLIED"
    assert before(result) == {"1": stored(0, {"v": 0}), "2": None}

    marker = await qp.read_marker("t1", 0, "EXECUTE")
    assert marker is not None
    assert marker.pending is False
    assert marker.before_image == result["before_image"]
    assert await qp.read_marker("t1", 0, "COMPENSATE") is None


async def test_delete_records_the_deleted_point(qp: QdrantParticipant) -> None:
    await qp.apply_batch([upsert("seed", (1, 0, {"v": 0}))])
    [result] = await qp.apply_batch([command("t1", 0, "EXECUTE", delete_points(COLLECTION, [1, 2]))])
    assert result["status"] == "APPLIED"
    assert before(result) == {"1": stored(0, {"v": 0}), "2": None}
    assert await points(qp, 1) == {}


async def test_repeated_execute_is_already_applied_and_changes_nothing(qp: QdrantParticipant) -> None:
    first = upsert("t1", (1, 0, {"by": "t1"}))
    [applied] = await qp.apply_batch([first])
    await qp.apply_batch([upsert("t2", (1, 1, {"by": "t2"}))])  # another transaction writes the point

    [again] = await qp.apply_batch([first])
    assert again["status"] == "ALREADY_APPLIED"
    assert again["before_image"] == applied["before_image"]
    assert await points(qp, 1) == {"1": stored(1, {"by": "t2"})}


async def test_duplicates_within_one_batch(qp: QdrantParticipant) -> None:
    cmd = upsert("t1", (1, 0, {"by": "t1"}))
    results = await qp.apply_batch([cmd, cmd])
    assert statuses(results) == ["APPLIED", "ALREADY_APPLIED"]
    assert results[1]["before_image"] == results[0]["before_image"]
    assert before(results[0]) == {"1": None}


# -- compensation -----------------------------------------------------------------------------------


async def test_compensate_restores_the_before_image(qp: QdrantParticipant) -> None:
    await qp.apply_batch([upsert("seed", (1, 0, {"v": 0}))])
    execute = upsert("t1", (1, 1, {"v": 1}), (2, 2, {"v": 1}))
    await qp.apply_batch([execute])
    assert set(await points(qp, 1, 2)) == {"1", "2"}

    compensate = command("t1", 0, "COMPENSATE", execute["operation"])
    [undone] = await qp.apply_batch([compensate])
    assert undone["status"] == "APPLIED"
    assert await points(qp, 1, 2) == {"1": stored(0, {"v": 0})}  # old point back, new point gone

    [again] = await qp.apply_batch([compensate])
    assert again["status"] == "ALREADY_APPLIED"
    [late] = await qp.apply_batch([execute])
    assert late["status"] == "SKIPPED"
    assert await points(qp, 1, 2) == {"1": stored(0, {"v": 0})}


async def test_compensate_of_a_delete_puts_the_point_back(qp: QdrantParticipant) -> None:
    await qp.apply_batch([upsert("seed", (5, 3, {"keep": [1, 2]}))])
    execute = command("t1", 0, "EXECUTE", delete_points(COLLECTION, [5]))
    compensate = command("t1", 0, "COMPENSATE", execute["operation"])
    results = await qp.apply_batch([execute, compensate])  # both in one batch: applied in order
    assert statuses(results) == ["APPLIED", "APPLIED"]
    assert await points(qp, 5) == {"5": stored(3, {"keep": [1, 2]})}


async def test_explicit_compensation_operation_runs_instead(qp: QdrantParticipant) -> None:
    execute = upsert("t1", (1, 0, {"v": 1}))
    await qp.apply_batch([execute])
    explicit = upsert_points(COLLECTION, [point(9, unit(3), {"undo": True})])
    [undone] = await qp.apply_batch([command("t1", 0, "COMPENSATE", execute["operation"], explicit)])
    assert undone["status"] == "APPLIED"
    # The declared compensation ran; the before-image restore (deleting point 1) did not.
    assert await points(qp, 1, 9) == {"1": stored(0, {"v": 1}), "9": stored(3, {"undo": True})}


async def test_compensate_without_execute_is_noop_and_late_execute_is_skipped(qp: QdrantParticipant) -> None:
    execute = upsert("t1", (1, 0, {"late": True}))
    [noop] = await qp.apply_batch([command("t1", 0, "COMPENSATE", execute["operation"])])
    assert noop["status"] == "NOOP"
    marker = await qp.read_marker("t1", 0, "COMPENSATE")
    assert marker is not None and not marker.pending

    [late] = await qp.apply_batch([execute])
    assert late["status"] == "SKIPPED"
    assert await points(qp, 1) == {}
    assert await qp.read_marker("t1", 0, "EXECUTE") is None

    # The same two, in one batch, for another transaction.
    execute2 = upsert("t2", (2, 0, {"late": True}))
    results = await qp.apply_batch([command("t2", 0, "COMPENSATE", execute2["operation"]), execute2])
    assert statuses(results) == ["NOOP", "SKIPPED"]
    assert await points(qp, 2) == {}


# -- a crash between the pending marker and the done marker -----------------------------------------


Crash = Callable[[str, str], bool]  # (backend method, collection) -> crash here?


class CrashingBackend:
    """Delegates to a real backend, but fails the first write that `crash_on` picks, like a dying process."""

    def __init__(self, inner: QdrantBackend, crash_on: Crash) -> None:
        self.inner, self.crash_on, self.crashed = inner, crash_on, False
        self.name, self.address = inner.name, inner.address

    def _maybe_crash(self, method: str, collection: str) -> None:
        if not self.crashed and self.crash_on(method, collection):
            self.crashed = True
            raise StoreUnavailableError("simulated crash")

    async def ensure_collection(self, name: str, size: int, distance: str) -> int:
        return await self.inner.ensure_collection(name, size, distance)

    async def collection_info(self, name: str) -> int | None:
        return await self.inner.collection_info(name)

    async def retrieve(self, collection: str, ids: Sequence[str], with_vectors: bool = True) -> dict[str, PointData]:
        return await self.inner.retrieve(collection, ids, with_vectors)

    async def upsert(self, collection: str, points: Mapping[str, PointData]) -> None:
        self._maybe_crash("upsert", collection)
        await self.inner.upsert(collection, points)

    async def delete(self, collection: str, ids: Sequence[str]) -> None:
        self._maybe_crash("delete", collection)
        await self.inner.delete(collection, ids)

    async def set_payload(self, collection: str, ids: Sequence[str], payload: Mapping[str, Any]) -> None:
        self._maybe_crash("set_payload", collection)
        await self.inner.set_payload(collection, ids, payload)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close(self) -> None:
        await self.inner.close()

    async def version(self) -> str:
        return await self.inner.version()


def before_data_write(method: str, collection: str) -> bool:
    return collection == COLLECTION


def before_done_marker(method: str, collection: str) -> bool:
    """After the data write: the pending marker is never confirmed."""
    return collection == MARKERS and method == "set_payload"


@pytest.mark.parametrize("crash_on", [before_data_write, before_done_marker])
async def test_pending_marker_is_completed_with_the_recorded_before_image(
    kind: str, tmp_path: Path, settings: Settings, crash_on: Crash
) -> None:
    qp = await open_participant(kind, tmp_path, settings)
    await qp.apply_batch([upsert("seed", (1, 0, {"v": 0}))])
    await qp.close()

    crashing = CrashingBackend(make_backend(kind, tmp_path), crash_on)
    qp = await open_participant(kind, tmp_path, settings, backend=crashing)
    execute = upsert("t1", (1, 1, {"v": 1}), (2, 2, {"v": 1}))
    with pytest.raises(StoreUnavailableError):
        await qp.apply_batch([execute])
    assert crashing.crashed
    marker = await qp.read_marker("t1", 0, "EXECUTE")
    assert marker is not None and marker.pending
    recorded = {"1": stored(0, {"v": 0}), "2": None}
    assert marker.before_image is not None
    assert json.loads(marker.before_image)["points"] == recorded
    landed = await points(qp, 1, 2)
    if crash_on is before_done_marker:  # the store already holds our own write
        assert landed == {"1": stored(1, {"v": 1}), "2": stored(2, {"v": 1})}
    else:
        assert landed == {"1": stored(0, {"v": 0})}
    await qp.close()

    qp = await open_participant(kind, tmp_path, settings)  # the restarted consumer gets the redelivery
    try:
        [redone] = await qp.apply_batch([execute])
        assert redone["status"] == "APPLIED"
        assert before(redone) == recorded
        assert await points(qp, 1, 2) == {"1": stored(1, {"v": 1}), "2": stored(2, {"v": 1})}
        marker = await qp.read_marker("t1", 0, "EXECUTE")
        assert marker is not None and not marker.pending

        # And the compensation undoes the step, not our own first attempt.
        [undone] = await qp.apply_batch([command("t1", 0, "COMPENSATE", execute["operation"])])
        assert undone["status"] == "APPLIED"
        assert await points(qp, 1, 2) == {"1": stored(0, {"v": 0})}
    finally:
        await qp.close()


async def test_compensate_after_a_crash_with_a_pending_execute_marker(
    kind: str, tmp_path: Path, settings: Settings
) -> None:
    crashing = CrashingBackend(make_backend(kind, tmp_path), before_done_marker)
    qp = await open_participant(kind, tmp_path, settings, backend=crashing)
    execute = upsert("t1", (3, 0, {"v": 1}))
    with pytest.raises(StoreUnavailableError):
        await qp.apply_batch([execute])
    assert set(await points(qp, 3)) == {"3"}  # the data landed, the marker is still pending
    await qp.close()

    qp = await open_participant(kind, tmp_path, settings)
    try:
        [undone] = await qp.apply_batch([command("t1", 0, "COMPENSATE", execute["operation"])])
        assert undone["status"] == "APPLIED"
        assert await points(qp, 3) == {}
        [late] = await qp.apply_batch([execute])
        assert late["status"] == "SKIPPED"
        assert await points(qp, 3) == {}
    finally:
        await qp.close()


# -- bad input is contained -------------------------------------------------------------------------


async def test_invalid_commands_fail_alone(qp: QdrantParticipant) -> None:
    wrong_size = command("bad1", 0, "EXECUTE", upsert_points(COLLECTION, [point(3, [1.0, 0.0, 0.0])]))
    missing = upsert("bad2", (4, 0, {}), collection="nope")
    missing_delete = command("bad3", 0, "EXECUTE", delete_points("nope", [4]))
    results = await qp.apply_batch(
        [upsert("ok1", (1, 0, {})), wrong_size, missing, upsert("ok2", (2, 1, {})), missing_delete]
    )
    assert statuses(results) == ["APPLIED", "FAILED", "FAILED", "APPLIED", "FAILED"]
    errors = [r["error"] for r in results[1:3]] + [results[4]["error"]]
    assert all(e is not None and e["error_class"] == "InvalidOperationError" for e in errors)
    assert all(e is not None and e["retriable"] is False for e in errors)
    messages = [e["message"] for e in errors if e is not None]
    assert messages == [
        "wrong vector size: expected 4, got 3",
        "collection nope does not exist",
        "collection nope does not exist",
    ]
    assert await points(qp, 1, 2, 3) == {"1": stored(0, {}), "2": stored(1, {})}
    assert await qp.read_marker("bad1", 0, "EXECUTE") is None  # a failed command leaves no marker


# -- batching ---------------------------------------------------------------------------------------


async def test_repeated_point_in_a_batch_gives_one_by_one_before_images(
    qp: QdrantParticipant, kind: str, tmp_path: Path, settings: Settings
) -> None:
    await qp.apply_batch([upsert("seed", (1, 0, {"v": 0}))])
    batch = [
        upsert("t1", (1, 1, {"v": 1})),
        upsert("t2", (1, 2, {"v": 2}), (2, 0, {"v": 2})),
        command("t3", 0, "EXECUTE", delete_points(COLLECTION, [1])),
        upsert("t4", (1, 3, {"v": 4}), (3, 0, {"v": 4})),
        upsert("t5", (2, 3, {"v": 5})),
    ]
    results = await qp.apply_batch(batch)
    assert statuses(results) == ["APPLIED"] * 5
    assert [before(r) for r in results] == [
        {"1": stored(0, {"v": 0})},
        {"1": stored(1, {"v": 1}), "2": None},
        {"1": stored(2, {"v": 2})},
        {"1": None, "3": None},
        {"2": stored(0, {"v": 2})},
    ]
    final = await points(qp, 1, 2, 3)
    assert final == {"1": stored(3, {"v": 4}), "2": stored(3, {"v": 5}), "3": stored(0, {"v": 4})}

    # The same commands one batch each, in a second collection, give the same before-images.
    await qp.ensure_collection("docs_one_by_one", DIM)
    relocated = [
        command(c["tx_id"] + "'", 0, "EXECUTE", {**c["operation"], "target": "docs_one_by_one"})
        for c in [upsert("seed", (1, 0, {"v": 0})), *batch]
    ]
    one_by_one = [(await qp.apply_batch([c]))[0] for c in relocated]
    assert [before(r) for r in one_by_one[1:]] == [before(r) for r in results]


# -- points that existed before the saga (issue 9, defect 1) ----------------------------------------


@pytest.mark.parametrize("same_batch", [True, False], ids=["one batch", "separate batches"])
async def test_compensate_restores_points_that_existed_before_the_saga(qp: QdrantParticipant, same_batch: bool) -> None:
    await qp.apply_batch([upsert("seed", (1, 0, {"v": "old"}), (2, 1, {"v": "old"}))])
    overwrite = upsert("t1", (1, 2, {"v": "new"}), (3, 2, {"v": "new"}))
    delete = command("t1", 1, "EXECUTE", delete_points(COLLECTION, [2]))
    steps = [overwrite, command("t1", 0, "COMPENSATE", overwrite["operation"])]
    steps += [delete, command("t1", 1, "COMPENSATE", delete["operation"])]
    results = await qp.apply_batch(steps) if same_batch else [(await qp.apply_batch([s]))[0] for s in steps]
    assert statuses(results) == ["APPLIED"] * 4
    assert await points(qp, 1, 2, 3) == {"1": stored(0, {"v": "old"}), "2": stored(1, {"v": "old"})}
