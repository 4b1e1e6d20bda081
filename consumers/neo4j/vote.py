"""Neo4j's vote in two-phase commit (DESIGN.md's shape (b)): validate under the coordinator's locks.

Neo4j cannot keep a prepared transaction across a crash, so a PREPARE changes nothing: the typed
operation already parsed (the worker did it: labels and keys are plain identifiers), the uniqueness
constraint its MERGE needs is in place, a raw Cypher statement compiles (`EXPLAIN` in a read
transaction), and the step was not fenced by an earlier ABORT. The write-set is applied at COMMIT, as a
saga EXECUTE with its marker (batched: UNWIND), so it happens exactly once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from neo4j import AsyncDriver
from neo4j.exceptions import DriverError, Neo4jError

from consumers import timing
from consumers.base import Marker, outcome
from consumers.command import TypedCommand
from consumers.neo4j.cypher import READ_VERSIONS
from consumers.neo4j.effects import Effects, effects_of, nodes_of, version_conflicts
from polycommit.errors import PolycommitError, StoreUnavailableError, describe
from polycommit.events import StepOutcome, error_info
from polycommit.failpoints import failpoint

ReadMarkers = Callable[[Any, Sequence[TypedCommand]], Awaitable[dict[str, Marker]]]
EnsureKeys = Callable[[Mapping[int, Effects]], Awaitable[dict[Any, BaseException]]]


async def vote(
    driver: AsyncDriver,
    commands: Sequence[TypedCommand],
    read_markers: ReadMarkers,
    ensure_keys: EnsureKeys,
    classify: Callable[[BaseException], BaseException],
) -> list[StepOutcome]:
    begun = timing.started()
    problems: dict[int, BaseException] = {}
    effects: dict[int, Effects] = {}
    for i, command in enumerate(commands):
        try:
            effects[i] = effects_of(command)
        except PolycommitError as exc:
            problems[i] = exc
    broken = await ensure_keys(effects)
    for i, e in effects.items():
        shape = next((n.shape for t in e.targets() for n in nodes_of(t) if n.shape in broken), None)
        if shape is not None:
            problems[i] = broken[shape]
    # The common vote (structured writes, no expected version) only reads the markers: one auto-commit
    # query, one round trip, instead of BEGIN, the read and the read transaction's rollback.
    checks = any(e.raw or e.effect.expected_version is not None for i, e in effects.items() if i not in problems)
    try:
        async with driver.session(default_access_mode="READ") as session:
            if not checks:
                markers = await read_markers(session, commands)
            else:
                markers = await _checked_vote(session, commands, effects, problems, read_markers)
    except (Neo4jError, DriverError) as exc:
        problem = classify(exc)
        raise problem if isinstance(problem, StoreUnavailableError) else StoreUnavailableError(str(problem)) from exc
    failpoint("neo4j.after_validate")
    done = timing.since(begun)
    results: list[StepOutcome] = []
    for i, command in enumerate(commands):
        if command.compensate_id in markers:
            problems.setdefault(i, PolycommitError("the step was aborted here before"))
        if i in problems:
            cls, message, retriable = describe(problems[i])
            why = error_info(cls, message, retriable)
            results.append(outcome(command.source, "neo4j", "VOTED_NO", done, error=why))
        else:
            results.append(outcome(command.source, "neo4j", "PREPARED", done))
    return results


async def _checked_vote(
    session: Any,
    commands: Sequence[TypedCommand],
    effects: Mapping[int, Effects],
    problems: dict[int, BaseException],
    read_markers: ReadMarkers,
) -> dict[str, Marker]:
    """The markers, read in one read transaction with the raw statements' EXPLAIN and the version checks;
    adds what they find wrong to `problems`."""
    tx = await session.begin_transaction()
    try:
        markers = await read_markers(tx, commands)
        for i, e in effects.items():
            if i not in problems and e.raw:
                problems.update(await _explain(tx, i, e))
        # A PREPARE whose step is applied here already (a redelivery after its COMMIT) stands: its own
        # write moved the version on.
        fresh = {i: e for i, e in effects.items() if i not in problems and commands[i].execute_id not in markers}
        problems.update(await _version_conflicts(tx, fresh))
        return markers
    finally:
        await tx.close()


async def _version_conflicts(tx: Any, effects: Mapping[int, Effects]) -> dict[int, BaseException]:
    """The PREPAREs whose expected version is not their key's. Read without a lock: safe because the
    coordinator holds an exclusive lock on every key of the transaction from before PREPARE until phase
    2 is done, so no other transaction can change a version between this vote and the COMMIT's write."""
    checked = {i: e.effect for i, e in effects.items() if e.effect.expected_version is not None}
    keys = sorted({r for e in checked.values() if (r := e.resource) is not None})
    if not keys:
        return {}
    record = await (await tx.run(READ_VERSIONS, keys=keys)).single(strict=True)
    versions = {k: int(v) for k, v in record["versions"]}
    order = list(checked)
    return {order[j]: c for j, c in version_conflicts(list(checked.values()), versions).items()}


async def _explain(tx: Any, index: int, e: Effects) -> dict[int, BaseException]:
    """A raw statement must compile; EXPLAIN plans it without running it."""
    try:
        await (await tx.run("EXPLAIN " + e.effect.statement, e.effect.params)).consume()
    except Neo4jError as exc:
        return {index: exc}
    return {}
