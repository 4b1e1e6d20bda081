"""PostgreSQL's real prepare, batched: one PREPARE TRANSACTION for many global transactions' steps.

A batch of PREPARE commands runs as the saga's EXECUTE path does (effects + EXECUTE markers with their
before-images, set-based) in one local transaction, then `PREPARE TRANSACTION 'pc_<space>_b<hex>'`: the
votes are durable in PostgreSQL before they are published. If a statement of the batch fails, the batch
is run again with each step under its own SAVEPOINT, so a bad step votes no alone and the rest still
prepare. A raw SQL step is prepared in a batch of its own (a raw COMMIT could otherwise end the others'
transaction). Before PREPARE TRANSACTION the batch's members are written, committed, to a membership
table from another connection: whoever meets a member later (a redelivered PREPARE, its phase 2 after a
restart, the settlement at start) finds its batch, and a membership whose gid was never prepared is
ignored. Phase 2 and settlement are in `consumers.postgres.phase2`; the bookkeeping of batches in
`consumers.postgres.batches`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from consumers import timing
from consumers.base import outcome
from consumers.command import TypedCommand
from consumers.postgres import effects
from consumers.postgres import sql as q
from consumers.postgres.batches import BatchRegistry, Member, member_of
from consumers.postgres.failures import UNREACHABLE as UNREACHABLE
from consumers.postgres.failures import sqlstate as sqlstate
from polycommit.events import ErrorInfo, StepOutcome, error_info
from polycommit.failpoints import failpoint
from polycommit.parsed import RawOperation

log = logging.getLogger(__name__)

GID_PREFIX = "pc_"
_MAX_GID = 200  # PostgreSQL's limit, in bytes
_SAFE = re.compile(r"^[A-Za-z0-9._:-]{1,120}$")
UNDEFINED_OBJECT = "42704"  # the gid is not (or no longer) prepared
MEMBERS_TABLE = "polycommit_prepared_members"
CREATE_MEMBERS = f"""
CREATE TABLE IF NOT EXISTS {MEMBERS_TABLE} (
    gid        text    NOT NULL,
    tx_id      text    NOT NULL,
    step_index integer NOT NULL,
    PRIMARY KEY (gid, tx_id, step_index)
)"""
# Created only when missing: CREATE INDEX waits for the prepared batches' locks on the table even when
# the index exists, and a participant starting while batches are prepared must not hang on them.
MEMBERS_INDEX = f"{MEMBERS_TABLE}_member"
CREATE_MEMBERS_INDEX = f"CREATE INDEX IF NOT EXISTS {MEMBERS_INDEX} ON {MEMBERS_TABLE} (tx_id, step_index)"
WRITE_MEMBERS = f"""
INSERT INTO {MEMBERS_TABLE} (gid, tx_id, step_index)
SELECT $1, * FROM unnest($2::text[], $3::int[]) ON CONFLICT DO NOTHING"""
# The prepared batch (if any) of each member asked about.
PREPARED_BATCH_OF = f"""
SELECT m.tx_id, m.step_index, m.gid FROM {MEMBERS_TABLE} m
JOIN unnest($1::text[], $2::int[]) AS k(tx_id, step_index) USING (tx_id, step_index)
JOIN pg_prepared_xacts p ON p.gid = m.gid AND p.database = current_database()"""
MEMBERS_OF = f"SELECT gid, tx_id, step_index FROM {MEMBERS_TABLE} WHERE gid = ANY($1::text[])"
FORGET_MEMBERS = f"DELETE FROM {MEMBERS_TABLE} WHERE gid = ANY($1::text[])"
FENCE = f"""
INSERT INTO {q.MARKER_TABLE} (tx_id, step_index, action, before_image)
SELECT t, s, 'COMPENSATE', NULL FROM unnest($1::text[], $2::int[]) AS k(t, s)
ON CONFLICT DO NOTHING"""
PREPARED_GIDS = """
SELECT gid, (extract(epoch FROM now() - prepared) * 1000)::bigint FROM pg_prepared_xacts
WHERE database = current_database() AND starts_with(gid, $1)"""


def space_of(topic_prefix: str) -> str:
    """The gids' namespace: a short hash of the topic prefix, so a participant settles only the gids of
    its own decision log (another deployment or test session sharing the database is left alone)."""
    return hashlib.blake2b(topic_prefix.encode(), digest_size=3).hexdigest()


def gid_prefix(space: str, tx_id: str) -> str:
    """`pc_<space>_<tx_id>_`: the one-step gids of earlier versions (still settled at start)."""
    safe = tx_id if _SAFE.match(tx_id) else "h" + hashlib.blake2b(tx_id.encode(), digest_size=16).hexdigest()
    return f"{GID_PREFIX}{space}_{safe}_"


def gid_of(space: str, tx_id: str, step_index: int) -> str:
    gid = f"{gid_prefix(space, tx_id)}{step_index}"
    assert len(gid.encode()) <= _MAX_GID
    return gid


def prefix_of_gid(gid: str) -> str:
    return gid.rsplit("_", 1)[0] + "_"


def batch_gid(space: str) -> str:
    """A new batch's gid: `pc_<space>_b<hex>` (the `b` tells it from the one-step gids)."""
    return f"{GID_PREFIX}{space}_b{uuid.uuid4().hex[:20]}"


