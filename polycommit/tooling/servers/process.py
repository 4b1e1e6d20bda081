"""Process plumbing shared by the local servers: paths, pid files, launching, waiting, locks, errors.

Each server runs as a plain process on this machine, bound to 127.0.0.1, with its data under
`settings.data_dir/<name>`, its log in `settings.log_dir/<name>.log` and its pid in
`settings.run_dir/<name>.pid`. A server module (`postgres`, `kafka`, `neo4j`) describes itself as a
`Server`: how to start it, probe it, find its pid and stop it; `polycommit.tooling.services` drives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polycommit.config import Settings

STOP_GRACE_S = 30.0
POLL_INTERVAL_S = 0.2
PROBE_TIMEOUT_S = 3.0
LOG_TAIL_LINES = 40


class ServicesError(RuntimeError):
    """A server could not be set up, started, probed or stopped."""


class MissingSecretError(ServicesError):
    """A password is empty: neither the environment nor `<home>/secrets.env` provides it."""


class ServerStartError(ServicesError):
    """A server did not become ready by its deadline, or could not be launched."""

    def __init__(self, name: str, message: str, log_path: Path | None = None, log_tail: str = "") -> None:
        self.name = name
        self.log_path = log_path
        self.log_tail = log_tail
        text = f"{name}: {message}"
        if log_path is not None:
            text += f" (log: {log_path})"
        if log_tail:
            text += f"\n--- last lines of {log_path} ---\n{log_tail}"
        super().__init__(text)


class ProbeFailed(Exception):
    """The server answered but is not ready yet (e.g. no live broker, role not provisioned)."""


@dataclass
class ServerStatus:
    name: str
    address: str
    version: str | None
    healthy: bool
    pid: int | None
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The object `status --json` prints for this server; it never holds a password."""
        return {
            "address": self.address,
            "version": self.version,
            "healthy": self.healthy,
            "pid": self.pid,
            **self.extra,
        }


def statuses_to_json(statuses: dict[str, ServerStatus]) -> dict[str, dict[str, Any]]:
    return {name: status.to_json() for name, status in statuses.items()}


def _no_installed_version(settings: Settings) -> str | None:
    return None


def _never_stale(settings: Settings) -> bool:
    return False


@dataclass(frozen=True)
class Server:
    """What `polycommit.tooling.services` needs to know of one server process to run its lifecycle."""

    name: str
    start_deadline_s: float
    start: Callable[[Settings, float], Awaitable[str]]  # launch it; returns its version once it answers
    probe: Callable[[Settings, float], Awaitable[str]]  # one real request, given the seconds it may take
    pid: Callable[[Settings], int | None]  # the live process, never a recycled pid
    stop: Callable[[Settings], Awaitable[None]]
    address: Callable[[Settings], tuple[str, dict[str, str]]]  # for its status: address and extra fields
    # The version known without asking the server (from its installed files), shown even when it is down.
    installed_version: Callable[[Settings], str | None] = _no_installed_version
    # True when the running server was started with settings that no longer hold (e.g. Kafka started
    # PLAINTEXT before scripts/setup generated its SCRAM passwords): `start` then restarts it.
    stale: Callable[[Settings], bool] = _never_stale


# -- paths, pids and processes -----------------------------------------------------------------------


def log_path(settings: Settings, name: str) -> Path:
    return settings.log_dir / f"{name}.log"


