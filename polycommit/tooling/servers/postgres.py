"""The local PostgreSQL server: its cluster, configuration, role and database, start, probe and stop.

PostgreSQL runs through its own tools (initdb, pg_ctl, psql), as the postgres OS user when we are root;
where its cluster lives (that user's directory, not the home) is `postgres_cluster`'s to decide. Its pid
is the postmaster's, read from the cluster's `postmaster.pid`; readiness is a real query.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import hmac
import os
import pwd
import shutil
import signal
import time
from pathlib import Path

from polycommit.config import Settings
from polycommit.tooling.servers import postgres_cluster as cluster
from polycommit.tooling.servers.process import (
    STOP_GRACE_S,
    ProbeFailed,
    Server,
    ServerStartError,
    ServicesError,
    log_tail,
    pid_alive,
    pid_path,
    read_pid,
    redact,
    run,
    wait_gone,
    wait_until_ready,
)


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


def _pg_conf(settings: Settings, sockets: Path) -> str:
    return "\n".join(
        [
            "# Written by polycommit/tooling/servers/postgres.py at every start; edit there, not here.",
            "listen_addresses = '127.0.0.1'",
            f"port = {settings.postgres.port}",
            f"unix_socket_directories = '{sockets}'",
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


async def _pg_provision(settings: Settings, sockets: Path) -> None:
    """Create the application role and database (or reset the role's password to the configured one)."""
    where = ["-h", str(sockets), "-p", str(settings.postgres.port), "-U", _pg_superuser(), "-d", "postgres"]
    argv = _as_pg_user([_pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *where])
    code, out = await run(argv, input_text=_pg_provision_sql(settings), limit_s=30)
    if code != 0:
        raise ServerStartError("postgres", f"provisioning the role and database failed: {redact(out, settings)}")


async def probe(settings: Settings, budget_s: float) -> str:
    import asyncpg

    pg = settings.postgres
    conn = await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.user, password=pg.password, database=pg.database, timeout=budget_s
    )
    try:
        if await conn.fetchval("select 1") != 1:
            raise ProbeFailed("select 1 did not return 1")
        version = await conn.fetchval("show server_version")
        return str(version).split()[0]
    finally:
        await conn.close(timeout=budget_s)


def server_pid(settings: Settings) -> int | None:
    """The live postmaster's pid, from the cluster's own `postmaster.pid`."""
    pid = read_pid(cluster.locate(settings).data / "postmaster.pid")
    return pid if pid is not None and pid_alive(pid) else None


async def _pg_initdb(pgdata: Path, log: Path) -> None:
    if await asyncio.to_thread(lambda: any(pgdata.iterdir())):
        raise ServerStartError("postgres", f"{pgdata} is not empty but holds no cluster; run reset", log)
    auth = ["--auth-local=peer", "--auth-host=scram-sha-256"]
    initdb = [_pg_tool("initdb"), "-D", str(pgdata), "-U", _pg_superuser(), "-E", "UTF8", "--locale=C"]
    argv = _as_pg_user([*initdb, *auth])
    code, out = await run(argv, limit_s=120)
    with log.open("a") as handle:
        handle.write(out)
    if code != 0:
        raise ServerStartError("postgres", f"initdb failed (exit {code})", log, log_tail(log))
    with (pgdata / "postgresql.conf").open("a") as handle:
        handle.write("\ninclude_if_exists = 'polycommit.conf'\n")


async def _prepare_cluster(settings: Settings) -> tuple[cluster.ClusterPaths, bool]:
    """The cluster's folders (see `postgres_cluster`) and configuration; a new cluster if there is none.
    Returns its paths and whether it is new (its role and database are then still to be provisioned)."""
    paths = await asyncio.to_thread(cluster.prepare, settings)
    fresh = not (paths.data / "PG_VERSION").exists()
    if fresh:
        await _pg_initdb(paths.data, paths.log)
    conf = paths.data / "polycommit.conf"
    conf.write_text(_pg_conf(settings, paths.sockets))
    _own_for_postgres(conf, 0o600)
    return paths, fresh


def _own_for_postgres(path: Path, mode: int) -> None:
    if cluster.as_server_user():
        entry = pwd.getpwnam(cluster.SERVER_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)


async def _pg_ctl_start(settings: Settings, paths: cluster.ClusterPaths, deadline: float) -> None:
    pgdata, log = paths.data, paths.log
    pg_ctl = _pg_tool("pg_ctl")
    while server_pid(settings) is None:
        remaining = deadline - time.monotonic()
        argv = _as_pg_user(
            [pg_ctl, "start", "-D", str(pgdata), "-l", str(log), "-w", "-t", str(max(1, int(remaining)))]
        )
        code, out = await run(argv, limit_s=max(1.0, remaining) + 5)
        if code == 0:
            break
        # Right after a kill -9 the old postmaster's children may still hold its shared memory for a
        # moment; the next attempt then succeeds.
        if time.monotonic() + 0.5 >= deadline:
            raise ServerStartError("postgres", f"pg_ctl start failed: {out.strip()}", log, log_tail(log))
        await asyncio.sleep(0.5)


async def start(settings: Settings, deadline_s: float) -> str:
    deadline = time.monotonic() + deadline_s
    paths, fresh = await _prepare_cluster(settings)
    sockets = paths.sockets
    await _pg_ctl_start(settings, paths, deadline)

    provisioned = False
    if fresh:
        await _pg_provision(settings, sockets)
        provisioned = True

    async def provisioning_probe(budget_s: float) -> str:
        nonlocal provisioned
        import asyncpg

        try:
            return await probe(settings, budget_s)
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError):
            # A new cluster (or a changed secret): create the role and database, then probe again.
            if provisioned:
                raise
            provisioned = True
            await _pg_provision(settings, sockets)
            return await probe(settings, budget_s)

    version = await wait_until_ready(
        "postgres",
        settings,
        max(0.1, deadline - time.monotonic()),
        provisioning_probe,
        alive=lambda: server_pid(settings) is not None,
    )
    pid = server_pid(settings)
    if pid is not None:
        pid_path(settings, "postgres").write_text(f"{pid}\n")
    return version


async def stop(settings: Settings) -> None:
    """A fast shutdown (SIGINT to the postmaster, which is what `pg_ctl stop -m fast` sends), by pid: it
    needs no path to the cluster, so it also stops a cluster whose folders its OS user can no longer
    reach. SIGKILL after the grace period."""
    pid = server_pid(settings)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        if not await wait_gone(pid, STOP_GRACE_S) and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            if not await wait_gone(pid, 10):
                raise ServicesError(f"postgres: pid {pid} survived SIGKILL")
    pid_path(settings, "postgres").unlink(missing_ok=True)


def address(settings: Settings) -> tuple[str, dict[str, str]]:
    return settings.postgres.address, {"dsn": settings.postgres.public_dsn}


SERVER = Server("postgres", 60.0, start, probe, server_pid, stop, address)
