"""The contended benchmark's pure parts: hot-key transactions, the contention figures, the hot keys'
agreement and lost-update count, the option checks, the pass rule on hot keys and the detector part."""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace
from typing import Any, cast

import pytest
from rich.console import Console

from polycommit.client import TransactionResult
from polycommit.config import load_settings
from polycommit.tooling.bench import add_arguments, check_options, cluster_for, passed, report
from polycommit.tooling.bench_contended import (
    Contention,
    agreement,
    contention_summary,
    hot_keys,
    hot_transactions,
    lost_updates,
    reads_locked,
)
from polycommit.tooling.bench_output import print_curve


def test_hot_transactions_write_one_of_k_keys_and_read_another() -> None:
    items = hot_transactions("r", 200, 5, seed=3)
    keys = set(hot_keys("r", 5))
    assert [t.write.value for t in items] == list(range(200))  # each its own value
    assert all(t.write.key in keys and t.other in keys and t.write.key != t.other for t in items)
    assert {t.write.key for t in items} == keys  # 200 picks cover 5 keys
    assert hot_transactions("r", 200, 5, seed=3) == items  # reproducible
    single = hot_transactions("r", 3, 1)
    assert all(t.write.key == t.other == "r-h0" for t in single)
    with pytest.raises(ValueError):
        hot_transactions("r", 3, 0)


def test_rates_are_per_attempt_and_lock_waits_are_percentiles_in_ms() -> None:
    outcomes = ["DeadlockVictimError"] * 3 + ["VersionConflict"] + [""] * 96
    summary = contention_summary(Contention(outcomes, [i / 1000 for i in range(1, 101)]))
    assert summary["attempts"] == 100
    assert (summary["deadlock_rate"], summary["conflict_rate"]) == (0.03, 0.01)
    assert summary["failed_attempts_by_error"] == {"DeadlockVictimError": 3, "VersionConflict": 1}
    assert summary["lock_wait_ms"] == {"requests": 100, "p50": 51.0, "p99": 100.0, "max": 100.0}
    empty = contention_summary(Contention())
    assert (empty["attempts"], empty["deadlock_rate"], empty["lock_wait_ms"]["max"]) == (0, 0.0, 0.0)


def test_a_hot_key_is_verified_only_when_every_store_holds_the_same_value() -> None:
    found: dict[str, dict[str, Any]] = {
        "postgres": {"a": 3, "b": 5, "c": 1},
        "neo4j": {"a": 3, "b": 4, "c": 1},  # b differs
        "qdrant": {"a": 3, "b": 5},  # c missing
    }
    checked = agreement(["a", "b", "c"], found)
    assert checked.verified == 1
    assert checked.missing == {"postgres": 0, "neo4j": 1, "qdrant": 1}
    assert agreement(["d"], found).verified == 0  # written nowhere: not verified


def test_lost_updates_are_committed_increments_missing_from_the_counts() -> None:
    assert lost_updates(["a", "b"], {"a": 3, "b": 4}, 7) == 0
    assert lost_updates(["a", "b"], {"a": 3}, 7) == 4
    assert reads_locked("SERIALIZABLE", False) and reads_locked("REPEATABLE_READ", False)
    assert not reads_locked("READ_COMMITTED", False) and reads_locked("READ_COMMITTED", True)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_contended_options_and_their_defaults() -> None:
    args = _args()
    assert (args.isolation, args.hot_keys, args.interactive, args.for_update) == ("READ_COMMITTED", 0, False, False)
    check_options(_args("--interactive", "--hot-keys", "20", "--isolation", "SERIALIZABLE", "--for-update"))
    check_options(_args("--hot-keys", "20", "--mode", "2pc"))  # sagas or 2PC on hot keys
    check_options(_args("--interactive", "--hot-keys", "4", "--mode", "2pc"))  # interactive STRONG
    check_options(_args("--interactive", "--hot-keys", "20", "--read-for-update"))
    for bad in (
        ("--interactive",),  # no hot keys
        ("--interactive", "--hot-keys", "4", "--mode", "saga-unlocked"),
        ("--for-update", "--hot-keys", "4"),
        ("--read-for-update", "--hot-keys", "4"),
        ("--interactive", "--hot-keys", "4", "--for-update", "--read-for-update"),
        ("--hot-keys", "-1"),
    ):
        with pytest.raises(SystemExit):
            check_options(_args(*bad))


def _result(status: str) -> TransactionResult:
    return TransactionResult(tx_id="t", status=status, steps=(), error=None, duration_ms=1)


def test_a_hot_point_passes_when_every_written_key_agrees_and_no_locked_increment_is_lost() -> None:
    point = {**report(32, [1.0] * 1000, [_result("completed")] * 1000, 1.0), "verified_of": 20}
    assert passed({**point, "verified": 20})
    assert not passed({**point, "verified": 19})
    assert not passed({**point, "verified": 20, "lost_updates": 2, "reads_locked": True})
    assert passed({**point, "verified": 20, "lost_updates": 2, "reads_locked": False})  # READ_COMMITTED may


def test_an_interactive_run_starts_the_deadlock_detector_too() -> None:
    settings = load_settings()
    edge = dataclasses.replace(settings, qdrant=dataclasses.replace(settings.qdrant, url=None))
    assert "detector" in cluster_for(edge, 1, detector=True).processes
    assert "detector" not in cluster_for(edge, 1).processes


def test_the_contention_table_shows_each_hot_point() -> None:
    point = {
        **report(32, [1.0], [_result("completed")], 1.0),
        **contention_summary(Contention(["DeadlockVictimError", ""], [0.002])),
        "hot_keys": 20,
        "verified": 20,
        "verified_of": 20,
        "lost_updates": 0,
    }
    console = Console(record=True, width=200)
    print_curve(console, [point], 1)
    text = console.export_text()
    assert "contention on hot keys" in text and "0.5" in text and "20/20" in text


def test_a_block_run_again_in_its_transaction_counts_each_run_as_an_attempt_once() -> None:
    rerun = SimpleNamespace(lock_waits_s=[0.01], reruns=2, result=SimpleNamespace(error_class=None), failed="")
    victim = SimpleNamespace(lock_waits_s=[], reruns=0, result=None, failed="DeadlockVictimError")
    contention = Contention()
    # `coordinator.run(..., attempts=...)` lists each transaction once; the rerun one ran its block three times
    contention.add_attempts(cast(Any, [victim, rerun]))
    assert sorted(contention.outcomes) == ["", "DeadlockVictimError", "StaleReadError", "StaleReadError"]
    assert contention.lock_waits_s == [0.01]
