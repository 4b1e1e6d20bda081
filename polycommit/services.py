"""Start, probe, stop and reset the local servers polycommit runs against: PostgreSQL, Kafka and Neo4j.

Each server runs as a plain process on this machine, bound to 127.0.0.1, with its data under
`settings.data_dir/<name>`, its log in `settings.log_dir/<name>.log` and its pid in
`settings.run_dir/<name>.pid`. Readiness is always a real request (a PostgreSQL query, a Kafka metadata
request that lists a live broker, a Neo4j query), polled until a deadline; a server that misses it raises
`ServerStartError` with the tail of its log. Qdrant runs embedded (Qdrant Edge), so it only has a status.
Fault tests use `kill_server` and `start_servers(settings, [name])` to crash and restart one server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import getpass
import hashlib
import hmac
import importlib
import importlib.metadata
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from polycommit.config import Settings, load_settings

SERVERS: tuple[str, ...] = ("postgres", "kafka", "neo4j")
STATUS_NAMES: tuple[str, ...] = (*SERVERS, "qdrant")
START_DEADLINE_S: dict[str, float] = {"postgres": 60.0, "kafka": 60.0, "neo4j": 90.0}
STOP_GRACE_S = 30.0
POLL_INTERVAL_S = 0.2
PROBE_TIMEOUT_S = 3.0
LOG_TAIL_LINES = 40

KAFKA_MAIN = "kafka.Kafka"
NEO4J_MAIN = "polycommit.neo4j.Launcher"
# What a live process's command line must contain before we signal it: a pid file may outlive its
# process, and the kernel may have given that pid to something else since.
_PROCESS_MARKERS = {"kafka": KAFKA_MAIN, "neo4j": NEO4J_MAIN}


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


class _ProbeFailed(Exception):
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


def _pid_alive(pid: int) -> bool:
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


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def _server_pid(settings: Settings, name: str) -> int | None:
    """The pid of the live server process, or None; never a recycled pid of some other program."""
    if name == "postgres":
        pid = _read_pid(data_path(settings, "postgres") / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid) else None
    pid = _read_pid(pid_path(settings, name))
    if pid is None or not _pid_alive(pid):
        return None
    return pid if _PROCESS_MARKERS[name] in _cmdline(pid) else None


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _redact(text: str, settings: Settings) -> str:
    for secret in (settings.postgres.password, settings.neo4j.password):
        if secret:
            text = text.replace(secret, "***")
    return text


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise ServicesError("java is not installed: run scripts/setup")
    return found


def _launch(argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> int:
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


async def _run(argv: list[str], *, input_text: str | None = None, limit_s: float = 120.0) -> tuple[int, str]:
    """Run a short command to completion; returns its exit code and its combined output."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(
            proc.communicate(input_text.encode() if input_text is not None else None), limit_s
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {limit_s:.0f} s: {' '.join(argv)}"
    return proc.returncode or 0, out.decode(errors="replace")


async def _wait_gone(pid: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@contextlib.asynccontextmanager
async def _server_lock(settings: Settings, name: str) -> AsyncIterator[None]:
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


async def _wait_until_ready(
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
                f"not ready after {deadline_s:.0f} s; last probe: {_redact(last_error, settings)}",
                log,
                _redact(_log_tail(log), settings),
            )
        if alive is not None and not alive():
            raise ServerStartError(name, "the process exited while starting", log, _redact(_log_tail(log), settings))
        budget = min(PROBE_TIMEOUT_S, remaining)
        try:
            return await asyncio.wait_for(probe(budget), budget + 0.5)
        except (Exception, TimeoutError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))


def _require_password(settings: Settings, name: str) -> None:
    password = {"postgres": settings.postgres.password, "neo4j": settings.neo4j.password}.get(name)
    if password == "":
        variable = "POLYCOMMIT_PG_PASSWORD" if name == "postgres" else "POLYCOMMIT_NEO4J_PASSWORD"
        raise MissingSecretError(
            f"{name}: no password: {variable} is unset and {settings.home / 'secrets.env'} does not "
            "define it; run scripts/setup (it generates the secrets)"
        )


# -- PostgreSQL ----------------------------------------------------------------------------------------


