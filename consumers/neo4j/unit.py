"""One Neo4j write transaction's work for the participant: a planned batch applied group by group.

Each group's structured effects share one UNWIND query per (kind, shape), which also returns the
before-images it saw; raw Cypher runs alone; every marker is written at the end, in the same transaction.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from neo4j import AsyncTransaction

from consumers.base import Marker, Plan, Timing, failed, is_reference, outcome, status_for
from consumers.command import TypedCommand
from consumers.neo4j.cypher import (
    BUMP_VERSIONS_WRITE_MARKERS,
    LOCK_VERSIONS,
    Seen,
    effect_query,
    refusal,
    row_of,
)
from consumers.neo4j.effects import (
    STORE,
    Effect,
    EffectKind,
    Effects,
    NodeShape,
    RelShape,
    before_image_of,
    reads,
    restoring,
    version_conflicts,
    writes,
)
from consumers.planner import Planned, batch_groups, plan_batch
from polycommit.errors import InvalidOperationError, PolycommitError
from polycommit.events import StepOutcome


@dataclass
class Unit:
    """One transaction's work: the plan, each command's effects, and what applying them produced."""

    tx: AsyncTransaction
    planned: list[Planned]
    effects: dict[int, Effects]
    # The versions of the keys this transaction locked (key -> version, its own writes counted) and the
    # writes each key's version is still to be raised by, in `finish`.
    versions: dict[str, int] = field(default_factory=dict)
    bumps: Counter[str] = field(default_factory=Counter)
    new_markers: list[dict[str, Any]] = field(default_factory=list)
    results: dict[int, tuple[Literal["APPLIED", "NOOP"], str | None]] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)

    def record(self, p: Planned, status: Literal["APPLIED", "NOOP"], before: str | None) -> None:
        self.new_markers.append({"id": p.command.own_id, "before": before})
        self.results[p.position] = (status, before)

    def outcomes(self, done: Timing) -> dict[int, StepOutcome]:
        return {p.position: self._outcome(p, done) for p in self.planned}

    def _outcome(self, p: Planned, done: Timing) -> StepOutcome:
        command = p.command.source
        error = self.errors.get(p.position)
        if error is None and p.decision is Plan.ALREADY_APPLIED and p.earlier is not None:
            error = self.errors.get(p.earlier)  # its twin in this batch failed
        if error is not None:
            return failed(command, STORE, error, done)
        if p.position in self.results:
            status, before = self.results[p.position]
            return outcome(command, STORE, status, done, before_image=before)
        before = None
        if p.decision is Plan.ALREADY_APPLIED:
            before = p.own.before_image if p.own is not None else self.results.get(p.earlier or 0, ("NOOP", None))[1]
        return outcome(command, STORE, status_for(p.decision), done, before_image=before)

    async def apply_group(self, group: Sequence[Planned]) -> None:
        work: list[tuple[Planned, Effect]] = []
        for p in group:
            effect = self._planned(p)
            if effect is not None:
                work.append((p, effect))
        work = await self._checked(work)
        await self.absorb(work, await self._apply_structured([e for _, e in work]))

    async def absorb(self, work: Sequence[tuple[Planned, Effect]], seen: Sequence[Seen]) -> None:
        """Record what a group's effect queries saw (refusals, outcomes, the versions to raise); run its raw
        statements, which have no query of their own to see through."""
        written: list[str] = []
        for (p, effect), s in zip(work, seen, strict=True):
            reason = refusal(effect, s)
            if reason is not None:
                self.errors[p.position] = reason
                continue
            if effect.kind == "cypher":
                result = await self.tx.run(effect.statement, effect.params)
                await result.consume()
            before = before_image_of(effect.target, s.properties) if effect.target is not None else None
            self.record(p, "APPLIED", before)
            if effect.resource is not None:
                written.append(effect.resource)
        for key in written:  # every structured write raises its key's version, compensations included
            self.versions[key] += 1
            self.bumps[key] += 1

    async def _checked(self, work: list[tuple[Planned, Effect]]) -> list[tuple[Planned, Effect]]:
        """Lock the versions of the group's keys (held to the end of the transaction, so check and bump
        are atomic); fail and drop the effects whose expected version is not their key's."""
        keys = sorted({e.resource for _, e in work if e.resource is not None} - set(self.versions))
        if keys:  # not locked with the markers (every key normally is: see `keys_to_lock`)
            record = await (await self.tx.run(LOCK_VERSIONS, keys=keys)).single(strict=True)
            self.versions.update({k: int(v) for k, v in record["versions"]})
        conflicts = version_conflicts([e for _, e in work], self.versions)
        for i, problem in conflicts.items():
            self.errors[work[i][0].position] = problem
        return [w for i, w in enumerate(work) if i not in conflicts]

    def _planned(self, p: Planned) -> Effect | None:
        """The effect a command still has to apply, if any (NOOP compensations are recorded here)."""
        if p.decision is Plan.APPLY_EXECUTE:
            return self.effects[p.position].effect
        if p.decision is Plan.APPLY_COMPENSATION:
            if p.earlier is not None and p.earlier in self.errors:
                self.record(p, "NOOP", None)  # its EXECUTE in this batch failed: there is nothing to undo
                return None
            try:
                return self._compensation(p)
            except PolycommitError as exc:
                self.errors[p.position] = exc
                return None
        if p.decision is Plan.RECORD_NOOP_COMPENSATION:
            self.record(p, "NOOP", None)  # so that a late EXECUTE of this step is skipped
        return None

    def _compensation(self, p: Planned) -> Effect:
        effects = self.effects[p.position]
        if effects.compensation is not None:
            return effects.compensation
        if effects.effect.kind == "cypher":
            return Effect("noop")  # a raw step without a declared compensation: recorded, nothing to undo
        assert effects.effect.target is not None
        # The EXECUTE marker's image was written atomically with the effect: it wins over the command's.
        sent = p.command.source["before_image"]
        image = self._execute_image(p) or (None if is_reference(sent) else sent)
        if not image:
            raise InvalidOperationError(f"step {p.command.own_id} has no before-image to compensate from")
        return restoring(effects.effect.target, image)

    def _execute_image(self, p: Planned) -> str | None:
        if p.execute is not None:
            return p.execute.before_image
        if p.earlier is not None:
            return self.results.get(p.earlier, ("NOOP", None))[1]
        return None

    async def _apply_structured(self, effects: Sequence[Effect]) -> list[Seen]:
        """Apply the group's structured effects, one UNWIND query per (kind, shape); return what each saw."""
        by_shape: dict[tuple[EffectKind, NodeShape | RelShape], list[int]] = defaultdict(list)
        for i, effect in enumerate(effects):
            if effect.target is not None:
                by_shape[(effect.kind, effect.target.shape)].append(i)
        seen = [Seen(None) for _ in effects]
        for indexes in by_shape.values():
            rows = [{"i": i, **row_of(effects[i])} for i in indexes]
            result = await self.tx.run(effect_query(effects[indexes[0]]), rows=rows)
            record = await result.single(strict=True)
            read_seen(record["seen"], seen)
        return seen

    async def finish(self) -> None:
        """Raise the written keys' versions and write the new markers, in one query."""
        if self.new_markers or self.bumps:
            bumps = [{"key": k, "by": n} for k, n in sorted(self.bumps.items())]
            result = await self.tx.run(BUMP_VERSIONS_WRITE_MARKERS, bumps=bumps, rows=self.new_markers)
            await result.consume()


def planned_groups(
    commands: Sequence[TypedCommand], effects: Mapping[int, Effects], markers: Mapping[str, Marker]
) -> tuple[list[Planned], list[list[Planned]]]:
    """What each command of a batch may do given its markers, and the ones that write in groups whose keys
    are disjoint, in order (consumers/planner.py, with the graph's keys: a relationship reads its ends)."""
    planned = plan_batch(commands, markers)
    groups = batch_groups(
        planned,
        lambda p: writes(p.command, effects[p.position]),
        reads=lambda p: reads(effects[p.position]),
        alone=lambda p: effects[p.position].raw,
    )
    return planned, groups


def read_seen(answer: Sequence[Sequence[Any]], into: list[Seen]) -> None:
    """An effect query's `seen` answer ([i, before, context...] rows) into `into`, by row index."""
    for i, props, *context in answer:
        into[i] = Seen(props, *context)


def keys_to_lock(effects: Iterable[Effects]) -> list[str]:
    """Every key whose version the effects may check or raise, sorted (batches lock them in one order)."""
    keys = {e.resource for effect in effects for e in (effect.effect, effect.compensation) if e is not None}
    return sorted(k for k in keys if k is not None)
