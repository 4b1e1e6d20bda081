"""The `polycommit` command: servers, topics, workers, status, the demo and the benchmark.

Exit codes: 0 success, 1 the action ran but found a problem (unhealthy server, stuck transactions,
failed transactions in the demo), 2 bad usage. `--json` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiokafka.errors import KafkaError

from consumers.postgres.failures import quiet_pool_restores
from polycommit.config import load_settings
from polycommit.errors import PolycommitError
from polycommit.events import STORES
from polycommit.tooling import dead_letter_replay, gc_tuning, kafka_tuning, tx
from polycommit.tooling.event_loop import event_loop_factory

METRICS_HELP = "serve Prometheus metrics on 127.0.0.1:PORT (default $POLYCOMMIT_METRICS_PORT; off)"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polycommit", description="Atomic changes across PostgreSQL, Qdrant and Neo4j over Kafka."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("services", help="start, stop, status or reset the local servers", add_help=False)

    topics = sub.add_parser("topics", help="create or list the polycommit topics")
    topics.add_argument("action", choices=["create", "list"])
    topics.add_argument(
        "--partitions",
        action="append",
        default=[],
        metavar="TOPIC=N",
        help="partitions of a topic (short name, e.g. intents=8 or commands.neo4j=2); repeatable",
    )
    topics.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="run the coordinator and/or the store consumers in this process")
    run.add_argument("what", choices=["all", "coordinator", "detector", "lock-manager"])
    run.add_argument(
        "--instance",
        default=None,
        help="this coordinator's name (default $POLYCOMMIT_COORDINATOR_INSTANCE or 0); one per coordinator process",
    )
    run.add_argument("--metrics-port", type=int, default=None, help=METRICS_HELP)

    recover = sub.add_parser("recover", help="finish every transaction the log has in flight, and report")
    recover.add_argument("--external", action="store_true", help="the coordinator and consumers already run")
    recover.add_argument("--wait", type=float, default=300.0, help="seconds to wait for results (default 300)")
    recover.add_argument("--json", action="store_true")

    consumer = sub.add_parser("consumer", help="run one store's consumer group member")
    consumer.add_argument("store", choices=list(STORES))
    consumer.add_argument("--batch-size", type=int, default=500)
    consumer.add_argument("--metrics-port", type=int, default=None, help=METRICS_HELP)

    status = sub.add_parser("status", help="transactions in flight and stuck, from the coordinator's log")
    status.add_argument("--json", action="store_true")

    letters = sub.add_parser("dead-letters", help="list dead-letter records, or replay them")
    letters.add_argument("--limit", type=int, default=50)
    letters.add_argument("--json", action="store_true")
    dead_letter_replay.add_arguments(letters)

    tx.add_parser(sub)
    pruning = sub.add_parser("prune", help="delete applied-step markers of transactions that ended long ago")
    pruning.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 7d, 12h, 30m")
    pruning.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="ingest documents and merge customers across all three stores")
    demo.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="measure throughput and latency against direct writes")
    from polycommit.tooling.bench import add_arguments as bench_arguments

    bench_arguments(bench)

    check = sub.add_parser("check", help="judge the stores against the log: lost, leftover and orphan writes")
    check.add_argument(
        "--prefix",
        default=None,
        help="topic prefix of the log to judge (default: the settings'); the stores judged are the settings' "
        "(a kept chaos run has its own Qdrant Edge path: set POLYCOMMIT_QDRANT_EDGE_PATH, as chaos prints)",
    )
    check.add_argument("--json", action="store_true", help="one JSON object on stdout")

    failpoints = sub.add_parser("failpoints", help="list the named crash points (POLYCOMMIT_FAILPOINT=name[:n])")
    failpoints.add_argument("--json", action="store_true")

    chaos = sub.add_parser("chaos", help="kill processes and servers under load, then check the stores")
    chaos.add_argument("--transactions", type=int, default=2000, help="transactions to send (default 2000)")
    chaos.add_argument("--kills", type=int, default=5, help="kills of a target (default 5)")
    chaos.add_argument("--seed", type=int, default=0, help="seed of the kill schedule and targets")
    chaos.add_argument("--concurrency", type=int, default=64, help="transactions in flight (default 64)")
    chaos.add_argument(
        "--targets",
        default="",
        help="comma-separated subset of coordinator,postgres,qdrant,neo4j (processes), kafka,postgres-server,"
        "neo4j-server (servers), client, detector (--mode interactive), lock-manager (POLYCOMMIT_LOCK_MANAGER="
        "partitioned) (default: all; servers are those of this "
        "home: never shared ones)",
    )
    chaos.add_argument(
        "--mode",
        choices=["saga", "2pc", "mixed", "interactive"],
        default="saga",
        help="sagas, two-phase commits (STRONG), both (a seeded half each), or interactive increments on hot "
        "keys that deadlock (the deadlock detector runs, and is a target)",
    )
    chaos.add_argument(
        "--hot-keys",
        type=int,
        default=0,
        help="0: every transaction its own key; K: keys drawn among K, so transactions contend for locks",
    )
    chaos.add_argument(
        "--lock-at",
        choices=["access", "commit"],
        default="access",
        help="--mode interactive: lock as each access is made (deadlocks), or all at the commit (stale reads "
        "run again)",
    )
    chaos.add_argument(
        "--consistency",
        choices=["EVENTUAL", "STRONG"],
        default="EVENTUAL",
        help="--mode interactive: commit each increment as a saga, or by two-phase commit",
    )
    chaos.add_argument("--failing", type=float, default=0.1, help="fraction of sagas with a failing last step")
    chaos.add_argument("--short-timeout", type=float, default=0.1, help="fraction of sagas with a 50 ms step timeout")
    chaos.add_argument("--step-timeout", type=float, default=30.0, help="each step's timeout, seconds (default 30)")
    chaos.add_argument("--timeout", type=float, default=300.0, help="the client's wait for a result, seconds")
    chaos.add_argument("--keep", action="store_true", help="keep the run's topics and Qdrant storage")
    chaos.add_argument(
        "--kafka-brokers",
        type=int,
        help="the Kafka cluster's size (services start --kafka-brokers N); kills one broker of N",
    )
    chaos.add_argument(
        "--coordinators",
        type=int,
        default=1,
        help="coordinator members (active-standby): `coordinator#2`... become targets too; killing the active "
        "one waits for a standby to take over, then starts it again (with POLYCOMMIT_COORDINATOR_MEMBERS="
        "partitioned, the run's intents get one partition per member: all active)",
    )
    chaos.add_argument("--json", action="store_true")
    return parser


def _partitions(specs: Sequence[str]) -> dict[str, int]:
    result: dict[str, int] = {}
    for spec in specs:
        name, _, count = spec.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise SystemExit(f"polycommit: --partitions wants TOPIC=N with N >= 1, got {spec!r}")
        result[name] = int(count)
    return result


async def _topics(args: argparse.Namespace) -> int:
    from polycommit.bus import create_topics

    settings = load_settings()
    if args.action == "create":
        report = await create_topics(settings, _partitions(args.partitions))
    else:
        from polycommit.tooling.topics import list_topics

        listed = await list_topics(settings)
        if args.json:
            _print_json(listed)
            return 0
        report = {
            name: f"{t['partitions']} partitions, replication {t['replication_factor']}" if t["exists"] else "missing"
            for name, t in listed.items()
        }
    if args.json:
        _print_json(report)
    else:
        for name, state in report.items():
            print(f"{name:40} {state}")
    return 0


async def _run_until_signal(
    stores: Sequence[str],
    coordinator: bool,
    batch_size: int = 500,
    instance: str | None = None,
    detector: bool = False,
    metrics_port: int | None = None,
    lock_manager: bool = False,
) -> int:
    from polycommit import tracing
    from polycommit.bus import create_topics
    from polycommit.tooling import metrics
    from polycommit.tooling.runtime import Runtime

    tracing.configure("polycommit-" + ("coordinator" if coordinator else "-".join(stores)))
    port = metrics.port_from(metrics_port)
    observe = tracing.ignore
    if port is not None:
        series = metrics.Metrics()
        series.serve(port)
        observe = series.observe

    settings = load_settings()
    if instance is not None:
        settings = dataclasses.replace(settings, coordinator_instance=instance)
    await create_topics(settings)
    runtime = Runtime(
        settings,
        stores=stores,
        coordinator=coordinator,
        batch_size=batch_size,
        detector=detector,
        lock_manager=lock_manager,
        observe=observe,
    )
    await runtime.start()
    gc_tuning.settle()  # what the process needs is built: the collector stops scanning it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Supervisors (and polycommit.tooling.processes) wait for this line: flush it even when stdout is a pipe.
    parts = [
        *(["coordinator"] if coordinator else []),
        *(["detector"] if detector else []),
        *(["lock-manager"] if lock_manager else []),
        *stores,
    ]
    print(f"polycommit running: {' '.join(parts)} (Ctrl-C stops)", flush=True)
    waiter = asyncio.create_task(runtime.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    await runtime.stop()
    if waiter.done() and waiter.exception() is not None:
        raise waiter.exception()  # type: ignore[misc]
    waiter.cancel()
    return 0


async def _run(args: argparse.Namespace) -> int:
    """`polycommit run all|coordinator|detector|lock-manager`."""
    return await _run_until_signal(
        STORES if args.what == "all" else (),
        coordinator=args.what in ("all", "coordinator"),
        instance=args.instance,
        detector=args.what in ("all", "detector"),
        metrics_port=args.metrics_port,
        lock_manager=args.what == "lock-manager",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    kafka_tuning.apply()  # every command of this process is polycommit's own: its producers get the tuning
    gc_tuning.apply()
    if argv and argv[0] == "services":
        from polycommit.tooling.services import run_services_command

        return run_services_command(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )
    for once_per_rebalance in ("orchestrator.members", "orchestrator.transactions"):  # who is active, what it restored
        logging.getLogger(once_per_rebalance).setLevel(logging.INFO)
    quiet_pool_restores()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(_dispatch(args))
    except KeyboardInterrupt:
        return 130
    except (PolycommitError, KafkaError, OSError) as exc:
        # An expected failure (a server down, a bad record) is a message and exit 1, not a traceback.
        print(f"polycommit {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "topics":
        return await _topics(args)
    if args.command == "run":
        return await _run(args)
    if args.command == "recover":
        from polycommit.tooling.recovery import run_recover

        return await run_recover(load_settings(), external=args.external, wait=args.wait, as_json=args.json)
    if args.command == "consumer":
        return await _run_until_signal([args.store], False, args.batch_size, metrics_port=args.metrics_port)
    if args.command == "status":
        from polycommit.tooling.inspect import print_status

        return await print_status(load_settings(), as_json=args.json)
    if args.command == "dead-letters" and args.action == "replay":
        return await dead_letter_replay.run(load_settings(), args)
    if args.command == "dead-letters":
        from polycommit.tooling.inspect import print_dead_letters

        return await print_dead_letters(load_settings(), limit=args.limit, as_json=args.json)
    if args.command == "prune":
        from polycommit.tooling import prune

        return await prune.run(load_settings(), args)
    if args.command == "tx":
        return await tx.run(load_settings(), args)
    if args.command == "demo":
        from polycommit.tooling.demo import run_demo

        return await run_demo(load_settings(), as_json=args.json)
    if args.command == "bench":
        from polycommit.tooling.bench import run_bench

        return await run_bench(load_settings(), args)
    if args.command == "check":
        from polycommit.tooling.checker.command import run_check

        return await run_check(load_settings(), args)
    if args.command == "failpoints":
        from polycommit.failpoints import MEANINGS

        if args.json:
            _print_json([{"name": name, "meaning": meaning} for name, meaning in MEANINGS.items()])
        else:
            for name, meaning in MEANINGS.items():
                print(f"{name:36} {meaning}")
        return 0
    if args.command == "chaos":
        from polycommit.tooling.chaos import run_chaos

        return await run_chaos(load_settings(), args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