def _pg_tool(tool: str) -> str:
    def version_key(path: Path) -> tuple[int, str]:
        version = path.parent.parent.name
        return (int(version) if version.isdigit() else -1, version)

    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=version_key)
    if found:
        return str(found[-1])
    which = shutil.which(tool)
    if which is None:
        raise ServicesError(f"PostgreSQL's {tool} is not installed: run scripts/setup")
    return which


def _pg_superuser() -> str:
    return "postgres" if os.geteuid() == 0 else getpass.getuser()


def _as_pg_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres OS user when we are root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _pg_socket_dir(settings: Settings) -> Path:
    """Unix socket paths are limited to ~107 bytes; a deep POLYCOMMIT_HOME falls back to /tmp."""
    preferred = settings.run_dir / "postgres"
    if len(str(preferred / f".s.PGSQL.{settings.postgres.port}.lock")) <= 100:
        return preferred
    digest = hashlib.sha256(str(settings.home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"polycommit-pg-{digest}"


def _own_for_postgres(path: Path, mode: int) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)


def _ensure_traversable_by_postgres(path: Path) -> None:
    """The postgres OS user must reach its data dir and log through every ancestor folder."""
    if os.geteuid() != 0:
        return
    uid = pwd.getpwnam("postgres").pw_uid
    for ancestor in reversed(path.parents):
        st = ancestor.stat()
        if st.st_uid == uid or st.st_mode & stat.S_IXOTH:
            continue
        ancestor.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _pg_conf(settings: Settings, socket_dir: Path) -> str:
    return "\n".join(
        [
            "# Written by polycommit/services.py at every start; edit there, not here.",
            "listen_addresses = '127.0.0.1'",
            f"port = {settings.postgres.port}",
            f"unix_socket_directories = '{socket_dir}'",
            "max_connections = 200",
            # PREPARE TRANSACTION needs a slot per prepared transaction; one per connection at least.
            "max_prepared_transactions = 200",
            "shared_buffers = 128MB",
            "fsync = on",
            "synchronous_commit = on",
            "full_page_writes = on",
            "password_encryption = 'scram-sha-256'",
            "timezone = 'UTC'",
            "log_timezone = 'UTC'",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "log_checkpoints = off",
            "",
        ]
    )


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL stores, computed here so the password never reaches its logs."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _pg_provision_sql(settings: Settings) -> str:
    pg = settings.postgres
    role, database = _sql_ident(pg.user), _sql_ident(pg.database)
    # PostgreSQL SASLpreps non-ASCII passwords; for those, let the server hash the plain text.
    secret = _scram_verifier(pg.password) if pg.password.isascii() else pg.password
    create_role = _sql_literal(f"CREATE ROLE {role} LOGIN")
    create_db = _sql_literal(f"CREATE DATABASE {database} OWNER {role}")
    return "\n".join(
        [
            f"SELECT {create_role} WHERE NOT EXISTS "
            f"(SELECT FROM pg_roles WHERE rolname = {_sql_literal(pg.user)}) \\gexec",
            f"ALTER ROLE {role} WITH LOGIN NOSUPERUSER CREATEDB PASSWORD {_sql_literal(secret)};",
            f"SELECT {create_db} WHERE NOT EXISTS "
            f"(SELECT FROM pg_database WHERE datname = {_sql_literal(pg.database)}) \\gexec",
            "",
        ]
    )


async def _pg_provision(settings: Settings, socket_dir: Path) -> None:
    """Create the application role and database (or reset the role's password to the configured one)."""
    where = ["-h", str(socket_dir), "-p", str(settings.postgres.port), "-U", _pg_superuser(), "-d", "postgres"]
    argv = _as_pg_user([_pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *where])
    code, out = await _run(argv, input_text=_pg_provision_sql(settings), limit_s=30)
    if code != 0:
        raise ServerStartError("postgres", f"provisioning the role and database failed: {_redact(out, settings)}")


async def _pg_probe(settings: Settings, budget_s: float) -> str:
    import asyncpg

    pg = settings.postgres
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.user, password=pg.password, database=pg.database, timeout=budget_s
    )
    try:
        if await conn.fetchval("select 1") != 1:
            raise _ProbeFailed("select 1 did not return 1")
        version = await conn.fetchval("show server_version")
        return str(version).split()[0]
    finally:
        await conn.close(timeout=budget_s)


