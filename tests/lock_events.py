"""The lock events an integration test waits for or reads back from the `locks` topic."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from polycommit.bus import read_topic, topics_for
from polycommit.codec import default_codec
from polycommit.config import Settings
from polycommit.errors import CodecError
from polycommit.lock_log import expand
from polycommit.tooling.runtime import Runtime


async def waiting_recorded(settings: Settings, tx_id: str) -> None:
    """Until the coordinator has published (committed) a WAITING lock event of `tx_id`."""
    codec, names = default_codec(), topics_for(settings)
    deadline = asyncio.get_running_loop().time() + 30
    found: list[bool] = []

    def take(record: Any) -> None:
        with contextlib.suppress(CodecError):
            event = codec.decode_as(record.value, "LockEvent")
            found.append(event["tx_id"] == tx_id and event["action"] == "WAITING")

    while not any(found):
        assert asyncio.get_running_loop().time() < deadline, f"{tx_id} never waited"
        found.clear()
        await read_topic(settings, names.locks, take)


async def lock_history(settings: Settings, resource: str) -> list[tuple[str, str]]:
    """(tx id, action) of every lock event on `resource`, in log order (one partition: keyed by resource)."""
    codec, names = default_codec(), topics_for(settings)
    found: list[tuple[str, str]] = []

    def take(record: Any) -> None:
        with contextlib.suppress(CodecError):
            for event in expand(codec.decode_as(record.value, "LockEvent")):
                if event["resource"] == resource:
                    found.append((event["tx_id"], event["action"]))

    await read_topic(settings, names.locks, take)
    return found


async def restart_while_waiting(
    runtime: Runtime, waiter: str, may_finish: asyncio.Event, tasks: list[asyncio.Task[Any]]
) -> list[Any]:
    """Once `waiter` is seen WAITING, restart the runtime (every lock the coordinator held is gone from
    memory, then rebuilt from the open transactions' snapshots), let the holder finish, and return what
    `tasks` returned."""
    await waiting_recorded(runtime.settings, waiter)
    await runtime.stop()
    await runtime.start(timeout=120)
    may_finish.set()
    return list(await asyncio.gather(*tasks))
