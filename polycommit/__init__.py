"""polycommit: change PostgreSQL, Qdrant and Neo4j together, over an Avro event log on Kafka.

    import polycommit
    from polycommit import ops

    async with polycommit.transaction(name="ingest") as tx:   # a client for this one transaction
        tx.postgres.upsert("documents", key={"id": 1}, values={"title": "t"})
        tx.neo4j.merge_node("Document", key={"id": 1})
    print(tx.result)

A long-running application keeps one `Coordinator` (``async with polycommit.connect() as c``) and calls
``c.execute(...)`` / ``c.transaction(...)`` on it: starting a client joins Kafka, which takes a moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from polycommit import operations as ops
from polycommit.client import Coordinator, Saga, Transaction, TransactionResult, TransactionScope, connect
from polycommit.config import Settings, load_settings
from polycommit.errors import VersionConflict
from polycommit.occ import retry_on_conflict
from polycommit.reads import Versioned

__all__ = [
    "Coordinator",
    "Saga",
    "Settings",
    "Transaction",
    "TransactionResult",
    "TransactionScope",
    "VersionConflict",
    "Versioned",
    "connect",
    "load_settings",
    "ops",
    "retry_on_conflict",
    "transaction",
]


@contextlib.asynccontextmanager
async def transaction(settings: Settings | None = None, **options: Any) -> AsyncIterator[TransactionScope]:
    """Collect structured operations and commit them on exit, with a client started for the purpose."""
    async with connect(settings) as coordinator, coordinator.transaction(**options) as scope:
        yield scope
