"""How many partitions each topic gets when `polycommit topics create` makes it (polycommit/bus.py)."""

from __future__ import annotations

from polycommit.bus import DEFAULT_PARTITIONS, Topics, partition_counts

TOPICS = Topics("p")


def test_the_coordinators_inputs_the_command_topics_and_the_lock_events_start_with_one_partition() -> None:
    counts = partition_counts(TOPICS)
    single = [TOPICS.intents, TOPICS.outcomes, TOPICS.tx_state, TOPICS.deadlocks, TOPICS.locks]
    single += [TOPICS.commands(store) for store in ("postgres", "qdrant", "neo4j")]
    assert {name: counts[name] for name in single} == dict.fromkeys(single, 1)
    fan_out = [TOPICS.replies, TOPICS.results, TOPICS.alerts, TOPICS.dead_letters, TOPICS.decisions]
    assert {name: counts[name] for name in fan_out} == dict.fromkeys(fan_out, DEFAULT_PARTITIONS)
    assert set(counts) == set(TOPICS.all())


def test_a_count_asked_for_wins_by_short_or_full_name() -> None:
    counts = partition_counts(TOPICS, {"commands.neo4j": 3, "p.replies": 8})
    assert counts[TOPICS.commands("neo4j")] == 3
    assert counts[TOPICS.replies] == 8
    assert counts[TOPICS.commands("postgres")] == 1


def test_the_coordinators_inputs_changelog_and_verdicts_always_share_the_intents_count() -> None:
    counts = partition_counts(TOPICS, {"intents": 6, "outcomes": 2, "tx-state": 3})
    shared = [TOPICS.intents, TOPICS.outcomes, TOPICS.tx_state, TOPICS.deadlocks]
    assert [counts[name] for name in shared] == [6, 6, 6, 6]