@dataclass
class Slots:
    """PostgreSQL holds at most `max_prepared_transactions` prepared at once (shared by everyone using
    the server): this participant keeps its own count of batches under a share of it, and a batch over
    it votes a retriable no at once, without doing the work (the coordinator sends it again)."""

    limit: int = 150
    used: int = 0

    @property
    def full(self) -> bool:
        return self.used >= self.limit


class Host(Protocol):
    """What the batched 2PC paths need of the PostgreSQL participant."""

    gid_space: str
    slots: Slots
    batches: BatchRegistry

    @property
    def pool(self) -> asyncpg.Pool: ...

    async def apply_commands(self, commands: Sequence[TypedCommand]) -> list[StepOutcome]: ...

    async def execute_in(
        self, conn: asyncpg.Connection, commands: Sequence[TypedCommand], begun: int
    ) -> list[StepOutcome]: ...

    def classify(self, exc: Exception) -> Any: ...


async def find_batches(host: Host, conn: asyncpg.Connection, members: Sequence[Member]) -> None:
    """Adopt into the registry the prepared batches of `members` it does not know (after a restart,
    or prepared by another member of the consumer group), with all their members."""
    unknown = [m for m in members if host.batches.gid_of(m) is None]
    if not unknown:
        return
    found = await conn.fetch(PREPARED_BATCH_OF, [m[0] for m in unknown], [m[1] for m in unknown])
    gids = sorted({r[2] for r in found} - {g for g in map(host.batches.gid_of, unknown) if g})
    if not gids:
        return
    by_gid: dict[str, list[Member]] = {}
    for gid, tx_id, step in await conn.fetch(MEMBERS_OF, gids):
        by_gid.setdefault(gid, []).append((tx_id, step))
    for gid, batch in by_gid.items():
        host.batches.add(gid, batch)


def _vote(command: TypedCommand, result: StepOutcome, prepared: bool, begun: int) -> StepOutcome:
    """A step's vote from its EXECUTE-path outcome in the batch's transaction."""
    source = command.source
    status = result["status"]
    if (status == "APPLIED" and prepared) or status == "ALREADY_APPLIED":  # ALREADY: committed by an earlier run
        return outcome(source, "postgres", "PREPARED", timing.since(begun))
    error: ErrorInfo | None = result["error"]
    if status == "SKIPPED" or error is None:
        error = error_info("Fenced", "the step was aborted here before", False)
    return outcome(source, "postgres", "VOTED_NO", timing.since(begun), error=error)


async def prepare(host: Host, commands: Sequence[TypedCommand]) -> list[StepOutcome]:
    """Vote on a batch of PREPAREs: PREPARED once their batch's PREPARE TRANSACTION is done (or was done
    before: a redelivered PREPARE whose batch is still prepared votes yes again)."""
    begun = timing.started()
    async with host.pool.acquire() as conn:
        await find_batches(host, conn, [member_of(c) for c in commands])
    votes: dict[int, StepOutcome] = {}
    fresh: list[int] = []
    for i, c in enumerate(commands):
        if host.batches.gid_of(member_of(c)) is not None:
            votes[i] = outcome(c.source, "postgres", "PREPARED", timing.since(begun))
        else:
            fresh.append(i)
    raw = [i for i in fresh if isinstance(commands[i].operation, RawOperation)]
    groups = [[i for i in fresh if i not in raw], *([i] for i in raw)]
    for group in (g for g in groups if g):
        batch = [commands[i] for i in group]
        votes.update(zip(group, await _prepare_batch(host, batch, begun), strict=True))
    return [votes[i] for i in range(len(commands))]


