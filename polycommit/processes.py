"""polycommit's own worker processes (coordinator, store consumers) started as subprocesses.

Used where the parts must run apart: the benchmark spreads them over the machine's cores, and fault
runs kill one with SIGKILL and start it again. A part is ready when it prints its "polycommit running"
line, the same line an operator sees, so readiness is an event, not a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from polycommit.config import REPO_ROOT, Settings

READY_LINE = b"polycommit running"


def part_command(part: str) -> list[str]:
    """`coordinator` or a store name -> the CLI invocation that runs it."""
    cli = [sys.executable, "-m", "polycommit.cli"]
    return [*cli, "run", "coordinator"] if part == "coordinator" else [*cli, "consumer", part]


def part_environment(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a child load the same settings as `settings` (prefix, Edge path)."""
    env = dict(os.environ)
    env["POLYCOMMIT_TOPIC_PREFIX"] = settings.topic_prefix
    env["POLYCOMMIT_QDRANT_EDGE_PATH"] = str(settings.qdrant.edge_path)
    env.pop("POLYCOMMIT_FAILPOINT", None)
    env.update(extra or {})
    return env


@dataclass
class PartProcess:
    """One running part; `start()` returns once it has joined its consumer group."""

    part: str
    settings: Settings
    extra_env: Mapping[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None
    output: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 90.0) -> PartProcess:
        self.process = await asyncio.create_subprocess_exec(
            *part_command(self.part),
            cwd=REPO_ROOT,
            env=part_environment(self.settings, self.extra_env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        await asyncio.wait_for(self._until_ready(), timeout)
        self._drain = asyncio.create_task(self._keep_draining())
        return self

    async def _until_ready(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            if not line:
                code = await self.process.wait()
                raise RuntimeError(
                    f"{self.part} exited with {code} before it was ready:\n" + "".join(self.output[-20:])
                )
            self.output.append(line.decode(errors="replace"))
            if line.startswith(READY_LINE):
                return

    async def _keep_draining(self) -> None:
        """Read the child's output so a full pipe never blocks it; keep the tail for error reports."""
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            self.output.append(line.decode(errors="replace"))
            del self.output[:-200]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def exited(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no offset commit, exactly like a crash."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        return self.process.returncode


async def start_parts(settings: Settings, parts: list[str]) -> list[PartProcess]:
    started = await asyncio.gather(*(PartProcess(p, settings).start() for p in parts), return_exceptions=True)
    processes = [p for p in started if isinstance(p, PartProcess)]
    errors = [e for e in started if isinstance(e, BaseException)]
    if errors:
        await asyncio.gather(*(p.stop() for p in processes))
        raise errors[0]
    return processes
