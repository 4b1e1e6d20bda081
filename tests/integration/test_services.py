"""The local servers as `scripts/services` runs them: status, listening addresses, a whole lifecycle.

Real servers, real processes: a server that is down makes these tests FAIL (CI starts them with
`scripts/services start`); nothing here skips for that. The lifecycle test runs its own PostgreSQL and
Kafka on an isolated POLYCOMMIT_HOME and free ports, so the shared servers are left alone. Waits are
events with deadlines (a pidfd for a process's exit, a subprocess's end), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from polycommit.config import Settings, load_settings
from polycommit.tooling.servers import postgres_cluster
from polycommit.tooling.services import (
    SERVERS,
    STATUS_NAMES,
    ServerStatus,
    await_pid_exit,
    data_path,
    pid_path,
    reset_servers,
    server_status,
    start_servers,
    statuses_to_json,
    stop_servers,
)

pytestmark = pytest.mark.servers

LOOPBACK = frozenset({"127.0.0.1", "::ffff:127.0.0.1"})
CLI_DEADLINE_S = 60.0
EXIT_DEADLINE_S = 15.0

# Under POLYCOMMIT_TESTCONTAINERS (tests/containers.py) the shared servers are containers: there are no
# local processes or pid files to check, so conftest deselects the tests marked with this (a server that
# is down still fails every test).
local_processes = pytest.mark.local_processes


# -- helpers: processes and their listening sockets, from /proc -------------------------------------------


def _decode_address(field: str) -> tuple[str, int]:
    """`0100007F:D8F0` from /proc/<pid>/net/tcp{,6} → ('127.0.0.1', 55536)."""
    hex_ip, hex_port = field.split(":")
    raw = bytes.fromhex(hex_ip)
    if sys.byteorder == "little":
        # The kernel prints the address as 32-bit words in host byte order.
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(hex_port, 16)


def _process_tree(pid: int) -> set[int]:
    """`pid` and its descendants (a postmaster's children, say), from the parent pid in /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    tree = {pid}
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return tree


def _listening(pid: int) -> set[tuple[str, int]]:
    """Every TCP (v4 and v6) address:port in LISTEN state held by `pid` or one of its descendants."""
    inodes: set[str] = set()
    for member in _process_tree(pid):
        try:
            fds = list(Path(f"/proc/{member}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found: set[tuple[str, int]] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = TCP_LISTEN
                found.add(_decode_address(local))
    return found


def _assert_loopback_only(name: str, pid: int, ports: set[int]) -> None:
    addresses = _listening(pid)
    assert addresses, f"{name} (pid {pid}) listens on nothing"
    beyond = sorted(a for a in addresses if a[0] not in LOOPBACK)
    assert not beyond, f"{name} (pid {pid}) listens beyond 127.0.0.1: {beyond} (all: {sorted(addresses)})"
    assert ports <= {port for _, port in addresses}, (
        f"{name} (pid {pid}) should listen on ports {sorted(ports)}; it listens on {sorted(addresses)}"
    )


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells it apart from a later user of its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _gone(pid: int, started: str | None) -> bool:
    """No such process any more: absent from /proc, its pid reused, or a zombie awaiting its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return _start_time(pid) != started or state in ("Z", "X")


async def _run(argv: list[str], deadline_s: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), deadline_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(argv)} did not finish within {deadline_s:.0f} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, all different (each socket is held open until all are picked)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _assert_no_secret(text: str, settings: Settings) -> None:
    for secret in (settings.postgres.password, settings.neo4j.password):
        assert secret, "a password is empty: run scripts/setup"
        assert secret not in text, "a password leaked into the status output"


# -- the shared servers ---------------------------------------------------------------------------------


@local_processes
async def test_server_status_reports_every_server_healthy_with_its_address(settings: Settings) -> None:
    statuses = await server_status(settings)

    assert tuple(statuses) == STATUS_NAMES == ("postgres", "kafka", "neo4j", "qdrant")
    for name, status in statuses.items():
        assert status.healthy, f"{name} is not healthy: {status.extra.get('error')}"
        assert status.version, f"{name} reports no version"
    for name in ("postgres", "kafka", "neo4j"):
        assert statuses[name].pid is not None, f"{name} has no pid"

    pg, kafka, neo4j, qdrant = (statuses[n] for n in STATUS_NAMES)
    assert pg.address == settings.postgres.address == f"{settings.postgres.host}:{settings.postgres.port}"
    dsn = urlsplit(pg.extra["dsn"])
    assert dsn.scheme == "postgresql"
    assert dsn.password is None, "the dsn in the status must not carry the password"
    pg_settings = settings.postgres
    assert (dsn.username, dsn.hostname, dsn.port) == (pg_settings.user, pg_settings.host, pg_settings.port)
    assert dsn.path == f"/{settings.postgres.database}"
    assert kafka.address == kafka.extra["bootstrap"] == settings.kafka.bootstrap
    assert neo4j.extra["uri"] == settings.neo4j.uri
    assert neo4j.address == settings.neo4j.address
    assert qdrant.address == settings.qdrant.address
    assert qdrant.extra["backend"] == settings.qdrant.backend
    _assert_no_secret(json.dumps(statuses_to_json(statuses)) + repr(statuses), settings)


@local_processes
async def test_cli_services_status_json_prints_one_object_and_exits_0(settings: Settings) -> None:
    cli = Path(sys.executable).parent / "polycommit"
    code, out, err = await _run([str(cli), "services", "status", "--json"], CLI_DEADLINE_S)

    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    document = json.loads(out)  # the whole of stdout is one JSON document
    assert isinstance(document, dict)
    assert set(document) == set(STATUS_NAMES)
    for name, entry in document.items():
        assert entry["healthy"] is True, f"{name}: {entry}"
        assert entry["address"] and entry["version"], f"{name}: {entry}"
    assert document["postgres"]["dsn"] == settings.postgres.public_dsn
    assert urlsplit(document["postgres"]["dsn"]).password is None
    assert document["kafka"]["bootstrap"] == settings.kafka.bootstrap
    assert document["neo4j"]["uri"] == settings.neo4j.uri
    _assert_no_secret(out + err, settings)


@local_processes
async def test_every_server_process_listens_on_127_0_0_1_only(settings: Settings) -> None:
    statuses = await server_status(settings)
    kafka_port = int(settings.kafka.bootstrap.rsplit(":", 1)[1])
    neo4j_port = urlsplit(settings.neo4j.uri).port
    assert neo4j_port is not None
    expected = {
        "postgres": {settings.postgres.port},
        "kafka": {kafka_port, settings.kafka.controller_port},
        "neo4j": {neo4j_port},
    }
    for name, ports in expected.items():
        assert statuses[name].healthy, f"{name} is not healthy: {statuses[name].extra.get('error')}"
        pid = statuses[name].pid
        assert pid is not None, f"{name} is not running: {statuses[name].extra.get('error')}"
        assert pid_path(settings, name).read_text().split()[0] == str(pid), f"{name}: pid file disagrees"
        _assert_loopback_only(name, pid, ports)


# -- a whole lifecycle on an isolated home -----------------------------------------------------------------


@pytest.fixture
async def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Settings]:
    """Settings for a fresh POLYCOMMIT_HOME under tmp_path, on free ports, with the shared passwords."""
    shared = load_settings()
    assert shared.postgres.password, "no PostgreSQL password: run scripts/setup"
    home = tmp_path / "home"
    home.mkdir()
    pg_port, kafka_port, controller_port = _free_ports(3)
    for name in ("POLYCOMMIT_PG_USER", "POLYCOMMIT_PG_DATABASE", "POLYCOMMIT_QDRANT_EDGE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POLYCOMMIT_HOME", str(home))
    monkeypatch.setenv("POLYCOMMIT_PG_HOST", "127.0.0.1")
    monkeypatch.setenv("POLYCOMMIT_PG_PORT", str(pg_port))
    monkeypatch.setenv("POLYCOMMIT_PG_PASSWORD", shared.postgres.password)
    monkeypatch.setenv("POLYCOMMIT_NEO4J_PASSWORD", shared.neo4j.password)
    monkeypatch.setenv("POLYCOMMIT_KAFKA_BOOTSTRAP", f"127.0.0.1:{kafka_port}")
    monkeypatch.setenv("POLYCOMMIT_KAFKA_CONTROLLER_PORT", str(controller_port))
    # A secrets file as scripts/setup writes it: reset must keep it.
    lines = f"POLYCOMMIT_PG_PASSWORD={shared.postgres.password}\nPOLYCOMMIT_NEO4J_PASSWORD={shared.neo4j.password}\n"
    fd = os.open(home / "secrets.env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(lines)
    settings = load_settings()
    assert settings.home == home.resolve()
    assert settings.postgres.port == pg_port and settings.kafka.bootstrap == f"127.0.0.1:{kafka_port}"
    assert settings.kafka.controller_port == controller_port
    try:
        yield settings
    finally:
        # Whatever happened, leave no server of this home running and no data behind.
        await reset_servers(settings)


async def test_start_stop_reset_on_an_isolated_home(isolated: Settings, settings: Settings) -> None:
    home = isolated
    # Nothing of the shared servers' is shared: home, data, pids, locks and ports all differ.
    assert home.home != settings.home and home.postgres.port != settings.postgres.port
    assert home.kafka.bootstrap != settings.kafka.bootstrap
    assert home.kafka.controller_port != settings.kafka.controller_port
    assert _pid_files(home) == dict.fromkeys(SERVERS), "the isolated home is not fresh"
    outside = _modes_outside(home)

    statuses = await start_servers(home, ["postgres", "kafka"])

    assert set(statuses) == {"postgres", "kafka"}
    for name, status in statuses.items():
        assert status.healthy, f"{name}: {status.extra.get('error')}"
        assert status.version and status.pid is not None, f"{name}: {status}"
    assert statuses["postgres"].address == home.postgres.address
    assert statuses["kafka"].address == home.kafka.bootstrap
    cluster = postgres_cluster.locate(home)
    assert (cluster.data / "PG_VERSION").is_file()
    assert (data_path(home, "kafka") / "kraft" / "meta.properties").is_file()
    _assert_private(home, cluster)
    assert _modes_outside(home) == outside, "starting changed the mode of a folder outside polycommit's own"
    pids = {name: _pid(status) for name, status in statuses.items()}
    started = {name: _start_time(pid) for name, pid in pids.items()}
    kafka_port = int(home.kafka.bootstrap.rsplit(":", 1)[1])
    _assert_loopback_only("postgres", pids["postgres"], {home.postgres.port})
    _assert_loopback_only("kafka", pids["kafka"], {kafka_port, home.kafka.controller_port})

    await stop_servers(home)

    await asyncio.gather(*(await_pid_exit(pid, EXIT_DEADLINE_S) for pid in pids.values()))
    for name, pid in pids.items():
        assert _gone(pid, started[name]), f"{name} (pid {pid}) still runs after stop_servers"
        assert not pid_path(home, name).exists(), f"{name}: pid file left behind"
    assert home.data_dir.is_dir(), "stop must keep the data"
    assert postgres_cluster.locate(home) == cluster, "stop must find the cluster where start recorded it"
    assert (cluster.data / "PG_VERSION").is_file(), "stop must keep the cluster"

    secrets = home.home / "secrets.env"
    kept = secrets.read_bytes()
    await reset_servers(home)

    assert not home.data_dir.exists(), "reset must delete the data"
    assert not home.log_dir.exists() and not home.run_dir.exists(), "reset must delete the logs and pids"
    assert secrets.read_bytes() == kept, "reset must keep secrets.env"
    for folder in (cluster.root, cluster.data, cluster.sockets):
        assert folder is None or not folder.exists(), f"reset left the PostgreSQL cluster's {folder}"
    assert _modes_outside(home) == outside, "the lifecycle changed the mode of a folder outside polycommit's own"


def _modes_outside(settings: Settings) -> dict[str, int]:
    """The modes of the folders around the home that no tool of ours may change: `/`, every parent of the
    home, the temp dir and the PostgreSQL OS user's home (where the cluster goes when we are root)."""
    folders = {Path("/"), *settings.home.parents, Path(tempfile.gettempdir())}
    with contextlib.suppress(KeyError):
        folders.add(Path(pwd.getpwnam("postgres").pw_dir))
    return {str(f): stat.S_IMODE(f.stat().st_mode) for f in sorted(folders) if f.exists()}


def _assert_private(settings: Settings, cluster: postgres_cluster.ClusterPaths) -> None:
    """Every folder that holds user data or logs is 0700; the cluster's belong to the server's OS user."""
    kafka_logs = data_path(settings, "kafka") / "kraft"
    for folder in (settings.home, settings.data_dir, settings.log_dir, settings.run_dir, kafka_logs, cluster.data):
        mode = stat.S_IMODE(folder.stat().st_mode)
        assert mode == 0o700, f"{folder} has mode {mode:o}, not 700"
    assert stat.S_IMODE(cluster.log.stat().st_mode) & 0o077 == 0, f"{cluster.log} is readable by others"
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres").pw_uid
        assert cluster.root is not None, "as root, the cluster lives in the postgres user's folder"
        assert settings.home not in cluster.root.parents, "as root, the cluster must not need a path into the home"
        for folder in (cluster.root, cluster.data, cluster.sockets):
            st = folder.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner, 0o700), (
                f"{folder}: uid {st.st_uid} mode {st.st_mode:o}"
            )


def _pid_files(settings: Settings) -> dict[str, str | None]:
    return {
        name: (pid_path(settings, name).read_text() if pid_path(settings, name).exists() else None) for name in SERVERS
    }


def _pid(status: ServerStatus) -> int:
    assert status.pid is not None, f"{status.name} has no pid"
    return status.pid
