"""The coordinator's input positions (orchestrator/positions.py): kept in memory as a member folds, read
back from the changelog, copied to the group only once committed; and the changelog's readers keep them
apart from the transactions."""

from __future__ import annotations

from aiokafka import TopicPartition

from orchestrator import positions as pos
from orchestrator import saga
from orchestrator.admission import key_refusal
from orchestrator.positions import InputPositions, position_key, position_record
from orchestrator.saga import SagaPolicy
from polycommit import operations as ops
from polycommit.client import Saga
from polycommit.codec import default_codec
from polycommit.events import TransactionIntent
from polycommit.tooling.inspect import describe_backlog
from projections import status, tx_state

INTENTS0, INTENTS1, OUTCOMES0 = (
    TopicPartition("p.intents", 0),
    TopicPartition("p.intents", 1),
    TopicPartition("p.outcomes", 0),
)


def restored(*entries: tuple[TopicPartition, int]) -> InputPositions:
    p = InputPositions()
    p.restored(position_record(tp, offset) for tp, offset in entries)
    return p


def test_records_below_a_restored_position_were_folded_already() -> None:
    p = restored((INTENTS0, 10))
    assert [o for o in range(8, 13) if p.fresh(INTENTS0, o)] == [10, 11, 12]
    assert p.fresh(INTENTS1, 0)  # no position: everything the consumer hands over is new
    assert p.take_seeks() == {INTENTS0: 10} and p.take_seeks() == {}  # the consumer is moved there once


def test_a_loop_commits_only_the_positions_it_moved() -> None:
    p = restored((INTENTS0, 10))
    assert p.folded({INTENTS0: 7, OUTCOMES0: 3}) == {OUTCOMES0: 3}  # a stale batch moves nothing back
    assert p.folded({INTENTS0: 12}) == {INTENTS0: 12}
    assert p.next == {INTENTS0: 12, OUTCOMES0: 3}


def test_only_committed_positions_are_copied_to_the_group_and_each_once() -> None:
    p = restored((INTENTS0, 10))
    p.folded({INTENTS0: 20, OUTCOMES0: 5})
    assert p.copy_due(0) == {INTENTS0: 10}  # restored = committed; 20 and 5 are not committed yet
    p.copied_now({INTENTS0: 10})
    p.committed_now({INTENTS0: 20})
    assert p.copy_due(1) == {}  # not due before GROUP_COPY_MS
    assert p.copy_due(pos.GROUP_COPY_MS) == {INTENTS0: 20}
    p.copied_now({INTENTS0: 20})
    assert p.uncopied() == {}


def test_a_commit_never_moves_a_committed_position_back_nor_keeps_one_given_up() -> None:
    p = restored((INTENTS0, 10), (INTENTS1, 4))
    p.committed_now({INTENTS0: 8})
    p.forget({1})
    p.committed_now({INTENTS1: 9})  # a transaction of the assignment that ended, committed after it
    assert p.committed == {INTENTS0: 10} and p.next == {INTENTS0: 10}
    p.forget_all()
    assert (p.next, p.committed, p.copied, p.seeks) == ({}, {}, {}, {})


def saga_intent() -> TransactionIntent:
    tx = Saga("positions", tx_id="tx-1")
    tx.step(ops.upsert_row("t", {"id": 1}, {"v": 1}))
    return tx.intent("polycommit.replies:0", "test")


def test_the_changelog_folds_keep_positions_apart_from_transactions() -> None:
    codec = default_codec()
    policy = SagaPolicy()
    state = saga.start(saga_intent(), 0, policy).state
    snapshot = codec.encode(
        "SagaSnapshot", tx_state.to_record(state, codec.encode("TransactionIntent", state["intent"]))
    )
    raw = [
        (position_key(INTENTS0), codec.encode("InputPosition", position_record(INTENTS0, 3))),
        (state["intent"]["tx_id"], snapshot),
        (position_key(INTENTS0), codec.encode("InputPosition", position_record(INTENTS0, 9))),
        (position_key(OUTCOMES0), b"not an event"),
    ]
    folded = tx_state.fold_changelog(codec, raw)
    assert list(folded.states) == [state["intent"]["tx_id"]] and folded.corrupt_snapshots == 0  # not transactions
    assert folded.positions == [position_record(INTENTS0, 9)] and folded.corrupt_positions == 1  # latest per key


def test_a_tx_id_in_the_reserved_key_space_is_refused() -> None:
    tx_id = position_key(INTENTS0)
    refusal = key_refusal(tx_id.encode(), tx_id)
    assert refusal is not None and refusal["error_class"] == "InvalidIntentKeyError"
    assert pos.RESERVED_PREFIX in refusal["message"]
    assert key_refusal(b"polycommit-demo-1", "polycommit-demo-1") is None  # only the prefix with its colon


def test_the_backlog_is_each_partition_s_end_less_its_folded_position() -> None:
    ends = {("p.intents", 0): 10, ("p.intents", 1): 4, ("p.outcomes", 0): 30, ("p.outcomes", 1): 0}
    folded = [position_record(INTENTS0, 10), position_record(INTENTS1, 1), position_record(OUTCOMES0, 12)]
    assert status.backlog(folded, ends) == {"p.intents": 3, "p.outcomes": 18}
    assert status.backlog([], ends) == {"p.intents": 14, "p.outcomes": 30}  # nothing folded yet: from 0


def test_status_names_the_backlog_by_topic_or_says_why_not() -> None:
    assert describe_backlog({"p.outcomes": 3, "p.intents": 0}) == (
        "coordinator backlog (offsets not folded yet): intents 0, outcomes 3"
    )
    assert (
        describe_backlog("unknown (KafkaConnectionError: down)")
        == "coordinator backlog: unknown (KafkaConnectionError: down)"
    )
