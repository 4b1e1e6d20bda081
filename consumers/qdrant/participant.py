"""The Qdrant participant: applies saga steps (upsert/delete points) with their applied-step markers.

Qdrant has no transaction spanning several points, so a step's effect and its marker cannot commit
together. Markers live in their own collection (`_polycommit_markers`) and each batch writes, in order:

1. the markers, `pending=True`, each holding its step's before-image;
2. the data writes;
3. the markers again, `pending=False`.

A crash between 1 and 3 leaves a pending marker. Its step is applied again on redelivery with the
before-image recorded in step 1, never one read anew: the store may already hold our own write, which
would make the step's compensation restore the step instead of undoing it. Re-applying is safe because
an upsert or delete of given points is idempotent.

Throughput comes from batching: one marker read per batch, then per *generation* (consecutive commands
whose points do not repeat, see `consumers.planner.batch_groups`) one before-image read per collection, one
marker write, one write per collection and kind, and one marker write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from consumers import timing
from consumers.base import Marker, Participant, Plan, Timing, failed, marker_id, outcome, status_for
from consumers.command import TypedCommand
from consumers.planner import batch_groups
from consumers.qdrant.backend import PointData, QdrantBackend, canonical_id
from consumers.qdrant.client import ClientBackend
from consumers.qdrant.edge import EdgeBackend
from consumers.qdrant.effects import (
    MARKER_VECTOR,
    MARKERS,
    PointWrites,
    before_image,
    current_versions,
    marker_point_id,
    restore_writes,
    version_conflict,
    versioned,
    writes_of,
)
from consumers.qdrant.steps import Step, check_versions, plan_steps, points_op, targets
from polycommit.config import Settings
from polycommit.errors import InvalidOperationError, PolycommitError, StoreError, StoreUnavailableError
from polycommit.events import StepOutcome, Store, error_info
from polycommit.failpoints import failpoint
from polycommit.parsed import PointsOperation
from polycommit.versioning import TOMBSTONES, tombstone_id, without_version


def backend_for(settings: Settings) -> QdrantBackend:
    q = settings.qdrant
    if q.backend == "client":
        return ClientBackend(url=q.url, api_key=q.api_key)
    if q.backend == "local":
        assert q.local_path is not None
        return ClientBackend(path=q.local_path)
    return EdgeBackend(q.edge_path)


class QdrantParticipant(Participant):
    store: Store = "qdrant"

    def __init__(self, settings: Settings, backend: QdrantBackend | None = None) -> None:
        self.settings = settings
        self.backend: QdrantBackend = backend if backend is not None else backend_for(settings)
        # Without it, a batch survives a killed process (the WAL is written before a call returns) but
        # not a power loss; the same holds for a single Kafka broker, which does not fsync by default.
        # Costs ~40 ms per batch (two flushes), a third of the saga throughput measured here.
        self.fsync = settings.qdrant.fsync
        self._sizes: dict[str, int] = {}  # vector size of collections known to exist
        self._started = False
        # Batches must not interleave: a generation's before-images assume nobody writes in between.
        self._lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        # Dot, not Cosine: a one-dimensional marker vector needs no normalisation.
        await self.backend.ensure_collection(MARKERS, 1, "Dot")
        await self.backend.ensure_collection(TOMBSTONES, 1, "Dot")
        self._started = True

    async def close(self) -> None:
        self._started = False
        self._sizes.clear()
        await self.backend.close()

    async def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {"backend": self.backend.name, "address": self.backend.address}
        try:
            version = await self.backend.version()
            markers = await self.backend.collection_info(MARKERS)
        except Exception as exc:
            return {"healthy": False, "version": "", **report, "error": str(exc)}
        if markers is None:
            return {"healthy": False, "version": version, **report, "error": f"collection {MARKERS} is missing"}
        return {"healthy": True, "version": version, **report}

    async def ensure_collection(self, name: str, size: int, distance: str = "Cosine") -> None:
        """Create a collection if it is missing (idempotent); refuse one that exists with another size."""
        actual = await self.backend.ensure_collection(name, size, distance)
        if actual != size:
            raise InvalidOperationError(f"collection {name} exists with vector size {actual}, not {size}")
        self._sizes[name] = size

    # -- reads for tests, the demo and the consistency checker --------------------------------------

    async def read_points(self, collection: str, ids: Iterable[str | int]) -> dict[str, PointData]:
        """The points as the user wrote them (polycommit's version field left out)."""
        found = await self.backend.retrieve(collection, [canonical_id(i) for i in ids])
        return {i: {"vector": p["vector"], "payload": without_version(p["payload"])} for i, p in found.items()}

    async def read_versions(self, collection: str, ids: Iterable[str | int]) -> dict[str, int]:
        """Each point's version (polycommit.versioning), by canonical id."""
        pairs = [(collection, canonical_id(i)) for i in ids]
        return current_versions(pairs, *await self._read_current(pairs))

    async def read_marker(self, tx_id: str, step_index: int, action: str) -> Marker | None:
        marker = marker_id(tx_id, step_index, action)
        return (await self._read_markers([marker])).get(marker)

    # -- the batch ----------------------------------------------------------------------------------

    async def apply_commands(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        if not commands:
            return []
        if not self._started:
            await self.start()
        async with self._lock:
            begun = timing.started()
            markers, sizes = await self._read_state(commands)
            steps, rejected = plan_steps(commands, markers, sizes)
            active = [s for s in steps if s.planned.writes_marker]
            by_position = {s.planned.position: s for s in active}
            keys = {s.planned.position: s.keys for s in active}
            for group in batch_groups([s.planned for s in active], lambda p: keys[p.position]):
                await self._run_group([by_position[p.position] for p in group])
            if active and self.fsync:
                # Edge does not fsync its WAL per update: make the batch durable before its outcomes
                # are published, so "applied" survives a power loss, not only a killed process.
                await self.backend.flush()
            done = timing.since(begun)
            results = {s.index: self._outcome(s, done) for s in steps}
            results.update((i, failed(commands[i].source, self.store, exc, done)) for i, exc in rejected.items())
            return [results[i] for i in range(len(commands))]

    async def vote(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
        """Shape (b): a PREPARE changes nothing; it votes yes when the collection exists, the vectors
        have its size (the payload JSON was parsed already) and no ABORT fenced the step before."""
        if not self._started:
            await self.start()
        async with self._lock:
            begun = timing.started()
            markers, sizes = await self._read_state(commands)
            checked = [
                op
                for c in commands
                if isinstance(op := c.operation, PointsOperation) and op.expected_version is not None
            ]
            pairs = [(op.collection, i) for op in checked if op.collection in sizes for i in op.ids]
            # Read without holding anything past the vote: the coordinator's exclusive locks on these keys
            # last until phase 2 is done, so the versions cannot change before the COMMIT writes.
            current = await self._read_current(pairs)
            done = timing.since(begun)
        results: list[StepOutcome] = []
        for command in commands:
            try:
                if command.compensate_id in markers:
                    raise InvalidOperationError("the step was aborted here before")
                op = points_op(command.operation)
                writes_of(op, sizes)
                if command.execute_id not in markers:  # else a redelivery after its COMMIT: its write moved it
                    problem = version_conflict(op, current_versions([(op.collection, i) for i in op.ids], *current))
                    if problem is not None:
                        raise problem
            except Exception as exc:
                cls = exc.error_class if isinstance(exc, PolycommitError) else type(exc).__name__
                error = error_info(cls, str(exc), bool(getattr(exc, "retriable", False)))
                results.append(outcome(command.source, self.store, "VOTED_NO", done, error=error))
            else:
                results.append(outcome(command.source, self.store, "PREPARED", done))
        return results

    async def _read_state(self, commands: Sequence[TypedCommand]) -> tuple[dict[str, Marker], dict[str, int]]:
        """The batch's markers (one read) and the vector sizes of the collections it names."""
        wanted = [i for c in commands for i in (c.execute_id, c.compensate_id)]
        try:
            markers = await self._read_markers(wanted)
            for name in set().union(*(targets(c) for c in commands)) - self._sizes.keys():
                size = await self.backend.collection_info(name)
                if size is not None:
                    self._sizes[name] = size
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            # Without markers nothing in the batch can be decided: retry the batch, as for an outage.
            where = self.backend.address
            raise StoreUnavailableError(f"Qdrant at {where}: cannot read the batch's state: {exc}") from exc
        return markers, self._sizes

    async def _read_markers(self, ids: Sequence[str]) -> dict[str, Marker]:
        by_point = {marker_point_id(m): m for m in ids}
        found = await self.backend.retrieve(MARKERS, list(by_point), with_vectors=False)
        markers: dict[str, Marker] = {}
        for point_id, point in found.items():
            payload = point["payload"]
            pending = bool(payload.get("pending"))
            markers[by_point[point_id]] = Marker(before_image=payload.get("before"), pending=pending)
        return markers

    # -- applying a generation ----------------------------------------------------------------------

    async def _run_group(self, steps: list[Step]) -> None:
        try:
            await self._apply_group(steps)
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            if len(steps) == 1:
                steps[0].error = exc
                return
            # One bad write took the shared call down. Find it by applying each step alone: safe, since
            # every step's marker is pending with its before-image already known.
            for step in steps:
                await self._run_group([step])

    async def _apply_group(self, steps: list[Step]) -> None:
        self._resolve_derived(steps)
        steps = [s for s in steps if s.error is None]
        await self._read_before_images(steps)
        check_versions(steps)
        steps = [s for s in steps if s.error is None]
        data = [s for s in steps if s.planned.writes_data]
        if data:
            await self._write_markers(data, pending=True)
            if self.fsync:
                # The pending markers (with the before-images) must be on disk before the data they
                # guard: markers and points are separate shards with separate WALs.
                await self.backend.flush()
            await self._write_data(data)
            failpoint("qdrant.between_points_and_marker")
            await self._confirm_markers(data)
        noops = [s for s in steps if s.decision is Plan.RECORD_NOOP_COMPENSATION]
        if noops:
            await self._write_markers(noops, pending=False)

    def _resolve_derived(self, steps: list[Step]) -> None:
        """Compensations of an EXECUTE from this same batch: its before-image is known by now."""
        for step in steps:
            if step.writes is None and step.decision is Plan.APPLY_COMPENSATION:
                assert isinstance(step.source, Step)
                if step.source.error is not None:
                    step.writes = PointWrites()  # its EXECUTE here failed (a version conflict): nothing to undo
                    continue
                try:
                    step.writes = restore_writes(
                        points_op(step.planned.command.operation).collection, step.source.before
                    )
                except Exception as exc:
                    step.error = exc

    async def _read_before_images(self, steps: list[Step]) -> None:
        """The before-images of the generation's EXECUTEs and the versions of every point it writes.

        A re-applied EXECUTE (pending marker) takes both from its marker: the store may show its own write.
        A compensation reads the versions now: it writes a new version over whatever is there."""
        unread = [s for s in steps if s.planned.writes_data and not s.before_known]
        pairs = [pair for s in unread if s.writes is not None for pair in s.writes.touched()]
        found, tombstones = await self._read_current(pairs)
        for step in unread:
            assert step.writes is not None
            step.versions = current_versions(step.writes.touched(), found, tombstones)
            if step.decision is Plan.APPLY_EXECUTE:
                step.before, step.before_known = before_image(step.writes, found, step.versions), True

    async def _read_current(
        self, pairs: Sequence[tuple[str, str]]
    ) -> tuple[dict[str, dict[str, PointData]], dict[str, PointData]]:
        """The points named (by collection), and the tombstones of those absent (by tombstone id)."""
        wanted: dict[str, list[str]] = {}
        for collection, point_id in pairs:
            wanted.setdefault(collection, []).append(point_id)
        found = {c: await self.backend.retrieve(c, ids) for c, ids in wanted.items()}
        graves = [tombstone_id(c, i) for c, ids in wanted.items() for i in ids if i not in found[c]]
        return found, await self.backend.retrieve(TOMBSTONES, graves, with_vectors=False)

    async def _write_markers(self, steps: list[Step], *, pending: bool) -> None:
        points: dict[str, PointData] = {}
        for step in steps:
            # Only an EXECUTE's before-image is ever needed again: compensations restore from it.
            before = step.before if step.planned.is_execute else None
            payload = {"id": step.marker, "before": before, "pending": pending}
            points[step.marker_point] = {"vector": MARKER_VECTOR, "payload": payload}
        await self.backend.upsert(MARKERS, points)

    async def _confirm_markers(self, steps: list[Step]) -> None:
        """Turn pending markers, written by this generation, into done ones."""
        # One payload update for all of them: cheaper than rewriting whole points (the payload
        # conversion dominates an Edge upsert), and it keeps the recorded before-images as they are.
        await self.backend.set_payload(MARKERS, [s.marker_point for s in steps], {"pending": False})

    async def _write_data(self, steps: list[Step]) -> None:
        merged = PointWrites()
        for step in steps:
            assert step.writes is not None
            merged.merge(versioned(step.writes, step.versions))
        for collection, points in merged.upserts.items():
            await self.backend.upsert(collection, points)
        for collection, ids in merged.deletes.items():
            await self.backend.delete(collection, ids)

    # -- outcomes -----------------------------------------------------------------------------------

    def _outcome(self, step: Step, done: Timing) -> StepOutcome:
        command = step.planned.command.source
        source = step.source
        if source is not None and source.error is not None and step.decision is Plan.ALREADY_APPLIED:
            return failed(command, self.store, source.error, done)  # its twin in this batch failed
        if step.error is not None:
            return failed(command, self.store, step.error, done)
        before: str | None = None
        if step.planned.is_execute:
            if step.decision is Plan.APPLY_EXECUTE:
                before = step.before
            elif source is not None:
                before = source.before
            elif step.planned.own is not None:
                before = step.planned.own.before_image
        return outcome(command, self.store, status_for(step.decision), done, before_image=before)
