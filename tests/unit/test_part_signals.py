"""Signalling a part that is gone but not yet seen gone by the event loop: uvloop raises ProcessLookupError
there (the standard loop's Popen does not). A kill or a stop of such a part is not an error: chaos once
ended on it ("polycommit chaos: ProcessLookupError")."""

from __future__ import annotations

import signal
from typing import Any

from polycommit.config import load_settings
from polycommit.tooling.processes import PartProcess


class GoneProcess:
    """What uvloop's process object does once libuv has reaped the child and before its exit callback ran."""

    returncode: int | None = None

    def __init__(self) -> None:
        self.signals: list[int] = []

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        raise ProcessLookupError()

    async def wait(self) -> int:
        self.returncode = -signal.SIGKILL
        return self.returncode


def gone_part() -> tuple[PartProcess, GoneProcess]:
    process = GoneProcess()
    part: Any = PartProcess("postgres", load_settings())
    part.process = process
    return part, process


def test_killing_a_part_already_gone_is_not_an_error() -> None:
    part, process = gone_part()
    part.kill()
    assert process.signals == [signal.SIGKILL]
    assert part.expected_exit


async def test_stopping_a_part_already_gone_returns_its_exit() -> None:
    part, process = gone_part()
    assert await part.stop(timeout=5) == -signal.SIGKILL
    assert process.signals == [signal.SIGTERM]
