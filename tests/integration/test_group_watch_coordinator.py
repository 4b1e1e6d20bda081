"""The coordinator's Kafka consumer left stuck rejoining its group (aiokafka issue #1154) ends its session:
the stuck consumer is stopped, not abandoned, and a new session coordinates what comes next.

The stuck state is made as in the store consumer's test: the group coordinator is asked to rejoin and
its join never completes."""

from __future__ import annotations

import asyncio
import functools
import uuid

import pytest
from runtimes import started_runtime
from workers import ConsumersMade, closed, leave_stuck

from orchestrator import service as service_module
from polycommit import operations as ops
from polycommit.bus import make_consumer
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.group_watch import GroupWatch
from polycommit.tooling import workload

pytestmark = pytest.mark.servers


async def test_a_coordinator_stuck_rejoining_its_group_stops_that_consumer_and_coordinates_on(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumers = ConsumersMade(make_consumer)
    monkeypatch.setattr(service_module, "GroupWatch", functools.partial(GroupWatch, deadline_s=2.0))
    monkeypatch.setattr(service_module, "make_consumer", consumers)
    async with started_runtime(topics) as runtime, Coordinator(runtime.settings, timeout=120) as client:

        def saga(title: str) -> Saga:
            doc = f"gw-{uuid.uuid4().hex[:8]}"
            point = ops.point(doc, workload.embed(title), {"title": title})
            return (
                Saga(title)
                .step(ops.upsert_row(workload.DOCUMENTS, {"id": doc}, {"title": title}))
                .step(ops.upsert_points(workload.DOCUMENTS, [point]))
                .step(ops.merge_node("Document", {"id": doc}, {"title": title}))
            )

        assert (await client.execute(saga("before"))).status == "completed"
        stuck = leave_stuck(consumers.made[0], monkeypatch)
        await asyncio.wait_for(consumers.second_session.wait(), 60)  # the watch ended the stuck session
        assert (await client.execute(saga("after"))).status == "completed"
        assert runtime.service is not None and runtime.service.stats.restarts == 1
        assert stuck._coordination_task.cancelled()  # stopped at once, not abandoned after STOP_DEADLINE_S
        assert closed(consumers.made[0])
