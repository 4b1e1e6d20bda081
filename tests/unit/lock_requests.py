"""A client's LockRequest as the interactive SDK sends it, for the protocol tests."""

from __future__ import annotations

from typing import Any

from polycommit.events import LockRequest


def request(tx_id: str, n: int, keys: list[str], mode: str = "EXCLUSIVE", **fields: Any) -> LockRequest:
    return {
        "tx_id": tx_id,
        "request": n,
        "keys": keys,
        "mode": mode,  # type: ignore[typeddict-item]
        "release": False,
        "name": "",
        "isolation": "READ_COMMITTED",
        "priority": 0,
        "reply_to": "polycommit.replies:0",
        "client_id": "test",
        "lock_wait_ms": 0,
        "created_at_ms": 0,
        **fields,  # type: ignore[typeddict-item]
    }
