"""What a PostgreSQL error means (unreachable or not, retriable or not), and asyncpg's outage log kept short."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from consumers.postgres.failures import classify, quiet_pool_restores, unreachable


def _postgres_error(sqlstate: str) -> asyncpg.PostgresError:
    error = asyncpg.PostgresError("from the server")
    error.sqlstate = sqlstate  # type: ignore[attr-defined]
    return error


def test_the_server_going_or_gone_is_unreachable_and_a_statements_error_is_not() -> None:
    assert unreachable(ConnectionRefusedError())
    assert unreachable(asyncpg.InterfaceError("connection is closed"))
    assert unreachable(_postgres_error("57P01"))  # admin shutdown
    assert unreachable(_postgres_error("08006"))  # connection failure
    assert not unreachable(_postgres_error("42601"))  # a syntax error: the statement, not the server
    assert not unreachable(_postgres_error("42501"))  # permission refused: a misconfiguration, not an outage
    assert classify(_postgres_error("40P01")).retriable  # a deadlock: the same batch may pass later
    assert not classify(_postgres_error("23505")).retriable


def test_a_failed_pool_restore_is_logged_as_one_line_with_its_error(caplog: pytest.LogCaptureFixture) -> None:
    quiet_pool_restores()
    quiet_pool_restores()  # installed once, however often asked
    logger = logging.getLogger("asyncpg.pool")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="asyncpg.pool"):
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except ConnectionRefusedError:
            logger.warning("Failed to restore the pool connection floor; retrying", exc_info=True)
        try:
            raise ValueError("something else")
        except ValueError:
            logger.warning("another warning", exc_info=True)  # other records keep their traceback
    restore, other = caplog.records
    assert restore.exc_info is None
    assert restore.getMessage() == (
        "Failed to restore the pool connection floor; retrying"
        " (ConnectionRefusedError: [Errno 111] Connect call failed)"
    )
    assert other.exc_info is not None and other.getMessage() == "another warning"
