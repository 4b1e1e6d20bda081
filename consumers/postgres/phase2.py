"""PostgreSQL's phase 2 for batched prepared transactions, and their settlement when a participant starts.

A COMMIT / ABORT is recorded against its member's batch (`consumers.postgres.batches`); when the batch's
decisions call for it, one COMMIT PREPARED acknowledges all its members, or one ROLLBACK PREPARED drops
it and its members are judged alone. A member with no prepared batch (its batch was rolled back, settled
by another process, or it was committed by an earlier run) is judged by its markers: a COMMIT is redone
from the write-set the command carries through the saga's exactly-once EXECUTE path (ALREADY_APPLIED
when its marker is there; safe because the coordinator holds the step's locks until phase 2 is
acknowledged; a redo that fails is retried by the coordinator and reported as a hazard), an ABORT
writes its fence (so a late PREPARE votes no), and an ABORT of a step committed here is a hazard.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from consumers import timing
from consumers.base import failed, outcome
from consumers.command import TypedCommand
from consumers.postgres import sql as q
from consumers.postgres import twophase as tp
from consumers.postgres.batches import Settlement, member_of
from consumers.twophase import as_saga, from_saga
from polycommit.errors import StoreError
from polycommit.events import OutcomeStatus, StepOutcome
from polycommit.failpoints import failpoint

log = logging.getLogger(__name__)

MARKERS_OF_STEPS = f"""
SELECT m.tx_id, m.step_index, m.action FROM {q.MARKER_TABLE} m
JOIN unnest($1::text[], $2::int[]) AS k(tx_id, step_index) USING (tx_id, step_index)"""

Done = list[tuple[TypedCommand, StepOutcome]]


async def finish(host: tp.Host, commands: Sequence[TypedCommand]) -> tuple[list[StepOutcome | None], list[StepOutcome]]:
    """Phase 2 of COMMIT / ABORT commands: their outcomes by position (None: held until its batch
    settles), and the outcomes of commands held by earlier calls that their batches settle now."""
    begun = timing.started()
    async with host.pool.acquire() as conn:
        await tp.find_batches(host, conn, [member_of(c) for c in commands])
    alone: list[TypedCommand] = []
    touched: list[str] = []
    for command in commands:
        if host.batches.gid_of(member_of(command)) is None:
            alone.append(command)
        elif (gid := host.batches.decide(command)) not in touched:
            touched.append(gid)
    done: Done = []
    for gid in touched:
        settlement = host.batches.settlement(gid)
        if settlement is None:
            continue  # it waits for the decisions of its other members
        host.batches.drop(gid)
        if await _settle_batch(host, settlement):
            done.extend((c, outcome(c.source, "postgres", "APPLIED", timing.since(begun))) for c in settlement.commands)
        else:
            alone.extend(settlement.commands)
    done.extend(await without_batch(host, alone, begun))
    here = {id(c): i for i, c in enumerate(commands)}
    results: list[StepOutcome | None] = [None] * len(commands)
    released: list[StepOutcome] = []
    for command, result in done:
        if id(command) in here:
            results[here[id(command)]] = result
        else:
            released.append(result)
    return results, released


async def _settle_batch(host: tp.Host, settlement: Settlement) -> bool:
    """COMMIT / ROLLBACK PREPARED the batch; True when its members are committed by it. A gid already
    gone (settled by someone else) leaves its members to be judged alone, by their markers."""
    async with host.pool.acquire() as conn:
        try:
            await conn.execute(f"{settlement.verb} PREPARED '{settlement.gid}'")
        except asyncpg.PostgresError as exc:
            if tp.sqlstate(exc) != tp.UNDEFINED_OBJECT:
                raise
            host.slots.used = max(0, host.slots.used - 1)  # ours, settled elsewhere: its slot is free too
            return False
        host.slots.used = max(0, host.slots.used - 1)
        if settlement.verb == "ROLLBACK":
            failpoint("postgres.after_batch_rollback")  # the members decided COMMIT are not redone yet
            await conn.execute(tp.FORGET_MEMBERS, [settlement.gid])
            return False
    failpoint("postgres.phase2")
    return True


async def without_batch(host: tp.Host, commands: Sequence[TypedCommand], begun: int) -> Done:
    """Members with no prepared batch, judged by their markers: COMMIT redone, ABORT fenced."""
    commits = [c for c in commands if c.action == "COMMIT"]
    aborts = [c for c in commands if c.action == "ABORT"]
    done: Done = []
    if commits:  # one local transaction for all of them (the saga path: one by one only if it fails)
        redone = await host.apply_commands([as_saga(c) for c in commits])
        done.extend((c, from_saga(c, o)) for c, o in zip(commits, redone, strict=True))
    if aborts:
        done.extend(await _fence(host, aborts, begun))
    if done:
        failpoint("postgres.phase2")
    return done


async def _fence(host: tp.Host, aborts: list[TypedCommand], begun: int) -> Done:
    async with host.pool.acquire() as conn:
        rows = await conn.fetch(MARKERS_OF_STEPS, [c.tx_id for c in aborts], [c.step_index for c in aborts])
        markers: dict[tuple[str, int], set[str]] = {}
        for tx_id, step, action in rows:
            markers.setdefault((tx_id, step), set()).add(action)
        done: Done = []
        fence: list[TypedCommand] = []
        for c in aborts:
            found = markers.get(member_of(c), set())
            if "EXECUTE" in found and "COMPENSATE" not in found:
                hazard = StoreError("AbortAfterCommit: the step is committed here", retriable=False, store="postgres")
                done.append((c, failed(c.source, "postgres", hazard, timing.since(begun))))
                continue
            status: OutcomeStatus = "ALREADY_APPLIED" if "COMPENSATE" in found else "NOOP"
            done.append((c, outcome(c.source, "postgres", status, timing.since(begun))))
            fence.append(c)
        if fence:  # a late PREPARE of these steps now votes no
            await conn.execute(tp.FENCE, [c.tx_id for c in fence], [c.step_index for c in fence])
    return done


async def settle(
    pool: asyncpg.Pool, space: str, decisions: dict[str, str], presume_abort_after_ms: int
) -> list[dict[str, str]]:
    """Settle our prepared gids at start: a batch by its members' decisions (all COMMIT -> COMMIT
    PREPARED; any ABORT -> ROLLBACK PREPARED, its members decided COMMIT are redone when the coordinator
    sends their COMMIT again), a one-step gid of earlier versions by its transaction's decision; one with
    a member undecided is rolled back (presumed abort) once older than the window, else left to the
    coordinator. `decisions` maps tx_id -> COMMIT / ABORT. Returns what was done, per gid."""
    done: list[dict[str, str]] = []
    async with pool.acquire() as conn:
        prepared = await conn.fetch(tp.PREPARED_GIDS, f"{tp.GID_PREFIX}{space}_")
        members: dict[str, list[str]] = {}
        for gid, tx_id, _step in await conn.fetch(tp.MEMBERS_OF, [r[0] for r in prepared]):
            members.setdefault(gid, []).append(tx_id)
        one_step = {tp.gid_prefix(space, tx): outcome_ for tx, outcome_ in decisions.items()}
        for gid, age_ms in prepared:
            txs = sorted(set(members.get(gid, ())))
            verdicts = [decisions.get(tx) for tx in txs] if txs else [one_step.get(tp.prefix_of_gid(gid))]
            if all(v == "COMMIT" for v in verdicts):
                verb, why = "COMMIT", "COMMIT"
            elif "ABORT" in verdicts:
                verb, why = "ROLLBACK", "ABORT"
            elif (age_ms or 0) < presume_abort_after_ms:
                continue  # still within its prepare window: the coordinator will decide
            else:
                verb, why = "ROLLBACK", "presumed abort"
            try:
                await conn.execute(f"{verb} PREPARED '{gid}'")
            except asyncpg.PostgresError as exc:
                if tp.sqlstate(exc) != tp.UNDEFINED_OBJECT:  # settled meanwhile by someone else
                    raise
            if verb == "ROLLBACK" and txs:
                await conn.execute(tp.FORGET_MEMBERS, [gid])
            entry = {"gid": gid, "action": verb, "why": why}
            if txs:
                entry["transactions"] = ",".join(txs)
            done.append(entry)
            log.info("settled prepared %s: %s (%s) %s", gid, verb, why, entry.get("transactions", ""))
    return done
