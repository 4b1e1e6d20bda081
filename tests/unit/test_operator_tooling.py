"""The pure parts of the operator commands: durations, the retention check, a transaction's history,
which dead letters a replay takes, topic shapes and the shell exports."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from orchestrator.admission import expiry_refusal
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.config import load_settings, parse_duration_ms
from polycommit.events import DeadLetter
from polycommit.tooling.dead_letter_replay import Positioned, refusal, select, since_ms
from polycommit.tooling.service_env import render
from polycommit.tooling.topics import shape
from projections.tx_history import LogRecord, concerns, history, stores_touched

DAY_MS = 86_400_000


@pytest.mark.parametrize(
    ("text", "ms"),
    [("7d", 7 * DAY_MS), ("12h", 43_200_000), ("30m", 1_800_000), ("45s", 45_000), ("500ms", 500), ("2", 2000)],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "d", "7 days", "-1d", "1w"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_ms(text)


def test_an_intent_older_than_the_retention_is_refused_and_a_younger_one_is_not() -> None:
    intent: Any = Saga("x").step(ops.sql("SELECT 1")).intent("", "test")
    now = intent["created_at_ms"]
    assert expiry_refusal(intent, now + 7 * DAY_MS, 7 * DAY_MS) is None
    refused = expiry_refusal(intent, now + 7 * DAY_MS + 1, 7 * DAY_MS)
    assert refused is not None and refused["error_class"] == "ExpiredIntentError" and not refused["retriable"]
    intent["created_at_ms"] = 0
    assert expiry_refusal(intent, now, 1) is None  # no creation time: admitted


def record(topic: str, at: int, event_type: str, body: dict[str, Any], offset: int = 0) -> LogRecord:
    return LogRecord(topic, 0, offset, at, event_type, body)


def test_history_orders_by_time_then_by_the_protocols_order_of_topics() -> None:
    command = {"operation": {"store": "neo4j"}, "action": "EXECUTE", "step_index": 0, "attempt": 1}
    outcome = {
        "store": "neo4j",
        "action": "EXECUTE",
        "step_index": 0,
        "attempt": 1,
        "status": "FAILED",
        "error": {"error_class": "StoreError", "message": "boom", "retriable": False},
        "before_image": "{}",
    }
    intent = {"name": "n", "steps": [1], "consistency": "EVENTUAL"}
    events = history(
        [
            record("p.outcomes", 5, "StepOutcome", outcome),
            record("p.commands.neo4j", 5, "StoreCommand", command),
            record("p.intents", 1, "TransactionIntent", intent),
        ]
    )
    assert [e["event"] for e in events] == ["TransactionIntent", "StoreCommand", "StepOutcome"]
    assert events[2]["error"] == "StoreError: boom" and events[2]["before_image_bytes"] == 2
    assert stores_touched(events) == ["neo4j"]


def test_lock_events_and_dead_letters_are_matched_on_their_tx_id() -> None:
    assert concerns("LockEvent", {"tx_id": "t"}, "resource-key", "t")
    assert not concerns("LockEvent", {"tx_id": "u"}, "t", "t")
    assert concerns("DeadLetter", {"tx_id": None}, "t", "t")
    assert concerns("Alert", {"tx_id": "t"}, "t", "t") and not concerns("Alert", {"tx_id": "t"}, "u", "t")


def letter(at: int, size: int = 3) -> DeadLetter:
    return {
        "original_topic": "p.intents",
        "partition": 0,
        "offset": 1,
        "key": b"k",
        "payload": b"abc",
        "payload_size": size,
        "error_class": "CorruptEventError",
        "error_message": "",
        "tx_id": "k",
        "consumer": "coordinator",
        "replay_of": "",
        "at_ms": at,
    }


def test_a_replay_selects_by_id_time_or_all_and_refuses_twice_or_cut_letters() -> None:
    letters = [Positioned("dead-letters/0/1", letter(10)), Positioned("dead-letters/0/2", letter(20, size=9))]
    assert [p.id for p in select(letters, ["dead-letters/0/2"], None, False)] == ["dead-letters/0/2"]
    assert [p.id for p in select(letters, [], 15, False)] == ["dead-letters/0/2"]
    assert len(select(letters, [], None, True)) == 2
    assert refusal(letters[0], {}, False) is None
    assert "replayed before" in (refusal(letters[0], {"dead-letters/0/1": "p.intents/0/9"}, False) or "")
    assert refusal(letters[0], {"dead-letters/0/1": "p.intents/0/9"}, True) is None
    assert "keeps 3 of the record's 9 bytes" in (refusal(letters[1], {}, True) or "")
    assert since_ms("1970-01-01T00:00:01") == since_ms("1970-01-01T00:00:01Z") == 1000


def test_topic_shape_from_metadata() -> None:
    partitions = [{"replicas": [1, 2, 3], "isr": [1, 2]}, {"replicas": [2, 3, 1], "isr": [2, 3, 1]}]
    assert shape({"error_code": 0, "partitions": partitions}) == {
        "exists": True,
        "partitions": 2,
        "replication_factor": 3,
        "in_sync_replicas_min": 2,
    }
    assert shape({"error_code": 3, "partitions": []})["exists"] is False


def test_services_env_shows_passwords_only_when_asked() -> None:
    base = load_settings()
    settings = dataclasses.replace(
        base,
        postgres=dataclasses.replace(base.postgres, password="pg secret"),
        neo4j=dataclasses.replace(base.neo4j, password="neo secret"),
    )
    hidden = render(settings, show_secrets=False)
    assert "pg secret" not in hidden and "neo secret" not in hidden and "--show-secrets" in hidden
    assert f"export PGPORT={settings.postgres.port}" in hidden
    shown = render(settings, show_secrets=True)
    assert "export PGPASSWORD='pg secret'" in shown and "export NEO4J_PASSWORD='neo secret'" in shown
