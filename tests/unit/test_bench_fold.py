"""`polycommit bench --fold`: the coordinator folds whole sagas with no Kafka and no store."""

from __future__ import annotations

from polycommit.config import load_settings
from polycommit.tooling.bench_fold import PHASES, FoldCost, OfflineCoordinator, fold_sagas, measure_fold
from polycommit.tooling.bench_workload import writes


async def test_every_saga_folds_to_completed_and_each_phase_is_timed() -> None:
    cost = await measure_fold(load_settings(), sagas=96, wave=32, warm=32)  # never connected: no server needed

    assert cost.sagas == 96
    assert cost.completed == 96
    # per saga: its 3 commands, its lock events, its snapshot; then its result (and reply), its release,
    # its tombstone
    assert cost.records_out >= 96 * 8
    per_saga = cost.per_saga_us()
    assert all(per_saga[phase] > 0 for phase in PHASES)
    assert per_saga["total"] >= max(per_saga[phase] for phase in PHASES)


async def test_no_saga_stays_in_flight_once_its_outcomes_are_folded() -> None:
    offline = OfflineCoordinator(load_settings())
    await offline.start()
    cost = FoldCost()

    await fold_sagas(offline, writes("fold-test", 10), 4, cost)

    assert (cost.sagas, cost.completed) == (10, 10)
    assert not offline.service.transactions.states  # each saga's state ended with its tombstone
