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
from dataclasses import dataclass, field
from typing import Any

from consumers import timing
from consumers.base import Marker, Participant, Plan, Timing, failed, marker_id, outcome, status_for
from consumers.command import TypedCommand
from consumers.planner import Planned, batch_groups, plan_batch
from consumers.qdrant.backend import PointData, QdrantBackend, canonical_id
from consumers.qdrant.client import ClientBackend
from consumers.qdrant.edge import EdgeBackend
from consumers.qdrant.effects import (
    MARKER_VECTOR,
    MARKERS,
    PointWrites,
    before_image,
    marker_point_id,
    restore_writes,
    writes_of,
)
from polycommit.config import Settings
from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError
from polycommit.events import StepOutcome, Store, error_info
from polycommit.failpoints import failpoint
from polycommit.parsed import PointsOperation, keys_of


def backend_for(settings: Settings) -> QdrantBackend:
    q = settings.qdrant
    if q.backend == "client":
        return ClientBackend(url=q.url, api_key=q.api_key)
    if q.backend == "local":
        assert q.local_path is not None
        return ClientBackend(path=q.local_path)
    return EdgeBackend(q.edge_path)


@dataclass(eq=False)
class _Step:
    """One planned command's way through the batch (`index`: its position in the batch as given)."""

    planned: Planned
    index: int
    writes: PointWrites | None = None  # None for a compensation derived from an EXECUTE earlier in the batch
    source: _Step | None = None  # that EXECUTE, or the twin an ALREADY_APPLIED repeats
    before: str | None = None
    before_known: bool = False
    error: BaseException | None = None
    keys: list[str] = field(default_factory=list)
    marker: str = field(init=False)  # this command's own marker id...
    marker_point: str = field(init=False)  # ...and its point id in MARKERS

    def __post_init__(self) -> None:
        self.marker = self.planned.command.own_id
        self.marker_point = marker_point_id(self.marker)

    @property
    def decision(self) -> Plan:
        return self.planned.decision


def _points_op(op: object) -> PointsOperation:
    if not isinstance(op, PointsOperation):  # parse_command admits no other qdrant operation
        raise InvalidOperationError(f"the qdrant participant cannot run {type(op).__name__}")
    return op


def _targets(command: TypedCommand) -> set[str]:
    return {op.collection for op in (command.operation, command.compensation) if isinstance(op, PointsOperation)}


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
        return await self.backend.retrieve(collection, [canonical_id(i) for i in ids])

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
            steps, rejected = _plan(commands, markers, sizes)
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
            done = timing.since(begun)
        results: list[StepOutcome] = []
        for command in commands:
            try:
                if command.compensate_id in markers:
                    raise InvalidOperationError("the step was aborted here before")
                writes_of(_points_op(command.operation), sizes)
            except Exception as exc:
                cls = type(exc).__name__ if not isinstance(exc, StoreError) else exc.error_class
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
            for name in set().union(*(_targets(c) for c in commands)) - self._sizes.keys():
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

    async def _run_group(self, steps: list[_Step]) -> None:
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

    async def _apply_group(self, steps: list[_Step]) -> None:
        self._resolve_derived(steps)
        steps = [s for s in steps if s.error is None]
        await self._read_before_images(steps)
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

    def _resolve_derived(self, steps: list[_Step]) -> None:
        """Compensations of an EXECUTE from this same batch: its before-image is known by now."""
        for step in steps:
            if step.writes is None and step.decision is Plan.APPLY_COMPENSATION:
                assert isinstance(step.source, _Step)
                try:
                    step.writes = restore_writes(
                        _points_op(step.planned.command.operation).collection, step.source.before
                    )
                except Exception as exc:
                    step.error = exc

    async def _read_before_images(self, steps: list[_Step]) -> None:
        unread = [s for s in steps if s.decision is Plan.APPLY_EXECUTE and not s.before_known]
        wanted: dict[str, list[str]] = {}
        for step in unread:
            assert step.writes is not None
            for collection, point_id in step.writes.touched():
                wanted.setdefault(collection, []).append(point_id)
        found = {c: await self.backend.retrieve(c, ids) for c, ids in wanted.items()}
        for step in unread:
            assert step.writes is not None
            step.before, step.before_known = before_image(step.writes, found), True

    async def _write_markers(self, steps: list[_Step], *, pending: bool) -> None:
        points: dict[str, PointData] = {}
        for step in steps:
            # Only an EXECUTE's before-image is ever needed again: compensations restore from it.
            before = step.before if step.planned.is_execute else None
            payload = {"id": step.marker, "before": before, "pending": pending}
            points[step.marker_point] = {"vector": MARKER_VECTOR, "payload": payload}
        await self.backend.upsert(MARKERS, points)

    async def _confirm_markers(self, steps: list[_Step]) -> None:
        """Turn pending markers, written by this generation, into done ones."""
        # One payload update for all of them: cheaper than rewriting whole points (the payload
        # conversion dominates an Edge upsert), and it keeps the recorded before-images as they are.
        await self.backend.set_payload(MARKERS, [s.marker_point for s in steps], {"pending": False})

    async def _write_data(self, steps: list[_Step]) -> None:
        merged = PointWrites()
        for step in steps:
            assert step.writes is not None
            merged.merge(step.writes)
        for collection, points in merged.upserts.items():
            await self.backend.upsert(collection, points)
        for collection, ids in merged.deletes.items():
            await self.backend.delete(collection, ids)

    # -- outcomes -----------------------------------------------------------------------------------

    def _outcome(self, step: _Step, done: Timing) -> StepOutcome:
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


# -- planning (pure) --------------------------------------------------------------------------------


def _plan(
    commands: Sequence[TypedCommand], markers: dict[str, Marker], sizes: dict[str, int]
) -> tuple[list[_Step], dict[int, BaseException]]:
    """Plan the batch with the shared planner, then turn each decision into point writes. A command the
    store refuses (a missing collection, a wrong vector size) is left out and the rest planned again,
    so it never counts as recorded for the commands after it."""
    rejected: dict[int, BaseException] = {}
    while True:
        kept = [i for i in range(len(commands)) if i not in rejected]
        steps = [_Step(p, kept[p.position]) for p in plan_batch([commands[i] for i in kept], markers)]
        fresh: dict[int, BaseException] = {}
        for step in steps:
            try:
                _prepare(step, steps, sizes)
            except Exception as exc:  # anything wrong with one command fails that command alone
                fresh[step.index] = exc
        if not fresh:
            return steps, rejected
        rejected.update(fresh)


def _prepare(step: _Step, steps: Sequence[_Step], sizes: dict[str, int]) -> None:
    p = step.planned
    command = p.command
    if p.earlier is not None:
        step.source = steps[p.earlier]
    if p.decision is Plan.APPLY_EXECUTE:
        step.writes = writes_of(_points_op(command.operation), sizes)
        step.keys = keys_of(command.operation)
        if p.own is not None and p.own.pending:
            # An earlier attempt may have written the data already, so the store may show our own
            # write: the before-image recorded ahead of it is the only true one.
            step.before, step.before_known = p.own.before_image, True
    elif p.decision is Plan.APPLY_COMPENSATION:
        # A restore writes back exactly the points its EXECUTE wrote (the before-image names them all).
        step.keys = keys_of(command.compensation or command.operation)
        if command.compensation is not None:
            step.writes = writes_of(_points_op(command.compensation), sizes)
        elif p.execute is not None:
            step.writes = restore_writes(_points_op(command.operation).collection, p.execute.before_image)
        # else: the EXECUTE is earlier in this batch; its before-image exists once its generation ran
