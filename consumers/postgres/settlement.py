"""Settling PostgreSQL's prepared transactions of ours when a participant starts, from the decision log.

A participant killed between PREPARE TRANSACTION and phase 2 leaves a prepared gid holding its row
locks. At start, if any gid of ours (`pc_` prefix; a foreign gid is never touched) is prepared, the
decisions topic is read once, bounded in time so a slow broker never blocks the consumer for long, and
each gid is committed or rolled back by its members' decisions (`consumers.postgres.phase2.settle`); a
gid with a member undecided past the prepare window plus a margin is rolled back (presumed abort). A
gid still inside its window is left to the coordinator, whose phase-2 commands will settle it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError

from consumers.postgres import phase2, twophase
from polycommit.bus import read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError

log = logging.getLogger(__name__)

PREPARE_WINDOW_MS = 10_000  # the coordinator's default (orchestrator.twopc_model.TwoPCPolicy)
PRESUME_ABORT_AFTER_MS = PREPARE_WINDOW_MS + 5_000
READ_DECISIONS_S = 10.0


async def decisions_by_tx(settings: Settings, timeout_s: float = READ_DECISIONS_S) -> dict[str, str]:
    """tx_id -> COMMIT / ABORT, from the decisions topic (the last one of a tx wins)."""
    codec = default_codec()
    found: dict[str, str] = {}

    def take(record: Any) -> None:
        try:
            decision = codec.decode_as(record.value, "Decision")
        except CodecError:
            return  # not ours to judge here: the checker reports foreign records
        found[decision["tx_id"]] = decision["outcome"]

    await asyncio.wait_for(read_topic(settings, topics_for(settings).decisions, take), timeout_s)
    return found


async def settle_at_start(
    settings: Settings, pool: asyncpg.Pool, presume_abort_after_ms: int = PRESUME_ABORT_AFTER_MS
) -> list[dict[str, str]]:
    space = twophase.space_of(settings.topic_prefix)
    async with pool.acquire() as conn:
        if not await conn.fetch(twophase.PREPARED_GIDS, f"{twophase.GID_PREFIX}{space}_"):
            return []
    try:
        decisions = await decisions_by_tx(settings)
    except (TimeoutError, OSError, KafkaError) as exc:
        log.warning("prepared transactions left unsettled: the decisions topic could not be read (%s)", exc)
        return []
    return await phase2.settle(pool, space, decisions, presume_abort_after_ms)