async def _pg_initdb(settings: Settings, pgdata: Path) -> None:
    log = log_path(settings, "postgres")
    if await asyncio.to_thread(lambda: any(pgdata.iterdir())):
        raise ServerStartError("postgres", f"{pgdata} is not empty but holds no cluster; run reset", log)
    auth = ["--auth-local=peer", "--auth-host=scram-sha-256"]
    initdb = [_pg_tool("initdb"), "-D", str(pgdata), "-U", _pg_superuser(), "-E", "UTF8", "--locale=C"]
    argv = _as_pg_user([*initdb, *auth])
    code, out = await _run(argv, limit_s=120)
    with log.open("a") as handle:
        handle.write(out)
    if code != 0:
        raise ServerStartError("postgres", f"initdb failed (exit {code})", log, _log_tail(log))
    with (pgdata / "postgresql.conf").open("a") as handle:
        handle.write("\ninclude_if_exists = 'polycommit.conf'\n")


async def _start_postgres(settings: Settings, deadline_s: float) -> str:
    deadline = time.monotonic() + deadline_s
    pgdata = data_path(settings, "postgres")
    log = log_path(settings, "postgres")
    socket_dir = _pg_socket_dir(settings)
    for folder in (pgdata, socket_dir):
        folder.mkdir(parents=True, exist_ok=True)
        _own_for_postgres(folder, 0o700)
    log.touch(exist_ok=True)
    _own_for_postgres(log, 0o640)
    _ensure_traversable_by_postgres(pgdata)
    _ensure_traversable_by_postgres(log)
    fresh = not (pgdata / "PG_VERSION").exists()
    if fresh:
        await _pg_initdb(settings, pgdata)
    conf = pgdata / "polycommit.conf"
    conf.write_text(_pg_conf(settings, socket_dir))
    _own_for_postgres(conf, 0o600)

    pg_ctl = _pg_tool("pg_ctl")
    while _server_pid(settings, "postgres") is None:
        remaining = deadline - time.monotonic()
        argv = _as_pg_user(
            [pg_ctl, "start", "-D", str(pgdata), "-l", str(log), "-w", "-t", str(max(1, int(remaining)))]
        )
        code, out = await _run(argv, limit_s=max(1.0, remaining) + 5)
        if code == 0:
            break
        # Right after a kill -9 the old postmaster's children may still hold its shared memory for a
        # moment; the next attempt then succeeds.
        if time.monotonic() + 0.5 >= deadline:
            raise ServerStartError("postgres", f"pg_ctl start failed: {out.strip()}", log, _log_tail(log))
        await asyncio.sleep(0.5)

    provisioned = False
    if fresh:
        await _pg_provision(settings, socket_dir)
        provisioned = True

    async def probe(budget_s: float) -> str:
        nonlocal provisioned
        import asyncpg

        try:
            return await _pg_probe(settings, budget_s)
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError):
            # A new cluster (or a changed secret): create the role and database, then probe again.
            if provisioned:
                raise
            provisioned = True
            await _pg_provision(settings, socket_dir)
            return await _pg_probe(settings, budget_s)

    version = await _wait_until_ready(
        "postgres",
        settings,
        max(0.1, deadline - time.monotonic()),
        probe,
        alive=lambda: _server_pid(settings, "postgres") is not None,
    )
    pid = _server_pid(settings, "postgres")
    if pid is not None:
        pid_path(settings, "postgres").write_text(f"{pid}\n")
    return version


async def _stop_postgres(settings: Settings) -> None:
    pgdata = data_path(settings, "postgres")
    pid = _server_pid(settings, "postgres")
    if pid is not None:
        argv = _as_pg_user(
            [_pg_tool("pg_ctl"), "stop", "-D", str(pgdata), "-m", "fast", "-w", "-t", str(int(STOP_GRACE_S))]
        )
        code, out = await _run(argv, limit_s=STOP_GRACE_S + 10)
        if code != 0 and _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            if not await _wait_gone(pid, 10):
                raise ServicesError(f"postgres: pid {pid} survived SIGKILL ({out.strip()})")
    pid_path(settings, "postgres").unlink(missing_ok=True)


# -- Kafka -----------------------------------------------------------------------------------------------


def _kafka_libs(settings: Settings) -> Path:
    return settings.cache_dir / "kafka" / "libs"


