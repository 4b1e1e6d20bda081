"""The driver's checks of an intent's transport fields, without Kafka: its key, its reply address."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest

from orchestrator.admission import ReplyTargets, key_refusal, reply_to_problem
from polycommit.bus import Topics

TOPICS = Topics("pc")
CLUSTER = {"pc.replies": {0, 1, 2, 3}, "app.results": {0}, "pc.intents": {0, 1}}


@pytest.mark.parametrize("reply_to", ["", "pc.replies", "pc.replies:3", "app.results", "app.results:0"])
def test_valid_reply_addresses(reply_to: str) -> None:
    assert reply_to_problem(reply_to, TOPICS, CLUSTER.get(reply_to.rsplit(":", 1)[0])) is None


@pytest.mark.parametrize(
    "topic",
    [
        "pc.intents",
        "pc.commands.postgres",
        "pc.commands.qdrant",
        "pc.commands.anything",
        "pc.outcomes",
        "pc.tx-state",
        "pc.decisions",
        "pc.locks",
        "pc.deadlocks",
        "pc.dead-letters",
        "pc.alerts",
        "pc.results",
        "__consumer_offsets",
        "__transaction_state",
    ],
)
def test_internal_topics_are_refused_even_when_they_exist(topic: str) -> None:
    for reply_to in (topic, f"{topic}:0"):
        assert "internal topic" in (reply_to_problem(reply_to, TOPICS, {0, 1}) or "")


def test_a_missing_topic_or_partition_is_refused() -> None:
    assert "does not exist" in (reply_to_problem("nowhere", TOPICS, None) or "")
    assert "no partition 4" in (reply_to_problem("pc.replies:4", TOPICS, CLUSTER["pc.replies"]) or "")


def test_an_intent_must_be_keyed_by_its_tx_id() -> None:
    assert key_refusal(b"tx-1", "tx-1") is None
    wrong = key_refusal(b"customer-42", "tx-1")
    missing = key_refusal(None, "tx-1")
    assert wrong is not None and wrong["error_class"] == "InvalidIntentKeyError" and "customer-42" in wrong["message"]
    assert missing is not None and missing["error_class"] == "InvalidIntentKeyError" and "no key" in missing["message"]


class Cluster:
    """A fake metadata source that counts how often it is asked."""

    def __init__(self, topics: dict[str, set[int]]) -> None:
        self.topics = topics
        self.fetches = 0

    async def fetch(self) -> Mapping[str, Collection[int]]:
        self.fetches += 1
        return {name: set(parts) for name, parts in self.topics.items()}


async def test_the_cache_is_refreshed_at_most_once_per_batch_for_unknown_addresses() -> None:
    cluster = Cluster({"pc.replies": {0, 1}})
    targets = ReplyTargets(TOPICS, cluster.fetch)
    assert await targets.refusal("pc.replies:1") is None and cluster.fetches == 1
    assert await targets.refusal("pc.replies:0") is None and cluster.fetches == 1  # cached
    targets.new_batch()
    for name in ("nope-1", "nope-2", "pc.replies:7"):
        refusal = await targets.refusal(name)
        assert refusal is not None and refusal["error_class"] == "InvalidReplyToError"
    assert cluster.fetches == 2  # one refresh for the whole batch
    assert await targets.refusal("pc.tx-state") is not None and cluster.fetches == 2  # internal: never fetched
    cluster.topics["app.replies"] = {0}
    targets.new_batch()
    assert await targets.refusal("app.replies:0") is None and cluster.fetches == 3  # created since: found


async def test_results_go_only_to_addresses_the_cache_shows_valid() -> None:
    targets = ReplyTargets(TOPICS, Cluster({"pc.replies": {0, 1}}).fetch)
    assert targets.target("pc.replies:1") is None  # never checked: unknown
    await targets.refusal("pc.replies:1")
    assert targets.target("pc.replies:1") == ("pc.replies", 1)
    assert targets.target("pc.replies:5") is None
    assert targets.target("pc.outcomes") is None
    assert targets.target("") is None
