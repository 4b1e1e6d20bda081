"""polycommit's own worker processes (coordinator, store consumers) started as subprocesses.

Used where the parts must run apart: the benchmark spreads them over the machine's cores, and fault
runs (`polycommit chaos`, tests/fault) kill one with SIGKILL and start it again. A part is ready when it
prints its "polycommit running" line, the same line an operator sees, so readiness is an event, not a
guess. A `Cluster` is the set of parts of one run: started side by side, stopped in one call, and, when
supervised, restarted when one dies on its own, as a supervisor would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from orchestrator.members import ACTIVE_NOTE, NOTE_PREFIX
from polycommit.config import REPO_ROOT, Settings

READY_LINE = b"polycommit running"
PARTS: tuple[str, ...] = ("coordinator", "postgres", "qdrant", "neo4j")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
OUTPUT_TAIL_LINES = 200


class PartStartError(RuntimeError):
    """A part exited, or stayed silent, before printing its ready line."""


def lock_manager_parts(settings: Settings) -> list[str]:
    """The lock manager's process when the coordinators ask it (POLYCOMMIT_LOCK_MANAGER=partitioned)."""
    return ["lock-manager"] if settings.lock_manager == "partitioned" else []


def part_command(part: str) -> list[str]:
    """`coordinator` (`coordinator#2`: another member, instance 2), `detector` (the deadlock detector, for
    runs of interactive transactions), `lock-manager` (the lock manager partitioned by key) or a store name
    (`postgres#2`: another member of its group) -> the CLI invocation."""
    cli = [sys.executable, "-m", "polycommit.tooling.cli"]
    name, _, member = part.partition("#")
    if name == "coordinator":
        return [*cli, "run", name, *(["--instance", member] if member else [])]
    return [*cli, "run", part] if part in ("detector", "lock-manager") else [*cli, "consumer", name]