async def _prepare_batch(host: Host, commands: list[TypedCommand], begun: int) -> list[StepOutcome]:
    if host.slots.full:
        busy = error_info("PreparedSlotsFull", f"{host.slots.used} prepared batches held here", True)
        return [outcome(c.source, "postgres", "VOTED_NO", timing.since(begun), error=busy) for c in commands]
    host.slots.used += 1  # taken before the first await that could let another batch in
    prepared = False
    gid = batch_gid(host.gid_space)
    async with host.pool.acquire() as conn:
        # One round trip; a row held by another prepared transaction votes (a retriable) no, never hangs.
        level = effects.begin_statement(effects.batch_isolation(c.source["isolation"] for c in commands))
        await conn.execute(f"{level}; SET LOCAL lock_timeout = '5s'")
        try:
            results = await _run_members(host, conn, commands, begun)
            members = [member_of(c) for c, r in zip(commands, results, strict=True) if r["status"] == "APPLIED"]
            if members and conn.is_in_transaction():
                async with host.pool.acquire() as other:  # committed before the prepare: never a memberless gid
                    await other.execute(WRITE_MEMBERS, gid, [m[0] for m in members], [m[1] for m in members])
                # Its membership goes with it when it commits; a rolled-back batch's is deleted then.
                await conn.execute(f"DELETE FROM {MEMBERS_TABLE} WHERE gid = '{gid}'; PREPARE TRANSACTION '{gid}'")
                prepared = True
                host.batches.add(gid, members)
                failpoint("postgres.after_prepare")
            return [_vote(c, r, prepared, begun) for c, r in zip(commands, results, strict=True)]
        except UNREACHABLE:
            raise  # the worker retries the batch
        except Exception as exc:  # the batch's transaction itself failed (a raw step ended it): all vote no
            cls = host.classify(exc) if isinstance(exc, asyncpg.PostgresError) else exc
            error = error_info(type(cls).__name__, str(cls), bool(getattr(cls, "retriable", False)))
            return [outcome(c.source, "postgres", "VOTED_NO", timing.since(begun), error=error) for c in commands]
        finally:
            if not prepared:
                host.slots.used -= 1
            await _end(conn)


async def _end(conn: asyncpg.Connection) -> None:
    """Roll back what was not prepared; a connection that cannot (it broke mid-operation) is dropped."""
    try:
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
    except (*UNREACHABLE, asyncpg.PostgresError):
        conn.terminate()


async def _run_members(
    host: Host, conn: asyncpg.Connection, commands: list[TypedCommand], begun: int
) -> list[StepOutcome]:
    """All steps in one pass (set-based); if a statement fails, again with each step in its own SAVEPOINT
    so that the guilty one fails alone."""
    if len(commands) > 1:
        await conn.execute("SAVEPOINT polycommit_batch")
        try:
            results = await host.execute_in(conn, commands, begun)
            await conn.execute("RELEASE SAVEPOINT polycommit_batch")
            return results
        except asyncpg.PostgresError:
            await conn.execute("ROLLBACK TO SAVEPOINT polycommit_batch")
    results = []
    for command in commands:
        await conn.execute("SAVEPOINT polycommit_member")
        try:
            results.extend(await host.execute_in(conn, [command], begun))
            await conn.execute("RELEASE SAVEPOINT polycommit_member")
        except asyncpg.PostgresError as exc:
            await conn.execute("ROLLBACK TO SAVEPOINT polycommit_member")
            cls = host.classify(exc)
            error = error_info(type(cls).__name__, str(cls), bool(getattr(cls, "retriable", False)))
            results.append(outcome(command.source, "postgres", "FAILED", timing.since(begun), error=error))
    return results
