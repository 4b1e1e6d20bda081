"""PostgreSQL's real prepare: PREPARE TRANSACTION per step, COMMIT/ROLLBACK PREPARED, settlement at start.

PREPARE runs the step exactly as the saga's EXECUTE path does (effect + EXECUTE marker with its
before-image) in a connection of its own, then `PREPARE TRANSACTION 'pc_<tx>_<step>'`: the vote is
durable in PostgreSQL before it is published. Prepares of different transactions run concurrently on
the pool. COMMIT / ABORT are idempotent: a gid that is gone is judged by the markers. An ABORT also
writes the step's COMPENSATE marker, the fence that makes a late PREPARE vote no. At start the
participant settles the prepared gids of ours (prefix `pc_`) from the decisions topic; one with no
decision older than the prepare window (plus a margin) is rolled back: presumed abort.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from consumers import timing
from consumers.base import failed, outcome
from consumers.command import TypedCommand
from consumers.postgres import sql as q
from polycommit.errors import StoreError
from polycommit.events import StepOutcome, error_info
from polycommit.failpoints import failpoint

log = logging.getLogger(__name__)

GID_PREFIX = "pc_"
_MAX_GID = 200  # PostgreSQL's limit, in bytes
_SAFE = re.compile(r"^[A-Za-z0-9._:-]{1,120}$")
_UNDEFINED_OBJECT = "42704"  # the gid is not (or no longer) prepared
FENCE = f"""
INSERT INTO {q.MARKER_TABLE} (tx_id, step_index, action, before_image) VALUES ($1, $2, 'COMPENSATE', NULL)
ON CONFLICT DO NOTHING"""
HAS_MARKER = f"SELECT action FROM {q.MARKER_TABLE} WHERE tx_id = $1 AND step_index = $2"
PREPARED_GIDS = """
SELECT gid, (extract(epoch FROM now() - prepared) * 1000)::bigint FROM pg_prepared_xacts
WHERE database = current_database() AND starts_with(gid, $1)"""
IS_PREPARED = "SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()"


def space_of(topic_prefix: str) -> str:
    """The gids' namespace: a short hash of the topic prefix, so a participant settles only the gids of
    its own decision log (another deployment or test session sharing the database is left alone)."""
    return hashlib.blake2b(topic_prefix.encode(), digest_size=3).hexdigest()


def gid_prefix(space: str, tx_id: str) -> str:
    """`pc_<space>_<tx_id>_`: the tx id itself when short and plain, else its hash (quoting stays trivial)."""
    safe = tx_id if _SAFE.match(tx_id) else "h" + hashlib.blake2b(tx_id.encode(), digest_size=16).hexdigest()
    return f"{GID_PREFIX}{space}_{safe}_"


def gid_of(space: str, tx_id: str, step_index: int) -> str:
    gid = f"{gid_prefix(space, tx_id)}{step_index}"
    assert len(gid.encode()) <= _MAX_GID
    return gid


def prefix_of_gid(gid: str) -> str:
    return gid.rsplit("_", 1)[0] + "_"


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


@dataclass
class Slots:
    """PostgreSQL holds at most `max_prepared_transactions` prepared at once (shared by everyone using
    the server): this participant keeps its own count under a share of it, and a PREPARE over it votes
    a retriable no at once, without doing the work (the coordinator sends it again)."""

    limit: int = 150
    used: int = 0

    @property
    def full(self) -> bool:
        return self.used >= self.limit


RunExecute = Callable[[asyncpg.Connection, TypedCommand, int], Awaitable[StepOutcome]]


async def prepare(
    conn: asyncpg.Connection, command: TypedCommand, space: str, run: RunExecute, classify: Any, slots: Slots
) -> StepOutcome:
    """Vote on one PREPARE: PREPARED once `PREPARE TRANSACTION` is done (or was done before)."""
    begun = timing.started()
    source = command.source
    gid = gid_of(space, command.tx_id, command.step_index)
    if await conn.fetchval(IS_PREPARED, gid):  # a redelivered PREPARE: the vote stands
        return outcome(source, "postgres", "PREPARED", timing.since(begun))
    if slots.full:
        busy = error_info("PreparedSlotsFull", f"{slots.used} prepared transactions held here", True)
        return outcome(source, "postgres", "VOTED_NO", timing.since(begun), error=busy)
    slots.used += 1  # taken before the first await that could let another prepare in
    prepared = False
    # One round trip; a row held by another prepared transaction votes (a retriable) no, never hangs.
    await conn.execute("BEGIN; SET LOCAL lock_timeout = '5s'")
    try:
        result = await run(conn, command, begun)
        status = result["status"]
        if status in ("APPLIED",) and conn.is_in_transaction():
            await conn.execute(f"PREPARE TRANSACTION '{gid}'")
            prepared = True
            failpoint("postgres.after_prepare")
            return outcome(source, "postgres", "PREPARED", timing.since(begun))
        if status == "ALREADY_APPLIED":  # committed by an earlier run of this transaction
            return outcome(source, "postgres", "PREPARED", timing.since(begun))
        error = result["error"] or error_info("Fenced", "the step was aborted here before", False)
        if status == "SKIPPED":
            error = error_info("Fenced", "the step was aborted here before", False)
        return outcome(source, "postgres", "VOTED_NO", timing.since(begun), error=error)
    except (OSError, asyncpg.InterfaceError):
        raise  # the store is unreachable: the worker retries the batch
    except Exception as exc:  # anything else wrong with this step: it votes no, alone
        cls = classify(exc) if isinstance(exc, asyncpg.PostgresError) else exc
        error = error_info(type(cls).__name__, str(cls), bool(getattr(cls, "retriable", False)))
        return outcome(source, "postgres", "VOTED_NO", timing.since(begun), error=error)
    finally:
        if not prepared:
            slots.used -= 1
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")


async def phase2(conn: asyncpg.Connection, command: TypedCommand, space: str, slots: Slots) -> StepOutcome:
    """COMMIT PREPARED / ROLLBACK PREPARED, idempotent: a gid already gone is judged by the markers."""
    begun = timing.started()
    source, gid = command.source, gid_of(space, command.tx_id, command.step_index)
    committing = command.action == "COMMIT"
    try:
        await conn.execute(f"{'COMMIT' if committing else 'ROLLBACK'} PREPARED '{gid}'")
        slots.used = max(0, slots.used - 1)
        gone = False
    except asyncpg.PostgresError as exc:
        if _sqlstate(exc) != _UNDEFINED_OBJECT:
            raise
        gone = True
    markers = {r[0] for r in await conn.fetch(HAS_MARKER, command.tx_id, command.step_index)}
    if committing:
        failpoint("postgres.phase2")
        if not gone:
            return outcome(source, "postgres", "APPLIED", timing.since(begun))
        if "EXECUTE" in markers and "COMPENSATE" not in markers:
            return outcome(source, "postgres", "ALREADY_APPLIED", timing.since(begun))
        lost = StoreError(
            "PreparedWorkLost: neither the prepared transaction nor its marker exists",
            retriable=False,
            store="postgres",
        )
        return failed(source, "postgres", lost, timing.since(begun))
    if "EXECUTE" in markers and "COMPENSATE" not in markers:
        hazard = StoreError("AbortAfterCommit: the step is committed here", retriable=False, store="postgres")
        return failed(source, "postgres", hazard, timing.since(begun))
    await conn.execute(FENCE, command.tx_id, command.step_index)  # a late PREPARE now votes no
    failpoint("postgres.phase2")
    return outcome(source, "postgres", "ALREADY_APPLIED" if "COMPENSATE" in markers else "NOOP", timing.since(begun))


async def on_pool(pool: asyncpg.Pool, commands: Sequence[TypedCommand], work: Any) -> list[StepOutcome]:
    """Run `work(conn, command)` for each command concurrently, one pooled connection each."""

    async def one(command: TypedCommand) -> StepOutcome:
        async with pool.acquire() as conn:
            result: StepOutcome = await work(conn, command)
            return result

    return list(await asyncio.gather(*(one(c) for c in commands)))


async def settle(
    pool: asyncpg.Pool, space: str, decisions: dict[str, str], presume_abort_after_ms: int
) -> list[dict[str, str]]:
    """Settle our prepared gids: by their decision, or rolled back (presumed abort) once old enough.
    `decisions` maps `gid_prefix(space, tx_id)` to COMMIT / ABORT. Returns what was done, per gid."""
    done: list[dict[str, str]] = []
    async with pool.acquire() as conn:
        for gid, age_ms in await conn.fetch(PREPARED_GIDS, f"{GID_PREFIX}{space}_"):
            decided = decisions.get(prefix_of_gid(gid))
            if decided is None and (age_ms or 0) < presume_abort_after_ms:
                continue  # still within its prepare window: the coordinator will decide
            verb = "COMMIT" if decided == "COMMIT" else "ROLLBACK"
            try:
                await conn.execute(f"{verb} PREPARED '{gid}'")
            except asyncpg.PostgresError as exc:
                if _sqlstate(exc) != _UNDEFINED_OBJECT:  # settled meanwhile by someone else
                    raise
            done.append({"gid": gid, "action": verb, "why": decided or "presumed abort"})
            log.info("settled prepared %s: %s (%s)", gid, verb, decided or "presumed abort")
    return done
