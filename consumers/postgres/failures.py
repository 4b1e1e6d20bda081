"""What a PostgreSQL error means for the step that met it (polycommit/postgres_errors.py, shared with the
client's reads), and asyncpg's log of an outage kept to a line."""

from __future__ import annotations

import logging

from polycommit.postgres_errors import UNREACHABLE as UNREACHABLE
from polycommit.postgres_errors import classify as classify
from polycommit.postgres_errors import sqlstate as sqlstate
from polycommit.postgres_errors import unreachable as unreachable


class OneLinePoolRestore(logging.Filter):
    """asyncpg logs every failed attempt to restore a pool's minimum size with a full traceback (after 1, 2,
    4 ... 60 s, for as long as the server is down), a screenful per attempt in a consumer's log during an
    outage the worker reports already. Kept: one line, with the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and record.getMessage().startswith("Failed to restore the pool connection"):
            record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {error})", None
            record.exc_info, record.exc_text = None, None
        return True


def quiet_pool_restores() -> None:
    """Install `OneLinePoolRestore` on asyncpg's pool logger (once)."""
    logger = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, OneLinePoolRestore) for f in logger.filters):
        logger.addFilter(OneLinePoolRestore())
