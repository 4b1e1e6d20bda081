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
whose points do not repeat, see `consumers.base.generations`) one before-image read per collection, one
marker write, one write per collection and kind, and one marker write.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.base import Marker, Participant, Plan, failed, generations, marker_id, outcome, plan, status_for
from consumers.qdrant_backends import ClientBackend, EdgeBackend, PointData, QdrantBackend, canonical_id
from polycommit.config import Settings
from polycommit.errors import InvalidOperationError, StoreError, StoreUnavailableError
from polycommit.events import Operation, StepOutcome, Store, StoreCommand
from polycommit.operations import dumps, validate_operation

MARKERS = "_polycommit_markers"
# Fixed forever: marker point ids derive from it, and a new value would orphan every existing marker.
MARKER_NAMESPACE = uuid.UUID("0b6c1f5e-8d3a-4e57-9c1d-7a2e4f6b8c90")
_MARKER_VECTOR = [1.0]  # Qdrant points need a vector; markers are only ever read by id

_WRITES_DATA = frozenset({Plan.APPLY_EXECUTE, Plan.APPLY_COMPENSATION})
_WRITES_MARKER = _WRITES_DATA | {Plan.RECORD_NOOP_COMPENSATION}


_NAMESPACE_BYTES = MARKER_NAMESPACE.bytes


