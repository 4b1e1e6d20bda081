"""A closed client, on the real broker: what is sent through it afterwards fails with ClientClosedError, a
typed error, not aiokafka's ProducerClosed (chaos replaces its client this way under load)."""

from __future__ import annotations

from typing import Any

import pytest

from polycommit import operations as ops
from polycommit.client import Coordinator, Saga
from polycommit.config import Settings
from polycommit.errors import ClientClosedError

pytestmark = pytest.mark.servers


async def test_what_a_closed_client_is_asked_to_send_fails_typed(topics: Settings) -> None:
    client = await Coordinator(topics, timeout=30).start()
    await client.close()
    saga = Saga("after close").step(ops.upsert_row("documents", {"id": "closed"}, {"title": "x"}))
    with pytest.raises(ClientClosedError):
        await client.submit(saga)
    request: Any = {"tx_id": saga.tx_id, "request": 1, "release": True}
    with pytest.raises(ClientClosedError):
        await client.request_locks(request)
