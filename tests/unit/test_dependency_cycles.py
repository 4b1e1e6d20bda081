"""The list-append cycle checker finds each anomaly it names, and none in any serial execution."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polycommit.tooling.checker.cycles import Append, Read, Txn, analyse


def test_a_serial_history_has_no_anomaly() -> None:
    history = [
        Txn("t1", (Append("x", 1),)),
        Txn("t2", (Read("x", (1,)), Append("x", 2))),
        Txn("t3", (Read("x", (1, 2)),)),
    ]
    analysis = analyse(history)
    assert analysis.anomalies == []
    assert analysis.version_orders == {"x": (1, 2)}


def test_writes_interleaved_in_opposite_orders_on_two_keys_are_g0() -> None:
    history = [
        Txn("t1", (Append("x", 1), Append("y", 2))),
        Txn("t2", (Append("x", 3), Append("y", 4))),
        Txn("t3", (Read("x", (1, 3)), Read("y", (4, 2)))),
    ]
    kinds = analyse(history).kinds()
    assert "G0" in kinds


def test_each_reading_the_others_write_is_g1c() -> None:
    history = [
        Txn("t1", (Append("x", 1), Read("y", (2,)))),
        Txn("t2", (Append("y", 2), Read("x", (1,)))),
    ]
    analysis = analyse(history)
    assert analysis.kinds() == {"G1c"}
    (g1c,) = [a for a in analysis.anomalies if a.kind == "G1c"]
    assert set(g1c.transactions) == {"t1", "t2"}
    assert "-wr->" in g1c.detail


def test_write_skew_is_g2_and_nothing_weaker() -> None:
    history = [
        Txn("t1", (Read("x", ()), Append("y", 1))),
        Txn("t2", (Read("y", ()), Append("x", 2))),
        Txn("t3", (Read("x", (2,)), Read("y", (1,)))),
    ]
    analysis = analyse(history)
    assert analysis.kinds() == {"G2"}
    (g2,) = analysis.anomalies
    assert set(g2.transactions) >= {"t1", "t2"}
    assert "-rw->" in g2.detail


def test_a_committed_read_of_an_aborted_append_is_g1a() -> None:
    history = [
        Txn("t1", (Append("x", 1),), committed=False),
        Txn("t2", (Read("x", (1,)),)),
    ]
    (anomaly,) = analyse(history).anomalies
    assert anomaly.kind == "G1a"
    assert anomaly.transactions == ("t2", "t1")


def test_reads_no_single_order_explains_are_reported() -> None:
    history = [
        Txn("t1", (Append("x", 1),)),
        Txn("t2", (Append("x", 2),)),
        Txn("t3", (Read("x", (1, 2)),)),
        Txn("t4", (Read("x", (2,)),)),
    ]
    assert "incompatible-order" in analyse(history).kinds()


def test_a_value_appended_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="appended twice"):
        analyse([Txn("t1", (Append("x", 1),)), Txn("t2", (Append("x", 1),))])


# A transaction: a list of (is_read, key) operations; appended values are made unique when it runs.
_ops = st.lists(st.tuples(st.booleans(), st.sampled_from("abc")), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ops, min_size=1, max_size=12))
def test_any_serial_execution_has_no_anomaly(transactions: list[list[tuple[bool, str]]]) -> None:
    """Run the transactions one after another against a dict of lists: whatever they do, the history
    is serial, so the checker must find nothing (it would, were an edge built the wrong way round)."""
    lists: dict[str, list[int]] = {}
    history: list[Txn] = []
    counter = 0
    for i, ops in enumerate(transactions):
        done: list[Append | Read] = []
        for is_read, key in ops:
            if is_read:
                done.append(Read(key, tuple(lists.get(key, []))))
            else:
                counter += 1
                lists.setdefault(key, []).append(counter)
                done.append(Append(key, counter))
        history.append(Txn(f"t{i}", tuple(done)))
    history.append(Txn("final", tuple(Read(key, tuple(values)) for key, values in lists.items())))
    assert analyse(history, final_reads=True).anomalies == []


def test_a_committed_append_missing_from_the_final_read_is_lost_only_when_reads_are_final() -> None:
    history = [
        Txn("t1", (Read("x", ()), Append("x", 1))),
        Txn("t2", (Read("x", ()), Append("x", 2))),  # wrote [2] over [1]: a lost update
        Txn("final", (Read("x", (2,)),)),
    ]
    assert "lost-append" not in analyse(history).kinds()
    (lost,) = [a for a in analyse(history, final_reads=True).anomalies if a.kind == "lost-append"]
    assert lost.transactions == ("t1",)
