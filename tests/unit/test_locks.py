"""The lock table against a simple model, under any sequence of requests and releases: never two holders
of one key, FIFO per key, a waiter is granted exactly when every transaction before it on its keys has
gone, and everything is released at the end."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from orchestrator.locks import LockTable

KEYS = st.sets(st.sampled_from(["a", "b", "c", "d"]), max_size=3)


class LockModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = LockTable()
        self.arrivals: list[tuple[str, frozenset[str]]] = []  # the model: requests in arrival order
        self.granted: set[str] = set()
        self.counter = 0

    def model_holds(self, tx: str) -> bool:
        keys = dict(self.arrivals)[tx]
        for other, other_keys in self.arrivals:
            if other == tx:
                return True
            if other_keys & keys:
                return False
        raise AssertionError("unreachable")

    @rule(keys=KEYS)
    def request(self, keys: set[str]) -> None:
        self.counter += 1
        tx = f"t{self.counter}"
        self.arrivals.append((tx, frozenset(keys)))
        granted = self.table.request(tx, sorted(keys, reverse=True))
        assert granted == self.model_holds(tx)
        if granted:
            self.granted.add(tx)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.arrivals:
            return
        tx, _ = data.draw(st.sampled_from(self.arrivals))
        before = {t for t, _ in self.arrivals if t != tx and self.model_holds(t)}
        woken = self.table.release(tx)
        self.arrivals = [(t, k) for t, k in self.arrivals if t != tx]
        after = {t for t, _ in self.arrivals if self.model_holds(t)}
        assert set(woken) == after - before  # exactly the newly granted, each once
        order = [t for t, _ in self.arrivals]
        assert woken == sorted(woken, key=order.index)  # in arrival order

    @invariant()
    def one_holder_per_key(self) -> None:
        holders = [t for t, _ in self.arrivals if self.table.holds_all(t)]
        for key in "abcd":
            assert sum(1 for t in holders if key in dict(self.arrivals)[t]) <= 1
        assert holders == [t for t, _ in self.arrivals if self.model_holds(t)]

    def teardown(self) -> None:
        for tx, _ in list(self.arrivals):
            self.table.release(tx)
        assert len(self.table) == 0 and self.table.holder("a") is None


def test_lock_table_matches_the_model() -> None:
    run_state_machine_as_test(LockModel)


def test_a_repeated_request_is_not_queued_twice() -> None:
    table = LockTable()
    assert table.request("t1", ["k"])
    assert not table.request("t2", ["k"])
    assert not table.request("t2", ["k"])
    assert table.blockers("t2") == ["t1"]
    assert table.release("t1") == ["t2"]
    assert table.release("t2") == []
