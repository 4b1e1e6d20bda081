"""The lock calls of one client: each LockRequest it sends waits for its LockReply on the client's reply
partition (polycommit.interactive sends them; the client routes what arrives on that partition)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from polycommit import errors
from polycommit.codec import EventCodec
from polycommit.events import LockReply, LockRequest


class LockCalls:
    """The `tx.lock` calls of one client awaiting their LockReply, by (tx id, request number)."""

    def __init__(self, codec: EventCodec) -> None:
        self.codec = codec
        self.waiting: dict[tuple[str, int], asyncio.Future[LockReply]] = {}

    async def call(self, send: Awaitable[None], request: LockRequest, timeout: float) -> LockReply | None:
        key = (request["tx_id"], request["request"])
        future: asyncio.Future[LockReply] = asyncio.get_running_loop().create_future()
        if not request["release"]:
            self.waiting[key] = future
        try:
            await send
            return None if request["release"] else await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.TransactionTimeoutError(f"no answer to lock request {key} within {timeout}s") from None
        finally:
            self.waiting.pop(key, None)

    def route(self, record: Any) -> bool:
        """True when `record` (on the client's reply partition) is a LockReply: given to its call, if any."""
        try:
            decoded = self.codec.decode(record.value)
        except errors.CodecError:
            return False  # not for a lock call: the result path reports it
        if decoded.event_type != "LockReply":
            return False
        future = self.waiting.pop((decoded.record["tx_id"], decoded.record["request"]), None)
        if future is not None and not future.done():
            future.set_result(decoded.record)  # type: ignore[arg-type]
        return True