def kafka_version(settings: Settings) -> str | None:
    """The broker's version, read from the jar that scripts/setup fetched (kafka_2.13-<version>.jar)."""
    for jar in sorted(_kafka_libs(settings).glob("kafka_2.13-*.jar")):
        version = jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")
        if version and version[0].isdigit() and "-" not in version:
            return version
    return None


def _kafka_properties(settings: Settings, log_dirs: Path) -> str:
    port = int(settings.kafka.bootstrap.rsplit(":", 1)[1])
    controller = settings.kafka.controller_port
    max_bytes = 4 * 1024 * 1024 + 64 * 1024
    return "\n".join(
        [
            "# Written by polycommit/services.py at every start; edit there, not here.",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={log_dirs}",
            # A broker restarted after kill -9 is fenced until its old session expires; keep that short.
            "broker.session.timeout.ms=3000",
            "broker.heartbeat.interval.ms=500",
            "offsets.topic.num.partitions=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.num.partitions=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "min.insync.replicas=1",
            "default.replication.factor=1",
            "num.partitions=1",
            "group.initial.rebalance.delay.ms=0",
            # KIP-890's server-side check that a partition joined the transaction answers clients
            # that predate it (aiokafka) with a retriable NOT_ENOUGH_REPLICAS, and each retry waits
            # retry_backoff_ms: 100 ms added to most transactional produces. Transaction protocol
            # v2 clients would not need this.
            "transaction.partition.verification.enable=false",
            "auto.create.topics.enable=false",
            f"message.max.bytes={max_bytes}",
            f"replica.fetch.max.bytes={max_bytes}",
            "num.network.threads=2",
            "num.io.threads=4",
            "log.retention.hours=168",
            "",
        ]
    )


_KAFKA_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by polycommit/services.py: everything to stdout, which the launcher sends to kafka.log. -->
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="STDOUT"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Logger name="kafka.server.KafkaConfig" level="WARN"/>
  </Loggers>
</Configuration>
"""


def _kafka_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


async def _port_open(address: str, budget_s: float) -> None:
    """Raise unless something accepts TCP connections at host:port (cheap, and logs nothing)."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), budget_s)
    except (OSError, TimeoutError) as exc:
        raise _ProbeFailed(f"nothing listens on {address}: {exc}") from exc
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _kafka_probe(settings: Settings, budget_s: float) -> str:
    from aiokafka.admin import AIOKafkaAdminClient

    # aiokafka logs an error for every refused connection; do not let a probe loop flood the caller's log.
    await _port_open(settings.kafka.bootstrap, budget_s)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap,
        client_id="polycommit-services",
        request_timeout_ms=max(500, int(budget_s * 1000)),
    )
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    # A broker restarted after a crash answers metadata requests while still fenced; it lists no live
    # broker until the controller lets it in.
    if not cluster.get("brokers"):
        raise _ProbeFailed("the broker answers but lists no live broker yet")
    return kafka_version(settings) or "unknown"


