"""Start, probe, stop and reset the local servers polycommit runs against: PostgreSQL, Kafka and Neo4j.

Each server runs as a plain process on this machine, bound to 127.0.0.1, with its data under
`settings.data_dir/<name>`, its log in `settings.log_dir/<name>.log` and its pid in
`settings.run_dir/<name>.pid`; those folders are private (0700). PostgreSQL, which runs as its own OS
user when we are root, keeps its cluster in that user's directory instead (`servers.postgres_cluster`).
Readiness is always a real request (a PostgreSQL query, a Kafka metadata request that lists a live
broker, a Neo4j query), polled until a deadline; a server that misses it raises `ServerStartError` with
the tail of its log. Qdrant runs embedded (Qdrant Edge), so it only has a status.
Fault tests use `kill_server` and `start_servers(settings, [name])` to crash and restart one server.

This module is the lifecycle and the `scripts/services` command line; what is particular to one server
lives in `polycommit.tooling.servers.<name>`, the process plumbing they share in `polycommit.tooling.servers.process`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence

from polycommit.config import Settings, load_settings
from polycommit.tooling.servers import kafka, neo4j, ports, postgres, postgres_cluster, qdrant
from polycommit.tooling.servers.kafka import KAFKA_MAIN, kafka_version
from polycommit.tooling.servers.neo4j import NEO4J_MAIN
from polycommit.tooling.servers.private import private_dir
from polycommit.tooling.servers.process import (
    LOG_TAIL_LINES,
    POLL_INTERVAL_S,
    PROBE_TIMEOUT_S,
    STOP_GRACE_S,
    MissingSecretError,
    Server,
    ServerStartError,
    ServerStatus,
    ServicesError,
    await_pid_exit,
    data_path,
    log_path,
    pid_path,
    redact,
    require_password,
    server_lock,
    statuses_to_json,
    wait_until_ready,
)

__all__ = [
    "KAFKA_MAIN",
    "LOG_TAIL_LINES",
    "NEO4J_MAIN",
    "POLL_INTERVAL_S",
    "PROBE_TIMEOUT_S",
    "SERVERS",
    "START_DEADLINE_S",
    "STATUS_NAMES",
    "STOP_GRACE_S",
    "MissingSecretError",
    "ServerStartError",
    "ServerStatus",
    "ServicesError",
    "await_pid_exit",
    "data_path",
    "kafka_version",
    "kill_server",
    "log_path",
    "pid_path",
    "reset_servers",
    "run_services_command",
    "server_status",
    "start_servers",
    "statuses_to_json",
    "stop_servers",
    "wait_ready",
]

_SERVERS: dict[str, Server] = {s.name: s for s in (postgres.SERVER, kafka.SERVER, neo4j.SERVER)}
SERVERS: tuple[str, ...] = tuple(_SERVERS)
STATUS_NAMES: tuple[str, ...] = (*SERVERS, "qdrant")
START_DEADLINE_S: dict[str, float] = {name: s.start_deadline_s for name, s in _SERVERS.items()}


# -- status, start, stop, reset ------------------------------------------------------------------------


async def _probe_status(settings: Settings, name: str, budget_s: float = PROBE_TIMEOUT_S) -> ServerStatus:
    if name == "qdrant":
        return await qdrant.status(settings)
    server = _SERVERS[name]
    address, extra = server.address(settings)
    pid = server.pid(settings)
    version = server.installed_version(settings)
    if pid is None:
        extra["error"] = "not running"
        return ServerStatus(name, address, version, False, None, extra)
    try:
        version = await asyncio.wait_for(server.probe(settings, budget_s), budget_s + 0.5)
        healthy = True
    except (Exception, TimeoutError) as exc:
        healthy = False
        extra["error"] = redact(f"{type(exc).__name__}: {exc}", settings)
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
        return await qdrant.status(settings)
    server = _SERVERS[name]
    async with server_lock(settings, name):
        if server.pid(settings) is not None and server.stale(settings):
            await server.stop(settings)
        if server.pid(settings) is not None:
            # Running already: healthy, or still starting (e.g. recovering after a crash); wait for it.
            await wait_ready(settings, name, server.start_deadline_s)
        else:
            await server.start(settings, server.start_deadline_s)
    return await _probe_status(settings, name)


async def start_servers(settings: Settings, names: Sequence[str] | None = None) -> dict[str, ServerStatus]:
    """Start the named servers (default: postgres, kafka, neo4j) side by side; skip healthy ones.

    Returns each one's status once it answers a real request. Raises `MissingSecretError` before starting
    anything when a password is empty, and `ServerStartError` (naming the server and its log, with the log's
    tail) when one is not ready by its deadline; the others are still started.
    """
    selected = _check_names(names, STATUS_NAMES)
    for name in selected:
        require_password(settings, name)
    # Every port of a server not yet running is tried first: a taken one is named, with its holder and
    # the variable that moves it, instead of failing deep inside the server.
    await ports.await_free(settings, [n for n in selected if n in _SERVERS and _SERVERS[n].pid(settings) is None])
    await asyncio.to_thread(private_folders, settings)
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


def private_folders(settings: Settings) -> None:
    """The home and its data, log and run folders, and the Qdrant Edge storage, 0700: they hold what
    applications wrote, compensation before-images included. Only the home's own tree is tightened; an
    Edge folder configured outside it is created private but an existing one is left as it is."""
    for folder in (settings.home, settings.data_dir, settings.log_dir, settings.run_dir):
        private_dir(folder, settings.home)
    edge = settings.qdrant.edge_path.absolute()
    if settings.home.absolute() in edge.parents:
        private_dir(edge, settings.home)
    elif not edge.exists():
        private_dir(edge, edge)


async def wait_ready(settings: Settings, name: str, deadline_s: float) -> ServerStatus:
    """Wait, without starting anything, until `name` answers a real request; `ServerStartError` if not."""
    _check_names([name], STATUS_NAMES)
    if name == "qdrant":
        return await qdrant.status(settings)
    probe = _SERVERS[name].probe
    await wait_until_ready(name, settings, deadline_s, lambda t: probe(settings, t))
    return await _probe_status(settings, name)


async def _stop_one(settings: Settings, name: str) -> None:
    if name == "qdrant":
        return
    async with server_lock(settings, name):
        await _SERVERS[name].stop(settings)


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
    """Stop everything, then delete data (the PostgreSQL cluster's included, wherever it is), logs and
    pids; `secrets.env` and the caches stay."""
    await stop_servers(settings)
    # The PostgreSQL cluster may live outside the home (see postgres_cluster): found from the run state,
    # so it goes before the run folder does.
    await asyncio.to_thread(postgres_cluster.remove, settings)
    for folder in (settings.data_dir, settings.log_dir, settings.run_dir):
        if folder.exists():
            await asyncio.to_thread(shutil.rmtree, folder)


def kill_server(settings: Settings, name: str, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to the server's main process (the postmaster for postgres); returns its pid."""
    _check_names([name], SERVERS)
    pid = _SERVERS[name].pid(settings)
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
    start.add_argument(
        "--kafka-brokers",
        type=int,
        choices=(1, 2, 3),
        help="run Kafka as a cluster of this many brokers (kept until reset; 3: replication factor 3, "
        "min.insync.replicas 2)",
    )
    stop = commands.add_parser("stop", help="stop servers (default: all)")
    stop.add_argument("names", nargs="*", metavar="name", help=f"one of {', '.join(STATUS_NAMES)}")
    status = commands.add_parser("status", help="probe every server")
    status.add_argument("--json", action="store_true", help="print one JSON object keyed by server")
    commands.add_parser("reset", help="stop all, delete data, logs and pids (keeps secrets and caches)")
    env = commands.add_parser("env", help="the connection settings as shell exports (psql, cypher-shell)")
    env.add_argument("--show-secrets", action="store_true", help="include the passwords")
    return parser


def run_services_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    # Probes hit ports that are not listening yet; the client libraries would log every refusal.
    for noisy in ("aiokafka", "neo4j", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    if getattr(args, "kafka_brokers", None):
        os.environ["POLYCOMMIT_KAFKA_BROKERS"] = str(args.kafka_brokers)  # config.py builds the bootstrap list
    settings = load_settings()
    if args.command == "env":
        from polycommit.tooling.service_env import render

        print(render(settings, show_secrets=args.show_secrets))
        return 0
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
