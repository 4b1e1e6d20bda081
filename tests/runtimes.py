"""An in-process runtime for the integration tests that run whole transactions: started with the tables
and Qdrant collection their workload needs, stopped after; and a client whose Qdrant reads go through the
runtime's consumer (Qdrant Edge admits one process per storage path, held by that consumer)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import asyncpg

from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.tooling import workload
from polycommit.tooling.checker import check
from polycommit.tooling.checker.log import read_log
from polycommit.tooling.runtime import Runtime


@contextlib.asynccontextmanager
async def started_runtime(
    settings: Settings,
    *,
    tables: Iterable[str] = (),
    collection: tuple[str, int] = (workload.DOCUMENTS, workload.DIMENSIONS),
    start_timeout: float = 60.0,
    **options: Any,
) -> AsyncIterator[Runtime]:
    """The workload's `documents` table, then each `CREATE TABLE` of `tables`; the runtime (`options` as
    `Runtime` takes them) with `collection` (name, vector size) in its Qdrant."""
    await workload.prepare_postgres(settings)
    if tables:
        conn = await asyncpg.connect(settings.postgres.dsn)
        try:
            await conn.execute(";".join(tables))
        finally:
            await conn.close()
    runtime = Runtime(settings, **options)
    await runtime.start(timeout=start_timeout)
    try:
        await runtime.workers["qdrant"].participant.ensure_collection(*collection)  # type: ignore[attr-defined]
        yield runtime
    finally:
        await runtime.stop()


class CurrentBackend:
    """The runtime's Qdrant consumer backend as of each read: a restarted runtime builds a new one (and the
    old one has let go of the Edge storage)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def retrieve(
        self, collection: str, ids: Sequence[str], with_vectors: bool = True
    ) -> Mapping[str, Mapping[str, Any]]:
        backend = self.runtime.workers["qdrant"].participant.backend  # type: ignore[attr-defined]
        found: Mapping[str, Mapping[str, Any]] = await backend.retrieve(collection, ids, with_vectors)
        return found


@contextlib.asynccontextmanager
async def reading_client(runtime: Runtime, timeout: float) -> AsyncIterator[Coordinator]:
    """A client whose reads of Qdrant go through the runtime's Qdrant consumer (the current one)."""
    async with Coordinator(runtime.settings, timeout=timeout, point_source=CurrentBackend(runtime)) as coordinator:
        yield coordinator


async def violations_in_log(runtime: Runtime) -> list[Any]:
    """The checker on every transaction of the run's log, each key's writers in the order the log's lock
    events granted it (concurrent sagas: neither invocation nor marker times order them)."""
    history, facts = await read_log(runtime.settings)
    qdrant = runtime.workers["qdrant"].participant
    report = await check(runtime.settings, history, qdrant=qdrant, keys_owned=False, log=facts)  # type: ignore[arg-type]
    return report.violations