async def _start_kafka(settings: Settings, deadline_s: float) -> str:
    libs = _kafka_libs(settings)
    log = log_path(settings, "kafka")
    if kafka_version(settings) is None:
        raise ServerStartError("kafka", f"no Kafka jars in {libs}: run scripts/setup", log)
    home = data_path(settings, "kafka")
    log_dirs = home / "kraft"
    log_dirs.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    props.write_text(_kafka_properties(settings, log_dirs))
    log4j = home / "log4j2.xml"
    log4j.write_text(_KAFKA_LOG4J2)
    java = _java()
    classpath = f"{libs}/*"
    jvm_logging = f"-Dlog4j2.configurationFile={log4j}"
    if not (log_dirs / "meta.properties").exists():
        argv = [java, jvm_logging, "-cp", classpath, "kafka.tools.StorageTool", "format"]
        argv += ["-t", _kafka_cluster_id(), "-c", str(props)]
        code, out = await _run(argv, limit_s=deadline_s)
        with log.open("a") as handle:
            handle.write(out)
        if code != 0:
            raise ServerStartError("kafka", f"formatting the KRaft storage failed (exit {code})", log, _log_tail(log))
    argv = [java, "-Xmx256m", "-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    argv += ["-Djava.awt.headless=true", jvm_logging, "-cp", classpath, KAFKA_MAIN, str(props)]
    pid = _launch(argv, log, cwd=home)
    pid_path(settings, "kafka").write_text(f"{pid}\n")
    return await _wait_until_ready(
        "kafka", settings, deadline_s, lambda t: _kafka_probe(settings, t), alive=lambda: _pid_alive(pid)
    )


# -- Neo4j ---------------------------------------------------------------------------------------------


def _neo4j_port(settings: Settings) -> int:
    return urlsplit(settings.neo4j.uri).port or 7687


async def _neo4j_probe(settings: Settings, budget_s: float) -> str:
    from neo4j import AsyncGraphDatabase

    await _port_open(settings.neo4j.address, budget_s)
    driver = AsyncGraphDatabase.driver(
        settings.neo4j.uri,
        auth=(settings.neo4j.user, settings.neo4j.password),
        connection_timeout=budget_s,
        connection_acquisition_timeout=budget_s,
        max_transaction_retry_time=0,
    )
    try:
        await driver.verify_connectivity()
        async with driver.session() as session:
            result = await session.run("RETURN 1 AS one")
            record = await result.single()
            if record is None or record["one"] != 1:
                raise _ProbeFailed("RETURN 1 did not return 1")
            result = await session.run("CALL dbms.components() YIELD versions RETURN versions[0] AS version")
            component = await result.single()
            return str(component["version"]) if component is not None else "unknown"
    finally:
        await driver.close()


async def _start_neo4j(settings: Settings, deadline_s: float) -> str:
    cache = settings.cache_dir / "neo4j"
    log = log_path(settings, "neo4j")
    if not any((cache / "lib").glob("*.jar")) or not (cache / "classes").is_dir():
        raise ServerStartError(
            "neo4j", f"the embedded Neo4j is not built in {cache}: run scripts/setup (scripts/neo4j/build)", log
        )
    home = data_path(settings, "neo4j")
    home.mkdir(parents=True, exist_ok=True)
    argv = [_java(), "-Xmx512m", "-Djava.awt.headless=true"]
    # JVM flags that scripts/neo4j/build writes for Neo4j (module opens for its page cache, GC choice).
    if (cache / "jvm.options").is_file():
        argv.append(f"@{cache / 'jvm.options'}")
    argv += ["-cp", f"{cache}/lib/*:{cache}/classes", NEO4J_MAIN]
    argv += ["--home", str(home), "--bolt", f"127.0.0.1:{_neo4j_port(settings)}"]
    # The password goes through the environment: a command line is readable by every local user.
    env = {**os.environ, "POLYCOMMIT_NEO4J_PASSWORD": settings.neo4j.password}
    pid = _launch(argv, log, cwd=home, env=env)
    pid_path(settings, "neo4j").write_text(f"{pid}\n")
    return await _wait_until_ready(
        "neo4j", settings, deadline_s, lambda t: _neo4j_probe(settings, t), alive=lambda: _pid_alive(pid)
    )


# -- Qdrant (embedded; a status only) ------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


async def _qdrant_status(settings: Settings) -> ServerStatus:
    q = settings.qdrant
    extra = {"backend": q.backend}
    if q.url:
        from qdrant_client import AsyncQdrantClient

        extra["url"] = q.url
        client = AsyncQdrantClient(url=q.url, api_key=q.api_key, timeout=int(PROBE_TIMEOUT_S))
        try:
            await asyncio.wait_for(client.get_collections(), PROBE_TIMEOUT_S)
            info = await asyncio.wait_for(client.info(), PROBE_TIMEOUT_S)
            return ServerStatus("qdrant", q.address, info.version, True, None, extra)
        except (Exception, TimeoutError) as exc:
            extra["error"] = f"{type(exc).__name__}: {exc}"
            return ServerStatus("qdrant", q.address, None, False, None, extra)
        finally:
            await client.close()
    module, package = ("qdrant_edge", "qdrant-edge-py")
    path = q.edge_path
    if q.local_path is not None:
        module, package, path = ("qdrant_client", "qdrant-client", q.local_path)
    extra["path"] = str(path)
    try:
        version: str | None = importlib.metadata.version(package)
        importlib.import_module(module)
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        extra["error"] = f"{package} is not installed: {exc}"
        return ServerStatus("qdrant", q.address, None, False, None, extra)
    writable = os.access(_nearest_existing(path), os.W_OK)
    if not writable:
        extra["error"] = f"{_nearest_existing(path)} is not writable"
    return ServerStatus("qdrant", q.address, version, writable, None, extra)


# -- status, start, stop, reset ------------------------------------------------------------------------

_PROBES: dict[str, Callable[[Settings, float], Awaitable[str]]] = {
    "postgres": _pg_probe,
    "kafka": _kafka_probe,
    "neo4j": _neo4j_probe,
}
_STARTERS: dict[str, Callable[[Settings, float], Awaitable[str]]] = {
    "postgres": _start_postgres,
    "kafka": _start_kafka,
    "neo4j": _start_neo4j,
}


def _address_and_extra(settings: Settings, name: str) -> tuple[str, dict[str, str]]:
    if name == "postgres":
        return settings.postgres.address, {"dsn": settings.postgres.public_dsn}
    if name == "kafka":
        return settings.kafka.address, {"bootstrap": settings.kafka.bootstrap}
    return settings.neo4j.address, {"uri": settings.neo4j.uri}


async def _probe_status(settings: Settings, name: str, budget_s: float = PROBE_TIMEOUT_S) -> ServerStatus:
    if name == "qdrant":
        return await _qdrant_status(settings)
    address, extra = _address_and_extra(settings, name)
    pid = _server_pid(settings, name)
    version: str | None = kafka_version(settings) if name == "kafka" else None
    if pid is None:
        extra["error"] = "not running"
        return ServerStatus(name, address, version, False, None, extra)
    try:
        version = await asyncio.wait_for(_PROBES[name](settings, budget_s), budget_s + 0.5)
        healthy = True
    except (Exception, TimeoutError) as exc:
        healthy = False
        extra["error"] = _redact(f"{type(exc).__name__}: {exc}", settings)
    return ServerStatus(name, address, version, healthy, pid, extra)


def _check_names(names: Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    if names is None or len(names) == 0:
        return list(SERVERS)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ServicesError(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
    return list(dict.fromkeys(names))


async def _start_one(settings: Settings, name: str) -> ServerStatus:
    if name == "qdrant":
        return await _qdrant_status(settings)
    deadline_s = START_DEADLINE_S[name]
    async with _server_lock(settings, name):
        if _server_pid(settings, name) is not None:
            # Running already: healthy, or still starting (e.g. recovering after a crash); wait for it.
            await wait_ready(settings, name, deadline_s)
        else:
            await _STARTERS[name](settings, deadline_s)
    return await _probe_status(settings, name)


async def start_servers(settings: Settings, names: Sequence[str] | None = None) -> dict[str, ServerStatus]:
    """Start the named servers (default: postgres, kafka, neo4j) side by side; skip healthy ones.

    Returns each one's status once it answers a real request. Raises `MissingSecretError` before starting
    anything when a password is empty, and `ServerStartError` (naming the server and its log, with the log's
    tail) when one is not ready by its deadline; the others are still started.
    """
    selected = _check_names(names, STATUS_NAMES)
    for name in selected:
        _require_password(settings, name)
    for folder in (settings.data_dir, settings.log_dir, settings.run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    results = await asyncio.gather(*(_start_one(settings, n) for n in selected), return_exceptions=True)
    statuses: dict[str, ServerStatus] = {}
    failures: list[BaseException] = []
    for name, result in zip(selected, results, strict=True):
        if isinstance(result, ServerStatus):
            statuses[name] = result
        elif isinstance(result, Exception):
            failures.append(result)
        else:
            raise result
    if len(failures) == 1:
        raise failures[0]
    if failures:
        failed = [getattr(f, "name", "?") for f in failures]
        raise ServerStartError(", ".join(failed), "\n\n".join(str(f) for f in failures))
    return statuses


async def wait_ready(settings: Settings, name: str, deadline_s: float) -> ServerStatus:
    """Wait, without starting anything, until `name` answers a real request; `ServerStartError` if not."""
    _check_names([name], STATUS_NAMES)
    if name == "qdrant":
        return await _qdrant_status(settings)
    await _wait_until_ready(name, settings, deadline_s, lambda t: _PROBES[name](settings, t))
    return await _probe_status(settings, name)


async def _stop_one(settings: Settings, name: str) -> None:
    if name == "qdrant":
        return
    async with _server_lock(settings, name):
        if name == "postgres":
            await _stop_postgres(settings)
            return
        pid = _server_pid(settings, name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not await _wait_gone(pid, STOP_GRACE_S):
                os.kill(pid, signal.SIGKILL)
                if not await _wait_gone(pid, 10):
                    raise ServicesError(f"{name}: pid {pid} survived SIGKILL")
        pid_path(settings, name).unlink(missing_ok=True)


async def stop_servers(settings: Settings, names: Sequence[str] | None = None) -> None:
    """Stop the named servers (default: all) by their pids: SIGTERM, then SIGKILL after ~30 s."""
    selected = _check_names(names, STATUS_NAMES)
    if not settings.run_dir.exists() and not settings.data_dir.exists():
        return
    results = await asyncio.gather(*(_stop_one(settings, n) for n in selected), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise ServicesError("; ".join(str(f) for f in failures))


async def server_status(settings: Settings) -> dict[str, ServerStatus]:
    """Probe every server (postgres, kafka, neo4j) and the embedded Qdrant once, side by side."""
    results = await asyncio.gather(*(_probe_status(settings, n) for n in STATUS_NAMES))
    return dict(zip(STATUS_NAMES, results, strict=True))


async def reset_servers(settings: Settings) -> None:
    """Stop everything, then delete data, logs and pids; `secrets.env` and the caches stay."""
    await stop_servers(settings)
    for folder in (settings.data_dir, settings.log_dir, settings.run_dir, _pg_socket_dir(settings)):
        if folder.exists():
            await asyncio.to_thread(shutil.rmtree, folder)


def kill_server(settings: Settings, name: str, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to the server's main process (the postmaster for postgres); returns its pid."""
    _check_names([name], SERVERS)
    pid = _server_pid(settings, name)
    if pid is None:
        raise ServicesError(f"{name} is not running")
    os.kill(pid, sig)
    return pid


# -- command line ----------------------------------------------------------------------------------------


def _print_table(statuses: dict[str, ServerStatus]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="polycommit servers")
    for column in ("server", "address", "version", "healthy", "pid"):
        table.add_column(column)
    for name, status in statuses.items():
        healthy = "[green]yes[/green]" if status.healthy else f"[red]no[/red] {status.extra.get('error', '')}"
        table.add_row(name, status.address, status.version or "-", healthy, str(status.pid or "-"))
    Console().print(table)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/services", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start servers (default: postgres, kafka, neo4j)")
    start.add_argument("names", nargs="*", metavar="name", help=f"one of {', '.join(STATUS_NAMES)}")
    stop = commands.add_parser("stop", help="stop servers (default: all)")
    stop.add_argument("names", nargs="*", metavar="name", help=f"one of {', '.join(STATUS_NAMES)}")
    status = commands.add_parser("status", help="probe every server")
    status.add_argument("--json", action="store_true", help="print one JSON object keyed by server")
    commands.add_parser("reset", help="stop all, delete data, logs and pids (keeps secrets and caches)")
    return parser


def run_services_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    # Probes hit ports that are not listening yet; the client libraries would log every refusal.
    for noisy in ("aiokafka", "neo4j", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    settings = load_settings()
    started = time.monotonic()
    try:
        if args.command == "start":
            statuses = asyncio.run(start_servers(settings, args.names))
            _print_table(statuses)
            print(f"ready in {time.monotonic() - started:.1f} s")
            return 0 if all(s.healthy for s in statuses.values()) else 1
        if args.command == "stop":
            asyncio.run(stop_servers(settings, args.names))
            print(f"stopped in {time.monotonic() - started:.1f} s")
            return 0
        if args.command == "status":
            statuses = asyncio.run(server_status(settings))
            if args.json:
                print(json.dumps(statuses_to_json(statuses), indent=2))
            else:
                _print_table(statuses)
            return 0 if all(s.healthy for s in statuses.values()) else 1
        asyncio.run(reset_servers(settings))
        print(f"reset: removed {settings.data_dir}, {settings.log_dir} and {settings.run_dir}")
        return 0
    except ServicesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(run_services_command(sys.argv[1:]))
