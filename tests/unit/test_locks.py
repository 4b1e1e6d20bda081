"""The lock table against a simple model, under any sequence of requests and releases: never two holders
of one key, FIFO per key, a waiter is granted exactly when every transaction before it on its keys has
gone, and everything is released at the end."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from orchestrator.locks import EXCLUSIVE, SHARED, LockMode, LockTable

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


# -- shared and exclusive modes, deadlines: the table against the FIFO-prefix model --------------------

MODES = st.sampled_from([SHARED, EXCLUSIVE])
KEY_NAMES = "abcd"


def prefix_holders(entries: list[tuple[str, LockMode]]) -> set[str]:
    """The model of FIFO locking: a key's holders are the longest compatible prefix of the transactions
    asking for it, in arrival order (one EXCLUSIVE, or a run of SHARED)."""
    if not entries:
        return set()
    if entries[0][1] == EXCLUSIVE:
        return {entries[0][0]}
    held: set[str] = set()
    for tx, mode in entries:
        if mode != SHARED:
            break
        held.add(tx)
    return held


class ModesModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = LockTable()
        self.arrivals: list[tuple[str, frozenset[str], LockMode, int]] = []  # (tx, keys, mode, deadline)
        self.now = 0
        self.counter = 0

    def holders_of(self, key: str) -> set[str]:
        return prefix_holders([(t, m) for t, keys, m, _ in self.arrivals if key in keys])

    def model_holds(self, tx: str) -> bool:
        keys = next(k for t, k, _, _ in self.arrivals if t == tx)
        return all(tx in self.holders_of(key) for key in keys)

    @rule(keys=KEYS, mode=MODES, wait=st.integers(min_value=1, max_value=50))
    def request(self, keys: set[str], mode: LockMode, wait: int) -> None:
        self.counter += 1
        tx = f"t{self.counter}"
        self.arrivals.append((tx, frozenset(keys), mode, self.now + wait))
        granted = self.table.request(tx, sorted(keys, reverse=True), mode, deadline_ms=self.now + wait)
        assert granted == self.model_holds(tx)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.arrivals:
            return
        tx = data.draw(st.sampled_from([t for t, _, _, _ in self.arrivals]))
        before = {t for t, _, _, _ in self.arrivals if t != tx and self.model_holds(t)}
        woken = self.table.release(tx)
        self.arrivals = [a for a in self.arrivals if a[0] != tx]
        after = {t for t, _, _, _ in self.arrivals if self.model_holds(t)}
        assert set(woken) == after - before  # exactly the newly granted, each once
        order = [t for t, _, _, _ in self.arrivals]
        assert woken == sorted(woken, key=order.index)  # in arrival order

    @rule(step=st.integers(min_value=1, max_value=30))
    def time_passes(self, step: int) -> None:
        self.now += step
        expected = [t for t, _, _, due in self.arrivals if due <= self.now and not self.model_holds(t)]
        assert self.table.expired(self.now) == expected

    @invariant()
    def holders_match_the_model_and_are_compatible(self) -> None:
        for key in KEY_NAMES:
            holders = self.table.holders(key)
            assert set(holders) == self.holders_of(key)
            assert len(holders) <= 1 or all(m == SHARED for m in holders.values())  # never two unless all SHARED

    @invariant()
    def a_waiter_waits_only_for_earlier_arrivals(self) -> None:
        """No starvation, no deadlock: whoever a waiter waits for arrived before it, so once everything
        ahead of it has released, it holds its keys (the model's prefix says so too)."""
        order = [t for t, _, _, _ in self.arrivals]
        for tx in order:
            blockers = self.table.blockers(tx)
            assert bool(blockers) == (not self.table.holds_all(tx))
            assert all(order.index(b) < order.index(tx) for b in blockers)

    @invariant()
    def no_grantable_head_is_left_waiting(self) -> None:
        for key in KEY_NAMES:
            queued = self.table.queued(key)
            if queued:
                head_mode = self.table.mode_of(queued[0], key)
                holders = self.table.holders(key)
                assert holders and not (head_mode == SHARED and all(m == SHARED for m in holders.values()))

    def teardown(self) -> None:
        for tx, _, _, _ in list(self.arrivals):
            self.table.release(tx)
        assert len(self.table) == 0
        assert all(self.table.holder(k) is None and not self.table.queued(k) for k in KEY_NAMES)


def test_shared_and_exclusive_locks_match_the_fifo_model() -> None:
    run_state_machine_as_test(ModesModel)


# -- one request in two modes (an interactive transaction's commit: writes EXCLUSIVE, reads SHARED) ----


class MixedModesModel(RuleBasedStateMachine):
    """Each transaction holds nothing and asks every key it needs at once, some EXCLUSIVE and the others
    SHARED: the coordinator's two `request` calls for one LockRequest with `shared_keys`, back to back. The
    FIFO model holds per key, and a waiter only ever waits for transactions that arrived before it, so such
    requests can never close a cycle, however their keys and modes cross."""

    def __init__(self) -> None:
        super().__init__()
        self.table = LockTable()
        self.arrivals: list[tuple[str, dict[str, LockMode]]] = []  # (tx, key -> mode), in arrival order
        self.counter = 0

    def holders_of(self, key: str) -> set[str]:
        return prefix_holders([(t, modes[key]) for t, modes in self.arrivals if key in modes])

    def model_holds(self, tx: str) -> bool:
        return all(tx in self.holders_of(key) for key in dict(self.arrivals)[tx])

    @rule(writes=KEYS, reads=KEYS)
    def request(self, writes: set[str], reads: set[str]) -> None:
        self.counter += 1
        tx = f"t{self.counter}"
        modes: dict[str, LockMode] = {**{k: SHARED for k in reads}, **{k: EXCLUSIVE for k in writes}}
        self.arrivals.append((tx, modes))
        self.table.request(tx, sorted(writes), EXCLUSIVE)
        granted = self.table.request(tx, sorted(set(reads) - set(writes)), SHARED)
        assert granted == self.model_holds(tx)
        assert {k: self.table.mode_of(tx, k) for k in modes} == modes

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.arrivals:
            return
        tx = data.draw(st.sampled_from([t for t, _ in self.arrivals]))
        before = {t for t, _ in self.arrivals if t != tx and self.model_holds(t)}
        woken = self.table.release(tx)
        self.arrivals = [a for a in self.arrivals if a[0] != tx]
        assert set(woken) == {t for t, _ in self.arrivals if self.model_holds(t)} - before

    @invariant()
    def holders_match_the_model_and_are_compatible(self) -> None:
        for key in KEY_NAMES:
            holders = self.table.holders(key)
            assert set(holders) == self.holders_of(key)
            assert len(holders) <= 1 or all(m == SHARED for m in holders.values())

    @invariant()
    def a_waiter_waits_only_for_earlier_arrivals_so_no_cycle_can_form(self) -> None:
        order = [t for t, _ in self.arrivals]
        for tx in order:
            assert all(order.index(b) < order.index(tx) for b in self.table.blockers(tx))
            assert self.table.mutual_waits(tx) == []

    def teardown(self) -> None:
        for tx, _ in list(self.arrivals):
            self.table.release(tx)
        assert len(self.table) == 0


def test_requests_in_two_modes_at_once_match_the_fifo_model_and_never_close_a_cycle() -> None:
    run_state_machine_as_test(MixedModesModel)


# -- upgrades ----------------------------------------------------------------------------------------


class UpgradeModel(RuleBasedStateMachine):
    """Readers take SHARED locks and may upgrade to EXCLUSIVE; writers ask EXCLUSIVE from the start."""

    def __init__(self) -> None:
        super().__init__()
        self.table = LockTable()
        self.live: dict[str, frozenset[str]] = {}
        self.upgrading: set[str] = set()
        self.counter = 0

    @rule(keys=KEYS, mode=MODES)
    def request(self, keys: set[str], mode: LockMode) -> None:
        self.counter += 1
        tx = f"t{self.counter}"
        self.live[tx] = frozenset(keys)
        self.table.request(tx, keys, mode)

    @rule(data=st.data())
    def upgrade(self, data: st.DataObject) -> None:
        readers = [
            t
            for t, keys in self.live.items()
            if t not in self.upgrading and self.table.holds_all(t) and keys
            if all(self.table.mode_of(t, k) == SHARED for k in keys)
        ]
        if not readers:
            return
        tx = data.draw(st.sampled_from(readers))
        alone = all(set(self.table.holders(k)) == {tx} for k in self.live[tx])
        granted = self.table.request(tx, self.live[tx], EXCLUSIVE)
        assert granted == alone  # at once exactly when it is every key's only holder
        self.upgrading.add(tx)
        for key in self.live[tx]:
            assert tx in self.table.holders(key)  # it keeps its SHARED lock while it waits
            queued = self.table.queued(key)
            if tx in queued:  # waits ahead of every waiter that does not hold the key
                ahead = queued[: queued.index(tx)]
                assert all(t in self.table.holders(key) for t in ahead)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.live:
            return
        tx = data.draw(st.sampled_from(sorted(self.live)))
        woken = self.table.release(tx)
        del self.live[tx]
        self.upgrading.discard(tx)
        assert all(self.table.holds_all(t) for t in woken)

    @invariant()
    def compatible_holders_and_a_blocked_head(self) -> None:
        for key in KEY_NAMES:
            holders = self.table.holders(key)
            assert len(holders) <= 1 or all(m == SHARED for m in holders.values())
            queued = self.table.queued(key)
            if queued:
                others = {t: m for t, m in holders.items() if t != queued[0]}
                head = self.table.mode_of(queued[0], key)
                assert others and not (head == SHARED and all(m == SHARED for m in others.values()))

    @invariant()
    def an_upgrader_alone_on_its_keys_holds_them_exclusively(self) -> None:
        for tx in self.upgrading:
            if all(set(self.table.holders(k)) == {tx} for k in self.live[tx]):
                assert self.table.holds_all(tx)
                assert all(self.table.holders(k)[tx] == EXCLUSIVE for k in self.live[tx])

    def teardown(self) -> None:
        for tx in list(self.live):
            self.table.release(tx)
        assert len(self.table) == 0
        assert all(self.table.holder(k) is None and not self.table.queued(k) for k in KEY_NAMES)


def test_upgrades_follow_the_rules() -> None:
    run_state_machine_as_test(UpgradeModel)


def test_an_upgrade_waits_ahead_of_writers_queued_before_it() -> None:
    table = LockTable()
    assert table.request("r1", ["k"], SHARED)
    assert table.request("r2", ["k"], SHARED)
    assert not table.request("w", ["k"], EXCLUSIVE)
    assert not table.request("r1", ["k"], EXCLUSIVE)  # r2 still reads
    assert table.queued("k") == ["r1", "w"]
    assert table.blockers("r1") == ["r2"] and table.blockers("w") == ["r1", "r2"]
    assert table.release("r2") == ["r1"]  # the upgrade first, not the writer that asked earlier
    assert table.holders("k") == {"r1": EXCLUSIVE}
    assert table.release("r1") == ["w"]


def test_a_reader_does_not_pass_a_queued_writer() -> None:
    table = LockTable()
    assert table.request("r1", ["k"], SHARED)
    assert not table.request("w", ["k"], EXCLUSIVE)
    assert not table.request("r2", ["k"], SHARED)  # compatible with r1, but w asked first: no starvation
    assert table.blockers("r2") == ["w"]
    assert table.release("r1") == ["w"]
    assert table.release("w") == ["r2"]


def test_a_lock_wait_expires_only_while_waiting() -> None:
    table = LockTable()
    assert table.request("t1", ["k"], deadline_ms=10)
    assert not table.request("t2", ["k"], deadline_ms=20)
    assert table.expired(15) == [] and table.expired(20) == ["t2"]
    assert table.release("t1") == ["t2"]
    assert table.expired(100) == []
