"""What a pooled PostgreSQL connection is reset with when it goes back to the pool.

asyncpg's default reset is a round trip of four statements (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
UNLISTEN *; RESET ALL`) on every release, and a saga batch releases its connection before its outcomes are
published: that round trip is on every step's latency. Polycommit's own statements leave no session state
behind (no LISTEN, no cursor, no advisory lock, no session SET; isolation is per transaction), so only a
connection that ran a caller's raw SQL step, which may have done any of these, is reset in full. An open
transaction is rolled back by asyncpg itself before this hook runs, in every case.
"""

from __future__ import annotations

import asyncpg


class SessionResets:
    """The pool's `reset` hook: a full reset for the connections a raw step ran on, none for the others.

    Connections are known by their server process id (`get_server_pid()` answers through the pool's
    connection proxy and on the connection the hook is given alike, with no round trip)."""

    def __init__(self) -> None:
        self._dirty: set[int] = set()

    def ran_raw_sql(self, conn: asyncpg.Connection) -> None:
        self._dirty.add(conn.get_server_pid())

    async def reset(self, conn: asyncpg.Connection) -> None:
        pid = conn.get_server_pid()
        if pid in self._dirty:
            self._dirty.discard(pid)
            query = conn.get_reset_query()
            if query:
                await conn.execute(query)
