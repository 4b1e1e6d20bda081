"""What a Neo4j driver or server error means: unreachable, retriable, or permanent. Pure; one reading for
the store consumer (consumers/neo4j) and the client's reads (polycommit/reads.py)."""

from __future__ import annotations

from neo4j.exceptions import DriverError, Neo4jError, ServiceUnavailable, SessionExpired

from polycommit.errors import PolycommitError, StoreError, StoreUnavailableError

STORE = "neo4j"

# A timeout or a termination ends the transaction, not the request: the same work may succeed later.
_RETRIABLE_CLIENT_CODES = frozenset(
    {
        "Neo.ClientError.Transaction.Terminated",
        "Neo.ClientError.Transaction.LockClientStopped",
        "Neo.ClientError.Transaction.TransactionTimedOut",
        "Neo.ClientError.Transaction.TransactionTimedOutClientConfiguration",
    }
)


def classify(exc: BaseException) -> BaseException:
    """A driver or server error as polycommit's: unreachable, retriable, or permanent."""
    if isinstance(exc, PolycommitError):
        return exc
    if isinstance(exc, TimeoutError):
        return StoreUnavailableError("neo4j did not answer within the call's deadline (a stale connection)")
    if isinstance(exc, ServiceUnavailable | SessionExpired):  # includes IncompleteCommit: redo is idempotent
        return StoreUnavailableError(f"neo4j unreachable: {exc}")
    if isinstance(exc, Neo4jError):
        retriable = exc.is_retryable() or exc.code in _RETRIABLE_CLIENT_CODES
        return StoreError(f"{exc.code}: {exc.message}", retriable=retriable, store=STORE, code=exc.code)
    if isinstance(exc, DriverError):
        return StoreError(f"{type(exc).__name__}: {exc}", retriable=exc.is_retryable(), store=STORE)
    return exc
