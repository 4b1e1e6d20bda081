"""A step whose before-image is bigger than a Kafka record may be (issue 9, defect 5), on the real servers.

Overwriting 170 existing 1536-dimension points is an operation under the 1 MiB payload limit, but its
before-image (the old points as JSON) is over the topics' 4 MiB record limit. The image stays in the
store's EXECUTE marker and the outcome carries a reference to it: the saga compensates and the old
points come back, and no consumer loops on a record it cannot publish.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.bus import MAX_RECORD_BYTES
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.events import Operation
from polycommit.tooling.runtime import Runtime

POLICY = SagaPolicy(default_timeout_ms=30000, backoff_base_ms=100, backoff_max_ms=1000, compensation_retries=3)
COLLECTION, DIMENSIONS, POINTS = "large_images", 1536, 170
pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
async def runtime(topics: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(topics, policy=POLICY, batch_size=200)
    await rt.start()
    await rt.workers["qdrant"].participant.ensure_collection(COLLECTION, DIMENSIONS)  # type: ignore[attr-defined]
    yield rt
    await rt.stop()


def generation(ids: list[int], rng: random.Random) -> Operation:
    vectors = [[rng.uniform(-1.0, 1.0) for _ in range(DIMENSIONS)] for _ in ids]
    return ops.upsert_points(COLLECTION, [ops.point(i, v) for i, v in zip(ids, vectors, strict=True)])


async def test_a_before_image_over_the_record_limit_is_restored_from_the_marker(runtime: Runtime) -> None:
    rng = random.Random()
    base = rng.randrange(10**6, 10**8)
    ids = list(range(base, base + POINTS))
    old, new = generation(ids, rng), generation(ids, rng)
    assert ops.operation_size(new) < runtime.settings.max_payload_bytes
    qdrant = runtime.workers["qdrant"].participant
    async with Coordinator(runtime.settings, timeout=90) as client:
        assert (await client.execute(Saga("seed").step(old))).status == "completed"
        before = await qdrant.read_points(COLLECTION, ids)  # type: ignore[attr-defined]
        assert len(ops.dumps(before)) > MAX_RECORD_BYTES  # the image could never travel in one record
        saga = Saga("overwrite, then fail").step(new).step(ops.sql("SELECT 1/0"))
        result = await client.execute(saga)
    assert runtime.workers["qdrant"].stats.restarts == 0  # no session died on a record it could not publish
    assert result.status == "compensated", result
    assert [s.status for s in result.steps] == ["compensated", "failed"]
    assert await qdrant.read_points(COLLECTION, ids) == before  # type: ignore[attr-defined]
