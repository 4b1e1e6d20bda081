"""The coordinator's Kafka consumer left stuck rejoining its group (aiokafka issue #1154) ends its session:
the stuck consumer is stopped, not abandoned, and a new session coordinates what comes next.

The stuck state is made as in the store consumer's test: the group coordinator is asked to rejoin and
its join never completes."""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import Any

import pytest
from runtimes import started_runtime

from orchestrator import service as service_module
from polycommit import operations as ops
from polycommit.bus import make_consumer as real_make_consumer
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.group_watch import GroupWatch
from polycommit.tooling import workload

pytestmark = pytest.mark.servers


async def never_joins(*args: Any, **kwargs: Any) -> None:
    await asyncio.Event().wait()


async def test_a_coordinator_stuck_rejoining_its_group_stops_that_consumer_and_coordinates_on(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []
    second_session = asyncio.Event()

    def recording_make_consumer(*args: Any, **kwargs: Any) -> Any:
        made.append(real_make_consumer(*args, **kwargs))
        if len(made) == 2:
            second_session.set()
        return made[-1]

    monkeypatch.setattr(service_module, "GroupWatch", functools.partial(GroupWatch, deadline_s=2.0))
    monkeypatch.setattr(service_module, "make_consumer", recording_make_consumer)
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
        stuck = made[0]._coordinator
        monkeypatch.setattr(stuck, "ensure_active_group", never_joins)
        stuck.request_rejoin()  # what a heartbeat failing against a restarted broker does
        await asyncio.wait_for(second_session.wait(), 60)  # the watch ended the stuck session
        assert (await client.execute(saga("after"))).status == "completed"
        assert runtime.service is not None and runtime.service.stats.restarts == 1
        assert stuck._coordination_task.cancelled()  # stopped at once, not abandoned after STOP_DEADLINE_S
        assert not any(conn.connected() for conn in made[0]._client._conns.values())