def marker_point_id(marker: str) -> str:
    """The point id of a marker in `_polycommit_markers`: uuid5(MARKER_NAMESPACE, marker).

    Deterministic, so a rewrite overwrites the marker. Spelled out rather than `str(uuid.uuid5(...))`,
    which builds two UUID objects and costs 3 µs, a tenth of a whole command's budget (3 per command).
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + marker.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def backend_for(settings: Settings) -> QdrantBackend:
    q = settings.qdrant
    if q.backend == "client":
        return ClientBackend(url=q.url, api_key=q.api_key)
    if q.backend == "local":
        assert q.local_path is not None
        return ClientBackend(path=q.local_path)
    return EdgeBackend(q.edge_path)


# -- what a batch writes ----------------------------------------------------------------------------


@dataclass
class _Writes:
    """Point writes by collection. Within a generation no point repeats, so their order is free."""

    upserts: dict[str, dict[str, PointData]] = field(default_factory=dict)
    deletes: dict[str, list[str]] = field(default_factory=dict)

    def upsert(self, collection: str, point_id: str, point: PointData) -> None:
        self.upserts.setdefault(collection, {})[point_id] = point

    def delete(self, collection: str, point_id: str) -> None:
        self.deletes.setdefault(collection, []).append(point_id)

    def merge(self, other: _Writes) -> None:
        for collection, points in other.upserts.items():
            self.upserts.setdefault(collection, {}).update(points)
        for collection, ids in other.deletes.items():
            self.deletes.setdefault(collection, []).extend(ids)

    def touched(self) -> list[tuple[str, str]]:
        """(collection, point id) of every point written, upserts first."""
        pairs = [(c, i) for c, points in self.upserts.items() for i in points]
        return pairs + [(c, i) for c, ids in self.deletes.items() for i in ids]

    def lock_keys(self) -> list[str]:
        # The same names as operations.lock_keys, but over canonical ids, so that "7" and "007" or two
        # spellings of one UUID are recognised as the same point.
        return [f"qdrant:{c}:{i}" for c, i in self.touched()]


def restore_writes(collection: str, before_image: str | None) -> _Writes:
    """The writes that put back a before-image: points that did not exist are deleted, others rewritten."""
    if before_image is None:
        raise InvalidOperationError("the step's EXECUTE marker holds no before-image to restore")
    points = json.loads(before_image).get("points")
    if not isinstance(points, dict):
        raise InvalidOperationError("the step's before-image has no 'points' object")
    writes = _Writes()
    for point_id, old in points.items():
        if old is None:
            writes.delete(collection, canonical_id(point_id))
        else:
            vector = [float(x) for x in old["vector"]]
            writes.upsert(collection, canonical_id(point_id), {"vector": vector, "payload": dict(old["payload"])})
    return writes


def before_image(writes: _Writes, found: Mapping[str, Mapping[str, PointData]]) -> str:
    """`{"points": {"<id>": null | {"vector": [...], "payload": {...}}}}` for every point the step writes."""
    return dumps({"points": {i: found.get(c, {}).get(i) for c, i in writes.touched()}})


# -- one command's way through the batch ------------------------------------------------------------


@dataclass(eq=False)
class _Step:
    command: StoreCommand
    started_ns: int
    decision: Plan | None = None
    error: BaseException | None = None
    writes: _Writes | None = None  # None for a compensation derived from an EXECUTE earlier in the batch
    source: Marker | _Step | None = None  # ALREADY_APPLIED: the own marker; derived compensation: the EXECUTE
    before: str | None = None
    before_known: bool = False
    keys: list[str] = field(default_factory=list)
    marker: str = field(init=False)  # this command's own marker id...
    marker_point: str = field(init=False)  # ...and its point id in MARKERS

    def __post_init__(self) -> None:
        c = self.command
        self.marker = marker_id(c["tx_id"], c["step_index"], c["action"])
        self.marker_point = marker_point_id(self.marker)


def _as_marker(entry: Marker | _Step | None) -> Marker | None:
    """What plan() needs of a marker: a step planned earlier in the batch counts as recorded and done."""
    if isinstance(entry, _Step):
        return Marker(before_image=entry.before, pending=False)
    return entry


def _targets(command: StoreCommand) -> set[str]:
    targets: set[str] = set()
    for op in (command.get("operation"), command.get("compensation")):
        if isinstance(op, dict) and op.get("store") == "qdrant" and isinstance(op.get("target"), str):
            targets.add(op["target"])
    return targets


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

    async def apply_batch(self, commands: Sequence[StoreCommand]) -> list[StepOutcome]:
        if not commands:
            return []
        if not self._started:
            await self.start()
        async with self._lock:
            started = time.perf_counter_ns()
            markers, sizes = await self._read_state(commands)
            steps = self._plan_batch(commands, markers, sizes, started)
            active = [s for s in steps if s.error is None and s.decision in _WRITES_MARKER]
            keys = {position: s.keys for position, s in enumerate(active)}
            for group in generations([s.command for s in active], keys):
                await self._run_group([active[position] for position in group])
            if active and self.fsync:
                # Edge does not fsync its WAL per update: make the batch durable before its outcomes
                # are published, so "applied" survives a power loss, not only a killed process.
                await self.backend.flush()
            return [self._outcome(s) for s in steps]

    async def _read_state(self, commands: Sequence[StoreCommand]) -> tuple[dict[str, Marker], dict[str, int]]:
        """The batch's markers (one read) and the vector sizes of the collections it names."""
        wanted: list[str] = []
        for c in commands:
            wanted += [marker_id(c["tx_id"], c["step_index"], a) for a in ("EXECUTE", "COMPENSATE")]
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

    # -- planning (pure) ----------------------------------------------------------------------------

    def _plan_batch(
        self, commands: Sequence[StoreCommand], markers: dict[str, Marker], sizes: Mapping[str, int], started: int
    ) -> list[_Step]:
        """Decide every command in order, as if the earlier ones had already been applied."""
        view: dict[str, Marker | _Step] = dict(markers)
        steps: list[_Step] = []
        for command in commands:
            step = _Step(command, started)
            try:
                self._plan_step(step, view, sizes)
            except Exception as exc:  # anything wrong with one command fails that command alone
                step.decision, step.error = None, exc
            steps.append(step)
        return steps

    def _plan_step(self, step: _Step, view: dict[str, Marker | _Step], sizes: Mapping[str, int]) -> None:
        command = step.command
        tx, index = command["tx_id"], command["step_index"]
        execute = view.get(marker_id(tx, index, "EXECUTE"))
        compensate = view.get(marker_id(tx, index, "COMPENSATE"))
        decision = plan(command, _as_marker(execute), _as_marker(compensate))
        own = execute if command["action"] == "EXECUTE" else compensate
        if decision is Plan.APPLY_EXECUTE:
            step.writes = self._writes_of(command["operation"], sizes)
            if isinstance(own, Marker) and own.pending:
                # An earlier attempt may have written the data already, so the store may show our own
                # write: the before-image recorded ahead of it is the only true one.
                step.before, step.before_known = own.before_image, True
        elif decision is Plan.APPLY_COMPENSATION:
            if command["compensation"] is not None:
                step.writes = self._writes_of(command["compensation"], sizes)
            elif isinstance(execute, Marker):
                step.writes = restore_writes(command["operation"]["target"], execute.before_image)
            else:  # the EXECUTE is earlier in this batch; its before-image exists once its generation ran
                step.source = execute
                step.keys = list(execute.keys) if execute is not None else []
        elif decision is Plan.ALREADY_APPLIED:
            step.source = own
        if step.writes is not None:
            step.keys = step.writes.lock_keys()
        # A step's EXECUTE and COMPENSATE must land in separate generations, in batch order.
        step.keys.append(f"step:{tx}/{index}")
        step.decision = decision
        if decision in _WRITES_MARKER:
            view[step.marker] = step

    def _writes_of(self, op: Operation, sizes: Mapping[str, int]) -> _Writes:
        """Validate an operation against the store's collections and turn it into point writes."""
        if op["store"] != "qdrant":
            raise InvalidOperationError(f"a {op['store']} operation reached the qdrant participant")
        validate_operation(op, self.settings.max_payload_bytes)
        target = op["target"]
        if target == MARKERS:
            raise InvalidOperationError(f"collection {MARKERS} is reserved for polycommit's markers")
        size = sizes.get(target)
        if size is None:
            raise InvalidOperationError(f"collection {target} does not exist")
        writes = _Writes()
        if op["kind"] == "upsert_points":
            for p in op["points"]:
                if len(p["vector"]) != size:
                    raise InvalidOperationError(f"wrong vector size: expected {size}, got {len(p['vector'])}")
                point: PointData = {"vector": p["vector"], "payload": json.loads(p["payload"])}
                writes.upsert(target, canonical_id(p["id"]), point)
        else:  # delete_points: validate_operation admits no other qdrant kind
            for point_id in op["point_ids"]:
                writes.delete(target, canonical_id(point_id))
        return writes

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
        data = [s for s in steps if s.decision in _WRITES_DATA]
        if data:
            await self._write_markers(data, pending=True)
            if self.fsync:
                # The pending markers (with the before-images) must be on disk before the data they
                # guard: markers and points are separate shards with separate WALs.
                await self.backend.flush()
            await self._write_data(data)
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
                    step.writes = restore_writes(step.command["operation"]["target"], step.source.before)
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
            before = step.before if step.command["action"] == "EXECUTE" else None
            payload = {"id": step.marker, "before": before, "pending": pending}
            points[step.marker_point] = {"vector": _MARKER_VECTOR, "payload": payload}
        await self.backend.upsert(MARKERS, points)

    async def _confirm_markers(self, steps: list[_Step]) -> None:
        """Turn pending markers, written by this generation, into done ones."""
        # One payload update for all of them: cheaper than rewriting whole points (the payload
        # conversion dominates an Edge upsert), and it keeps the recorded before-images as they are.
        await self.backend.set_payload(MARKERS, [s.marker_point for s in steps], {"pending": False})

    async def _write_data(self, steps: list[_Step]) -> None:
        merged = _Writes()
        for step in steps:
            assert step.writes is not None
            merged.merge(step.writes)
        for collection, points in merged.upserts.items():
            await self.backend.upsert(collection, points)
        for collection, ids in merged.deletes.items():
            await self.backend.delete(collection, ids)

    # -- outcomes -----------------------------------------------------------------------------------

    def _outcome(self, step: _Step) -> StepOutcome:
        command = step.command
        source = step.source
        if isinstance(source, _Step) and source.error is not None and step.decision is Plan.ALREADY_APPLIED:
            return failed(command, self.store, source.error, step.started_ns)  # its twin in this batch failed
        if step.error is not None or step.decision is None:
            return failed(command, self.store, step.error or RuntimeError("not planned"), step.started_ns)
        before: str | None = None
        if command["action"] == "EXECUTE":
            if step.decision is Plan.APPLY_EXECUTE:
                before = step.before
            elif isinstance(source, _Step):
                before = source.before
            elif isinstance(source, Marker):
                before = source.before_image
        return outcome(command, self.store, status_for(step.decision), before_image=before, started_ns=step.started_ns)
