"""`polycommit demo`, the README's first command, on the real servers (its own topics and Qdrant Edge folder):
every transaction ends as the demo expects, the stores show the outcome, and the two clerks' race ends
with one block run again after a stale read, no deadlock and no top-up lost in PostgreSQL or Neo4j."""

from __future__ import annotations

import json

import pytest

from polycommit.config import Settings
from polycommit.tooling.demo import run_demo

pytestmark = pytest.mark.servers


async def test_the_demo_ends_as_expected_and_its_race_loses_no_top_up(
    topics: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_demo(topics, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and all(t["status"] == t["expected"] for t in report["transactions"])
    race = report["race"]
    assert race["statuses"] == ["completed", "completed"] and race["reruns"] == 1, race
    assert race["after_postgres"] == race["after_neo4j"] == race["before"] + 2 * race["amount"], race
    customers = {c["id"]: c for c in report["stores"]["postgres"]["customers"]}
    assert customers[race["customer"]]["credit"] == race["after_postgres"]