def part_environment(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a child load the same settings as `settings` (prefix, Edge path).

    Output is unbuffered, so that the ready line reaches the pipe at once and a part killed with SIGKILL
    has lost nothing it printed; a failpoint is armed only when `extra` asks for one.
    """
    env = dict(os.environ)
    env["POLYCOMMIT_TOPIC_PREFIX"] = settings.topic_prefix
    env["POLYCOMMIT_QDRANT_EDGE_PATH"] = str(settings.qdrant.edge_path)
    env["PYTHONUNBUFFERED"] = "1"
    # One process per part: each may be a static group member, so a restarted part is back at once.
    env.setdefault("POLYCOMMIT_CONSUMER_INSTANCE", "0")
    env.pop("POLYCOMMIT_FAILPOINT", None)
    env.update(extra or {})
    return env


@dataclass
class PartProcess:
    """One part as a subprocess; `start()` returns once it has joined its consumer group (its ready line).

    It may be started again after it exited (killed, or dead on its own); each start appends to its log.
    """

    part: str
    settings: Settings
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_path: Path | None = None  # every line it prints, across restarts; without one only `output` keeps any
    # In a session of its own, a Ctrl-C of the harness reaches only the harness, which stops the parts in
    # order; in the harness's session, a signal that kills the harness (timeout, Ctrl-C) reaches them too.
    own_session: bool = False
    process: asyncio.subprocess.Process | None = None
    output: list[str] = field(default_factory=list)  # its last lines, for error reports
    starts: int = 0
    ready_at: float = 0.0  # time.monotonic() of its latest ready line
    expected_exit: bool = False  # killed or stopped on purpose: not a death for a supervisor to report
    _reader: asyncio.Task[None] | None = None
    _watches: list[tuple[str, asyncio.Future[float]]] = field(default_factory=list)
    # A coordinator's latest "coordinator member <name>: active ... / standing by ..." line (members.py).
    member_note: str = ""

    async def start(self, timeout: float = START_TIMEOUT_S, failpoint: str | None = None) -> PartProcess:
        """Start it (armed with `failpoint`, as POLYCOMMIT_FAILPOINT, if given); `PartStartError` unless ready
        by `timeout`, with the process killed."""
        env = {**self.extra_env, **({"POLYCOMMIT_FAILPOINT": failpoint} if failpoint else {})}
        log = self._open_log(failpoint)
        self.expected_exit = False
        try:
            process = await asyncio.create_subprocess_exec(
                *part_command(self.part),
                cwd=REPO_ROOT,
                env=part_environment(self.settings, env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=self.own_session,
            )
        except BaseException:
            if log is not None:
                log.close()
            raise
        self.process = process
        self.starts += 1
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read_output(process, log, ready), name=f"{self.part}-output")
        self._reader = reader
        done, _ = await asyncio.wait({ready, reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            why = "exited before its ready line" if reader in done else f"no ready line within {timeout:.0f} s"
            self._signal(signal.SIGKILL)
            code = await self.exited()
            where = f" (log: {self.log_path})" if self.log_path is not None else ""
            tail = "".join(self.output[-20:])
            raise PartStartError(f"{self.part} did not start: {why}, exit {code}{where}:\n{tail}")
        self.ready_at = time.monotonic()
        return self

    def _open_log(self, failpoint: str | None) -> IO[bytes] | None:
        if self.log_path is None:
            return None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        armed = f" (failpoint {failpoint})" if failpoint else ""
        log.write(f"--- start {self.starts + 1} of {self.part}{armed}\n".encode())
        log.flush()
        return log

    async def _read_output(
        self, process: asyncio.subprocess.Process, log: IO[bytes] | None, ready: asyncio.Future[None]
    ) -> None:
        """Read the child's output so a full pipe never blocks it: into its log, the tail kept for reports."""
        assert process.stdout is not None
        try:
            async for line in process.stdout:
                if log is not None:
                    log.write(line)
                    log.flush()
                self.output.append(line.decode(errors="replace"))
                del self.output[:-OUTPUT_TAIL_LINES]
                self._seen(self.output[-1])
                if not ready.done() and line.startswith(READY_LINE):
                    ready.set_result(None)
        finally:
            if log is not None:
                log.close()

    def watch(self, text: str) -> asyncio.Future[float]:
        """A future of the time.monotonic() at which a line containing `text` is next printed."""
        seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._watches.append((text, seen))
        return seen

    def _seen(self, line: str) -> None:
        if NOTE_PREFIX in line:
            self.member_note = line.strip()
        for text, seen in self._watches:
            if text in line and not seen.done():
                seen.set_result(time.monotonic())
        self._watches = [(t, f) for t, f in self._watches if not f.done()]

    @property
    def active_member(self) -> bool:
        """A coordinator member whose latest note says it is the active one."""
        return ACTIVE_NOTE in self.member_note

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def exited(self, timeout: float | None = None) -> int:
        """The exit code (-9 after SIGKILL) once it has exited and its output is read; TimeoutError at the
        deadline. Cancelling the wait leaves the process and its output reader alone."""
        process, reader = self.process, self._reader
        assert process is not None
        code = await asyncio.wait_for(process.wait(), timeout)
        if reader is not None:
            await asyncio.shield(reader)
        return code

    def kill(self) -> None:
        """SIGKILL: no cleanup, no offset commit, exactly like a crash (and expected: not reported as one)."""
        self.expected_exit = True
        self._signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: the part holds whatever it holds and does nothing more until killed (or SIGCONT)."""
        self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> None:
        """Send `sig` unless the part is known to be gone. One gone but not yet seen by the loop is no error:
        uvloop raises ProcessLookupError there where the standard loop's Popen stays silent, and either way
        it is as dead as the signal would make it."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM and wait for a clean exit; SIGKILL after `timeout`. Returns the exit code."""
        self.expected_exit = True
        if self.process is None:
            return None
        self._signal(signal.SIGTERM)
        try:
            return await self.exited(timeout)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            return await self.exited(timeout)


@dataclass(frozen=True)
class Exit:
    """A part that exited on its own (not killed or stopped on purpose)."""

    name: str
    code: int
    at_s: float


@dataclass
class Cluster:
    """The parts of one run as subprocesses; when `supervise`d, one that dies on its own is restarted."""

    settings: Settings
    log_dir: Path | None = None  # each part's log is <log_dir>/<part>.log; None keeps only their last lines
    names: Sequence[str] = PARTS
    supervise: bool = True
    own_session: bool = True  # see PartProcess.own_session
    processes: dict[str, PartProcess] = field(default_factory=dict)
    unexpected_exits: list[Exit] = field(default_factory=list)
    on_exit: Callable[[Exit], None] | None = None
    _watchers: list[asyncio.Task[None]] = field(default_factory=list)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        for name in self.names:
            log = self.log_dir / f"{name}.log" if self.log_dir is not None else None
            self.processes[name] = PartProcess(name, self.settings, log_path=log, own_session=self.own_session)

    def __getitem__(self, name: str) -> PartProcess:
        return self.processes[name]

    async def start(self, failpoints: Mapping[str, str] | None = None) -> Cluster:
        """Start every part side by side; `failpoints` arms some (name -> POLYCOMMIT_FAILPOINT). If one fails,
        the others are stopped and its error raised."""
        armed = dict(failpoints or {})
        results = await asyncio.gather(
            *(self.start_one(name, armed.get(name)) for name in self.names), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        return self

    async def start_one(self, name: str, failpoint: str | None = None) -> None:
        part = self.processes[name]
        await part.start(failpoint=failpoint)
        if self.supervise:
            self._watchers.append(asyncio.create_task(self._watch(part), name=f"watch-{name}"))

    async def restart(self, name: str) -> float:
        """Start a part that was killed (without any failpoint); returns when it is ready."""
        await self.start_one(name)
        return self.processes[name].ready_at

    async def _watch(self, part: PartProcess) -> None:
        process = part.process
        assert process is not None
        code = await process.wait()
        if part.expected_exit or self._closing.is_set() or part.process is not process:
            return
        event = Exit(part.part, code, round(time.monotonic() - self._started, 3))
        self.unexpected_exits.append(event)
        if self.on_exit is not None:
            self.on_exit(event)
        delay = 0.5
        while not self._closing.is_set():
            try:
                await self.start_one(part.part)
                return
            except PartStartError:
                # Its dependency (the broker, a store) is still down: try again, backing off, until closing.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, 5.0)

    async def stop(self) -> dict[str, int | None]:
        """Stop every part cleanly (SIGTERM, wait); returns their exit codes."""
        self._closing.set()
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers.clear()
        codes = await asyncio.gather(*(p.stop() for p in self.processes.values()))
        return dict(zip(self.processes, codes, strict=True))
