"""Which ports each server needs, and a check before starting that names whoever holds one and how to move it.

A second checkout started on the same machine used to fail deep inside the server ("Address already in
use" from netty, with no port named). Each port is tried first: when one is taken, the error names the
port, the process listening on it where this user can see it (/proc/net/tcp* then the /proc/<pid>/fd
sockets, or `ss -ltnp`), and the environment variable that moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from polycommit.config import Settings
from polycommit.tooling.servers.process import ServicesError

HOST = "127.0.0.1"  # every server binds here (scripts/services)
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


class PortInUseError(ServicesError):
    """A server's port is taken by another process; the message says which and which variable moves it."""


@dataclass(frozen=True)
class ServerPort:
    server: str
    port: int
    variable: str  # the environment variable that moves it
    example: str  # the variable's value with the port moved by 1000, as an example


def _bootstrap_port(settings: Settings) -> int:
    return int(settings.kafka.bootstrap.rsplit(":", 1)[1])


def server_ports(settings: Settings, name: str) -> list[ServerPort]:
    """The ports server `name` listens on when started, each with the variable that moves it."""
    if name == "postgres":
        port = settings.postgres.port
        return [ServerPort(name, port, "POLYCOMMIT_PG_PORT", str(port + 1000))]
    if name == "kafka":
        port, controller = _bootstrap_port(settings), settings.kafka.controller_port
        host = settings.kafka.bootstrap.rsplit(":", 1)[0]
        return [
            ServerPort(name, port, "POLYCOMMIT_KAFKA_BOOTSTRAP", f"{host}:{port + 1000}"),
            ServerPort(name, controller, "POLYCOMMIT_KAFKA_CONTROLLER_PORT", str(controller + 1000)),
        ]
    if name == "neo4j":
        uri = urlsplit(settings.neo4j.uri)
        port = uri.port or 7687
        return [ServerPort(name, port, "POLYCOMMIT_NEO4J_URI", f"{uri.scheme}://{uri.hostname}:{port + 1000}")]
    return []  # qdrant runs embedded


def port_taken(port: int, host: str = HOST) -> bool:
    """Whether binding the port fails because it is in use (SO_REUSEADDR, as servers bind: a socket in
    TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _process(pid: str) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    return f"pid {pid} ({cmdline[:160] or '?'})"


def _holder_from_proc(port: int) -> str | None:
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not sockets:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                        return _process(pid)
    return None


def _holder_from_ss(port: int) -> str | None:
    if shutil.which("ss") is None:
        return None
    try:
        out = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "pid=" in line:
            pid = line.split("pid=", 1)[1].split(",", 1)[0]
            return _process(pid)
    return None


def holder(port: int) -> str | None:
    """The process listening on `port`, as `pid N (command line)`, or None when it cannot be seen."""
    return _holder_from_proc(port) or _holder_from_ss(port)


def in_use_message(entry: ServerPort) -> str:
    who = holder(entry.port) or "another process (not visible to this user)"
    return (
        f"{entry.server} cannot start: port {entry.port} on {HOST} is in use by {who}; "
        f"stop that process, or move {entry.server} with {entry.variable} (e.g. {entry.variable}={entry.example})"
    )


def require_free(settings: Settings, names: list[str]) -> None:
    """Raise PortInUseError, naming every taken port, before any of the servers `names` is started."""
    problems = [in_use_message(p) for name in names for p in server_ports(settings, name) if port_taken(p.port)]
    if problems:
        raise PortInUseError("\n".join(problems))


async def await_free(settings: Settings, names: list[str], grace_s: float = 10.0) -> None:
    """`require_free`, after a grace period: a server killed a moment ago (chaos, a crash test) may hold
    its listening socket until the kernel has finished tearing the process down."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            require_free(settings, names)
            return
        except PortInUseError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)  # polling the kernel's socket table: there is no event to await