def pid_path(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def data_path(settings: Settings, name: str) -> Path:
    return settings.data_dir / name


# Processes this interpreter launched: polled so that a killed child is reaped, not left as a zombie
# whose pid still looks alive.
_children: dict[int, subprocess.Popen[bytes]] = {}


def pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def marked_pid(settings: Settings, name: str, marker: str) -> int | None:
    """The pid in `name`'s pid file if that process lives and its command line contains `marker`.

    A pid file may outlive its process, and the kernel may have given that pid to something else since:
    the marker (the server's main class) tells our server from that other program before we signal it.
    """
    pid = read_pid(pid_path(settings, name))
    if pid is None or not pid_alive(pid):
        return None
    return pid if marker in _cmdline(pid) else None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def redact(text: str, settings: Settings) -> str:
    kafka = [c.password for c in settings.kafka.roles.values()]
    if settings.kafka.credentials is not None:
        kafka.append(settings.kafka.credentials.password)
    for secret in (settings.postgres.password, settings.neo4j.password, *kafka):
        if secret:
            text = text.replace(secret, "***")
    return text


def java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise ServicesError("java is not installed: run scripts/setup")
    return found


def launch(argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> int:
    """Start a server in its own session (so a Ctrl-C of the caller does not reach it); output to its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    _children[child.pid] = child
    return child.pid


async def launch_until_ready(
    name: str,
    settings: Settings,
    argv: list[str],
    *,
    cwd: Path,
    deadline_s: float,
    probe: Callable[[Settings, float], Awaitable[str]],
    env: dict[str, str] | None = None,
) -> str:
    """Launch a server, record its pid, and wait until `probe` answers (or the process dies); its version."""
    pid = launch(argv, log_path(settings, name), cwd=cwd, env=env)
    pid_path(settings, name).write_text(f"{pid}\n")
    return await wait_until_ready(
        name, settings, deadline_s, lambda t: probe(settings, t), alive=lambda: pid_alive(pid)
    )


async def run(argv: list[str], *, input_text: str | None = None, limit_s: float = 120.0) -> tuple[int, str]:
    """Run a short command to completion; returns its exit code and its combined output.

    The output goes to a temporary file, not a pipe, and the command is done when it exits: a command that
    leaves a daemon behind (`pg_ctl start`) must not be waited for until the daemon closes the pipe. Under
    uvloop a grandchild keeps a copy of the pipe's write end even when it redirects its own output, so
    reading the pipe to its end waited out `limit_s` (65 s per PostgreSQL restart in chaos)."""
    with tempfile.TemporaryFile() as output:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            await asyncio.wait_for(_feed_and_wait(proc, input_text), limit_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile (uvloop raises where Popen does not)
                proc.kill()
            await proc.wait()
            return -1, f"timed out after {limit_s:.0f} s: {' '.join(argv)}"
        output.seek(0)
        return proc.returncode or 0, output.read().decode(errors="replace")


async def _feed_and_wait(proc: asyncio.subprocess.Process, input_text: str | None) -> None:
    if input_text is not None and proc.stdin is not None:
        proc.stdin.write(input_text.encode())
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it exited without reading it all
            await proc.stdin.drain()
        proc.stdin.close()
    await proc.wait()


async def wait_gone(pid: int, limit_s: float) -> bool:
    """Wait for the process to exit (its pidfd turns readable); pid_alive then reaps it if it was ours."""
    await await_pid_exit(pid, limit_s)
    return not pid_alive(pid)


async def await_pid_exit(pid: int, timeout: float) -> bool:
    """Wait until a process that is not our child (e.g. the broker) is gone; False at the deadline."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def terminate(settings: Settings, name: str, pid: int | None) -> None:
    """SIGTERM the server's process, SIGKILL after `STOP_GRACE_S`; then remove its pid file."""
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        if not await wait_gone(pid, STOP_GRACE_S):
            os.kill(pid, signal.SIGKILL)
            if not await wait_gone(pid, 10):
                raise ServicesError(f"{name}: pid {pid} survived SIGKILL")
    pid_path(settings, name).unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def server_lock(settings: Settings, name: str) -> AsyncIterator[None]:
    """One start or stop of a server at a time, across processes (tests may run in parallel)."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.run_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.1)
        yield
    finally:
        os.close(fd)


async def port_open(address: str, budget_s: float) -> None:
    """Raise unless something accepts TCP connections at host:port (cheap, and logs nothing)."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), budget_s)
    except (OSError, TimeoutError) as exc:
        raise ProbeFailed(f"nothing listens on {address}: {exc}") from exc
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def wait_until_ready(
    name: str,
    settings: Settings,
    deadline_s: float,
    probe: Callable[[float], Awaitable[str]],
    alive: Callable[[], bool] | None = None,
) -> str:
    """Poll `probe` (given the seconds it may take) until it succeeds; returns what it returns (a version)."""
    log = log_path(settings, name)
    deadline = time.monotonic() + deadline_s
    last_error = "no probe ran"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerStartError(
                name,
                f"not ready after {deadline_s:.0f} s; last probe: {redact(last_error, settings)}",
                log,
                redact(log_tail(log), settings),
            )
        if alive is not None and not alive():
            raise ServerStartError(name, "the process exited while starting", log, redact(log_tail(log), settings))
        budget = min(PROBE_TIMEOUT_S, remaining)
        try:
            return await asyncio.wait_for(probe(budget), budget + 0.5)
        except (Exception, TimeoutError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))


def require_password(settings: Settings, name: str) -> None:
    password = {"postgres": settings.postgres.password, "neo4j": settings.neo4j.password}.get(name)
    if password == "":
        variable = "POLYCOMMIT_PG_PASSWORD" if name == "postgres" else "POLYCOMMIT_NEO4J_PASSWORD"
        raise MissingSecretError(
            f"{name}: no password: {variable} is unset and {settings.home / 'secrets.env'} does not "
            "define it; run scripts/setup (it generates the secrets)"
        )
