"""The fault tests' shared fixture (a module may define its own `fault_settings`, as the 2PC ones do)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fault.fault_runs import fault_run
from polycommit.config import Settings


@pytest.fixture
async def fault_settings(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """Per test: fresh topics and a Qdrant Edge folder of its own, with the workload's schema ready."""
    async with fault_run(settings, tmp_path, "fault") as run:
        yield run
