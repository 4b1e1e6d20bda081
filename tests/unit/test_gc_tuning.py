"""The collector settings of polycommit's own processes: a high young threshold at start, everything built
at start frozen out of later collections once the process is up; POLYCOMMIT_GC=default leaves CPython's."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from polycommit.tooling import cli, gc_tuning


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_apply_raises_the_young_threshold_unless_default_is_asked(
    monkeypatch: pytest.MonkeyPatch, restored_gc: None
) -> None:
    gc.set_threshold(700, 10, 10)
    monkeypatch.setenv("POLYCOMMIT_GC", "default")
    gc_tuning.apply()
    assert gc.get_threshold() == (700, 10, 10)
    monkeypatch.delenv("POLYCOMMIT_GC")
    gc_tuning.apply()
    assert gc.get_threshold()[0] == gc_tuning.YOUNG_THRESHOLD


def test_settle_freezes_what_is_alive_so_a_collection_no_longer_scans_it(
    monkeypatch: pytest.MonkeyPatch, restored_gc: None
) -> None:
    monkeypatch.delenv("POLYCOMMIT_GC", raising=False)
    built_at_start = [[i] for i in range(10_000)]  # lists stay tracked (a dict of atoms may not)
    gc_tuning.settle()
    assert gc.get_freeze_count() >= len(built_at_start)
    assert id(built_at_start[0]) not in {id(o) for o in gc.get_objects()}  # out of the collector's sight
    gc.unfreeze()
    assert id(built_at_start[0]) in {id(o) for o in gc.get_objects()}
    monkeypatch.setenv("POLYCOMMIT_GC", "default")
    gc_tuning.settle()
    assert gc.get_freeze_count() == 0


def test_the_cli_applies_the_threshold_before_its_command_runs(
    monkeypatch: pytest.MonkeyPatch, restored_gc: None
) -> None:
    seen: list[int] = []

    async def dispatch(args: object) -> int:
        seen.append(gc.get_threshold()[0])
        return 0

    gc.set_threshold(700, 10, 10)
    monkeypatch.delenv("POLYCOMMIT_GC", raising=False)
    monkeypatch.setattr(cli, "_dispatch", dispatch)
    assert cli.main(["status"]) == 0
    assert seen == [gc_tuning.YOUNG_THRESHOLD]
