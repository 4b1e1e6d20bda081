"""What a PostgreSQL error means: worth retrying, or the server not there. Pure; one reading for the
store consumer (consumers/postgres) and the client's reads (polycommit/reads.py)."""

from __future__ import annotations

import asyncpg

from polycommit.errors import StoreError

# The store is unreachable, or the connection broke mid-operation (asyncpg's InternalClientError, e.g.
# after the server died under a query): the worker retries the whole batch on a fresh connection.
UNREACHABLE = (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)

# SQLSTATE classes after which the same statement may succeed later: transaction rollback (40:
# serialization failure, deadlock), connection exceptions (08), object not in prerequisite state (55:
# lock not available), operator intervention (57: shutdown, cancel), insufficient resources (53).
_RETRIABLE_CLASSES = ("40", "08", "55", "57", "53")
# The server is not there to talk to: a connection exception (08), or shutting down, crashed or starting up
# (57P01-57P03).
_OUTAGE_CLASSES = ("08", "57")


def sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def classify(exc: Exception) -> StoreError:
    code = sqlstate(exc)
    message = getattr(exc, "message", None) or str(exc)
    return StoreError(
        f"{type(exc).__name__}: {message}", retriable=code[:2] in _RETRIABLE_CLASSES, store="postgres", code=code
    )


def unreachable(exc: BaseException) -> bool:
    """The server cannot be talked to now: no connection, a connection broken, or the server saying it is
    going, gone or not yet up (not what a statement did)."""
    if isinstance(exc, UNREACHABLE):
        return True
    return isinstance(exc, asyncpg.PostgresError) and sqlstate(exc)[:2] in _OUTAGE_CLASSES
