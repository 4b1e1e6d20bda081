"""`polycommit bench`'s options, and the combinations of the contended ones it accepts."""

from __future__ import annotations

import argparse

from polycommit.tooling import bench_contended


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--mode",
        choices=["saga", "saga-unlocked", "2pc"],
        default="saga",
        help="sagas, sagas opted out of their locks (locks=False), or two-phase commit (STRONG)",
    )
    bench.add_argument("--transactions", type=int, default=10_000, help="transactions per concurrency")
    bench.add_argument("--concurrency", default="256", help="transactions in flight; a list (1,8,32) runs a curve")
    bench.add_argument("--external", action="store_true", help="the workers already run elsewhere")
    bench.add_argument(
        "--in-process",
        action="store_true",
        help="run the coordinator and the consumers in this process (default: one process each, as deployed)",
    )
    bench.add_argument("--consumers", type=int, default=1, help="consumer processes per scalable store")
    bench.add_argument(
        "--trace",
        action="store_true",
        help="per-hop budget of the median and p99 transaction (the parts write their spans to files of the run)",
    )
    bench.add_argument(
        "--fold",
        action="store_true",
        help="the coordinator's own CPU per saga, phase by phase: sagas folded in this process without Kafka or "
        "stores (no server needed; --concurrency is the sagas per loop)",
    )
    bench.add_argument("--no-direct", action="store_true", help="skip the direct-write baselines")
    bench.add_argument("--json", action="store_true")
    bench.add_argument(
        "--isolation",
        choices=bench_contended.ISOLATIONS,
        default="READ_COMMITTED",
        help="isolation level of --interactive transactions (their reads lock at REPEATABLE_READ and SERIALIZABLE)",
    )
    bench.add_argument(
        "--lock-at",
        choices=("commit", "access"),
        default="commit",
        help="when --interactive transactions lock: at the commit, all at once, reads checked then (the default: "
        "a lost race retries, no deadlock), or as each read and write is made (upgrades deadlock)",
    )
    bench.add_argument(
        "--hot-keys",
        type=int,
        default=0,
        help="0: every transaction its own keys; K: each picks its keys among K hot keys, so they contend",
    )
    bench.add_argument(
        "--interactive",
        action="store_true",
        help="interactive increments (needs --hot-keys): read two hot keys, write the first one's count + 1 to the "
        "three stores; a lost race (--lock-at commit) or a deadlock victim (--lock-at access) is run again",
    )
    bench.add_argument(
        "--for-update",
        action="store_true",
        help="with --interactive: lock up front, in one key order (EXCLUSIVE on the written key): no deadlock",
    )
    bench.add_argument(
        "--read-for-update",
        action="store_true",
        help="with --interactive: read the written key for update (EXCLUSIVE at the read, in the code's order, "
        "as SELECT ... FOR UPDATE): no upgrade deadlock; keys taken in opposite orders still deadlock",
    )
    bench.add_argument(
        "--retries", type=int, default=10, help="runs again of a deadlock victim or a lost race (--interactive)"
    )


def check_options(args: argparse.Namespace) -> None:
    """The contended options' combinations: interactive transactions on hot keys, run as locking sagas or
    (`--mode 2pc`) as two-phase commits."""
    if args.hot_keys < 0 or args.retries < 0:
        raise SystemExit("polycommit bench: --hot-keys and --retries must not be negative")
    if args.interactive and (args.mode not in ("saga", "2pc") or args.hot_keys < 1):
        raise SystemExit("polycommit bench: --interactive runs --mode saga or 2pc on --hot-keys K (K >= 1)")
    if (args.for_update or args.read_for_update) and not args.interactive:
        raise SystemExit("polycommit bench: --for-update and --read-for-update are options of --interactive")
    if args.for_update and args.read_for_update:
        raise SystemExit("polycommit bench: --for-update already locks up front: no --read-for-update with it")
