"""Two coordinator members in one group, on the real broker: each coordinates half of the transaction
partitions, and each says so in its log, with what it means for locks (the lock table is per member)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest

from orchestrator.service import CoordinatorService
from polycommit.bus import create_topics, delete_topics
from polycommit.config import Settings
from polycommit.tooling.chaos import run_settings

pytestmark = pytest.mark.servers


class Warnings(logging.Handler):
    """Collects the lock-scope warnings and wakes the test once `wanted` of them came."""

    def __init__(self, wanted: int) -> None:
        super().__init__(logging.WARNING)
        self.loop = asyncio.get_running_loop()
        self.wanted = wanted
        self.messages: list[str] = []
        self.came = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "transaction partitions" in record.getMessage():
            self.messages.append(record.getMessage())
            if len(self.messages) >= self.wanted:
                self.loop.call_soon_threadsafe(self.came.set)


async def test_each_of_two_members_warns_that_its_lock_table_covers_only_its_transactions(
    settings: Settings, tmp_path: Path
) -> None:
    run = run_settings(settings, uuid.uuid4().hex[:8], prefix="members", edge_path=tmp_path / "edge")
    await create_topics(run, {"intents": 2})
    caught = Warnings(wanted=2)
    logger = logging.getLogger("orchestrator.service")
    logger.addHandler(caught)
    stop = asyncio.Event()
    members = [CoordinatorService(run, instance=f"member-{i}") for i in range(2)]
    tasks = [asyncio.create_task(member.run(stop)) for member in members]
    try:
        await asyncio.wait_for(caught.came.wait(), 90)  # the second member's join splits the partitions
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        logger.removeHandler(caught)
        await delete_topics(run)
    assert all("owns 1 of 2 transaction partitions" in m for m in caught.messages[-2:]), caught.messages
