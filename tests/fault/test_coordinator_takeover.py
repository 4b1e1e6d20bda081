"""The active coordinator member dies in the middle of a Kafka transaction and never comes back: a standby
takes the work over and every transaction completes, well before Kafka's transaction timeout.

The dead member's open transaction holds back every read_committed reader of the partitions it wrote
(commands, changelog) until it ends. The standby, made active, opens the producer of the active role's
transactional id (orchestrator/committer.py), which fences the dead member and aborts that transaction at
once; with a transactional id per member, nothing would end it before its timeout (60 s), and the results
would come only after that.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from fault.test_crash_points import CLIENT_TIMEOUT_S, DEATH_DEADLINE_S, await_results, sagas, submit
from polycommit.client import Coordinator
from polycommit.config import Settings
from polycommit.tooling.checker import History, check
from polycommit.tooling.processes import Cluster

pytestmark = pytest.mark.servers

TAKEOVER_S = 60.0  # the group's session timeout (6 s) and a rebalance, with margin
RESULTS_AFTER_TAKEOVER_S = 40.0  # below Kafka's transaction timeout (60 s): the dead transaction was aborted
TRANSACTIONS = 20


async def test_a_standby_takes_over_from_an_active_member_killed_mid_transaction(
    fault_settings: Settings, tmp_path: Path
) -> None:
    members = ["coordinator", "coordinator#2"]
    cluster = Cluster(
        fault_settings, tmp_path / "logs", names=[*members, "postgres", "qdrant", "neo4j"], supervise=False
    )
    history = History()
    first_active = cluster["coordinator"].watch(": active, ")
    # Started first, it is the active one; it dies at its second Kafka transaction, which stays open.
    await cluster.start_one("coordinator", "coordinator.before_commit:2")
    await asyncio.wait_for(first_active, TAKEOVER_S)
    for name in ("coordinator#2", "postgres", "qdrant", "neo4j"):
        await cluster.start_one(name)
    took_over = cluster["coordinator#2"].watch(": active, ")
    try:
        async with Coordinator(fault_settings, timeout=CLIENT_TIMEOUT_S) as client:
            futures = await submit(client, history, sagas(TRANSACTIONS))
            code = await cluster["coordinator"].exited(DEATH_DEADLINE_S)
            assert code == -signal.SIGKILL, f"the active member exited with {code}, not by its failpoint"
            assert sum(1 for f in futures if f.done()) < TRANSACTIONS, "the crash came after the whole run"
            await asyncio.wait_for(took_over, TAKEOVER_S)
            results = await await_results(cluster, history, futures, RESULTS_AFTER_TAKEOVER_S)
    finally:
        codes = await cluster.stop()
    assert codes == {"coordinator": -signal.SIGKILL, **dict.fromkeys(cluster.names[1:], 0)}, codes
    report = await check(fault_settings, history)
    assert report.ok, report.to_json()
    assert report.statuses == {"completed": TRANSACTIONS}, report.to_json()
    assert len(results) == TRANSACTIONS
