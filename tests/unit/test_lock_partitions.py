"""The lock manager split by key (orchestrator/lock_partitions.py), under any interleaving of its messages:
transactions whose keys fall in several partitions ask them in partition order; requests and releases reach
a partition in the order of its log, grants reach a transaction in the order they were sent, and otherwise
anything may come first. Whatever the order: no two transactions ever believe they hold conflicting locks,
every partition's waiters are granted first come, first served, and once the messages run out every
transaction has held all its keys and ended: keys known up front never deadlock across partitions.
Asking every partition at once instead does deadlock (the last test), so the model can fail."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.lock_partitions import Acquisition, LockPartition, PartitionGrant, PartitionRequest
from orchestrator.locks import EXCLUSIVE, SHARED, LockMode

KEYS = "abcdefgh"
PARTITIONS = 3


def partition_of(key: str) -> int:
    return KEYS.index(key) % PARTITIONS


def compatible(a: LockMode, b: LockMode) -> bool:
    return a == SHARED and b == SHARED


@dataclass
class Network:
    """The partitions, the transactions, and the messages between them not delivered yet."""

    wanted: dict[str, dict[str, LockMode]]
    partitions: dict[int, LockPartition] = field(default_factory=dict)
    acquisitions: dict[str, Acquisition] = field(default_factory=dict)
    to_partition: dict[int, deque[PartitionRequest | str]] = field(default_factory=dict)  # a str: a release
    to_tx: dict[str, deque[PartitionGrant]] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    granted_order: dict[int, list[str]] = field(default_factory=dict)  # per partition, as granted

    def __post_init__(self) -> None:
        self.partitions = {p: LockPartition(p) for p in range(PARTITIONS)}
        self.to_partition = {p: deque() for p in range(PARTITIONS)}
        self.granted_order = {p: [] for p in range(PARTITIONS)}
        for tx_id, keys in self.wanted.items():
            self.to_tx[tx_id] = deque()
            acquisition = self.acquisitions[tx_id] = Acquisition(tx_id, keys, partition_of)
            first = acquisition.first()
            if first is not None:
                self.to_partition[first.partition].append(first)

    # -- what may happen next ------------------------------------------------------------------------

    def enabled(self) -> list[tuple[str, object]]:
        steps: list[tuple[str, object]] = [("partition", p) for p, q in self.to_partition.items() if q]
        steps += [("tx", t) for t, q in self.to_tx.items() if q]
        steps += [("end", t) for t, a in self.acquisitions.items() if a.done and t not in self.ended]
        return steps

    def step(self, kind: str, who: object) -> None:
        if kind == "partition":
            assert isinstance(who, int)
            self._deliver_to_partition(who)
        elif kind == "tx":
            assert isinstance(who, str)
            grant = self.to_tx[who].popleft()
            following = self.acquisitions[who].on_grant(grant)
            if following is not None:
                self.to_partition[following.partition].append(following)
        else:
            assert isinstance(who, str)
            self.ended.add(who)
            for partition in self.acquisitions[who].asked():
                self.to_partition[partition].append(who)

    def _deliver_to_partition(self, partition: int) -> None:
        message = self.to_partition[partition].popleft()
        lock_partition = self.partitions[partition]
        if isinstance(message, PartitionRequest):
            answers = [lock_partition.on_request(message)]
        else:
            answers = lock_partition.on_release(message)
        for answer in answers:
            if answer.granted:
                self.granted_order[partition].append(answer.tx_id)
            self.to_tx[answer.tx_id].append(answer)

    # -- what must hold ------------------------------------------------------------------------------

    def believed(self, tx_id: str) -> dict[str, LockMode]:
        """The locks `tx_id` acts on: the keys of the partitions it was granted, until it ends."""
        if tx_id in self.ended:
            return {}
        granted = set(self.acquisitions[tx_id].granted())
        return {k: m for k, m in self.wanted[tx_id].items() if partition_of(k) in granted}

    def check_exclusion(self) -> None:
        held = {t: self.believed(t) for t in self.wanted}
        for a in held:
            for b in held:
                if a < b:
                    for key in held[a].keys() & held[b].keys():
                        assert compatible(held[a][key], held[b][key]), (a, b, key)


def drain(network: Network, choose: Callable[[list[tuple[str, object]]], tuple[str, object]]) -> None:
    for _ in range(10_000):
        steps = network.enabled()
        if not steps:
            return
        network.step(*choose(steps))
        network.check_exclusion()
    raise AssertionError("the messages never ran out")


TRANSACTIONS = st.dictionaries(
    st.sampled_from([f"t{i}" for i in range(6)]),
    st.dictionaries(st.sampled_from(KEYS), st.sampled_from([SHARED, EXCLUSIVE]), min_size=1, max_size=4),
    min_size=2,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(wanted=TRANSACTIONS, data=st.data())
def test_any_interleaving_keeps_exclusion_and_ends_every_transaction(
    wanted: dict[str, dict[str, LockMode]], data: st.DataObject
) -> None:
    network = Network(wanted)
    drain(network, lambda steps: data.draw(st.sampled_from(steps)))
    assert network.ended == set(wanted)  # no deadlock: every transaction held all its keys and ended
    assert all(not p.table.waiting() and len(p.table) == 0 for p in network.partitions.values())


@settings(max_examples=200, deadline=None)
@given(wanted=TRANSACTIONS, data=st.data())
def test_a_partition_grants_exclusive_requests_in_their_arrival_order(
    wanted: dict[str, dict[str, LockMode]], data: st.DataObject
) -> None:
    """Only EXCLUSIVE locks: each partition grants its transactions exactly in the order their requests
    reached it (FIFO, nobody overtaken), whatever else happens meanwhile."""
    exclusive = {t: dict.fromkeys(keys, EXCLUSIVE) for t, keys in wanted.items()}
    network = Network(exclusive)
    arrived: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}

    def choose(steps: list[tuple[str, object]]) -> tuple[str, object]:
        kind, who = data.draw(st.sampled_from(steps))
        if kind == "partition":
            assert isinstance(who, int)
            head = network.to_partition[who][0]
            if isinstance(head, PartitionRequest):
                arrived[who].append(head.tx_id)
        return kind, who

    drain(network, choose)
    for partition, order in arrived.items():
        granted = network.granted_order[partition]

        def here(tx_id: str, partition: int = partition) -> set[str]:
            return {key for key in exclusive[tx_id] if partition_of(key) == partition}

        # Two requests on disjoint keys of one partition may be granted in any order; on a common key the
        # earlier arrival first.
        for i, first in enumerate(order):
            for second in order[i + 1 :]:
                if here(first) & here(second):
                    assert granted.index(first) < granted.index(second), (partition, first, second)


def test_the_partitions_are_asked_in_partition_order_each_after_the_last_granted() -> None:
    acquisition = Acquisition("t", {"c": EXCLUSIVE, "a": SHARED, "b": EXCLUSIVE, "d": EXCLUSIVE}, partition_of)
    assert acquisition.partitions() == [0, 1, 2]  # a, d -> 0; b -> 1; c -> 2
    first = acquisition.first()
    assert first == PartitionRequest("t", 0, (("a", SHARED), ("d", EXCLUSIVE)))
    assert acquisition.on_grant(PartitionGrant("t", 0, False, ("u",))) is None
    assert acquisition.blockers == ("u",) and acquisition.waiting_in == 0 and acquisition.asked() == [0]
    assert acquisition.granted() == []
    second = acquisition.on_grant(PartitionGrant("t", 0, True))
    assert second == PartitionRequest("t", 1, (("b", EXCLUSIVE),))
    assert acquisition.on_grant(PartitionGrant("t", 0, True)) is None  # a repeat of an earlier answer
    third = acquisition.on_grant(PartitionGrant("t", 1, True))
    assert third is not None and third.partition == 2 and not acquisition.done
    assert acquisition.on_grant(PartitionGrant("t", 2, True)) is None and acquisition.done
    assert acquisition.asked() == acquisition.granted() == [0, 1, 2] and acquisition.waiting_in is None


def test_a_request_asked_again_is_answered_again_and_queued_once() -> None:
    partition = LockPartition(0)
    holder, waiter = PartitionRequest("h", 0, (("a", EXCLUSIVE),)), PartitionRequest("w", 0, (("a", EXCLUSIVE),))
    assert partition.on_request(holder).granted
    assert partition.on_request(waiter) == PartitionGrant("w", 0, False, ("h",))
    assert partition.on_request(waiter) == PartitionGrant("w", 0, False, ("h",))  # redelivered
    assert partition.on_release("h") == [PartitionGrant("w", 0, True)]
    assert partition.table.queued("a") == []


def test_asking_every_partition_at_once_deadlocks() -> None:
    """Why one partition at a time: sent together, t1's request reaches partition 0 first and t2's
    partition 1 first; each is granted one partition and queued behind the other in the other."""
    partitions = {p: LockPartition(p) for p in (0, 1)}
    t1 = [PartitionRequest("t1", 0, (("a", EXCLUSIVE),)), PartitionRequest("t1", 1, (("b", EXCLUSIVE),))]
    t2 = [PartitionRequest("t2", 0, (("a", EXCLUSIVE),)), PartitionRequest("t2", 1, (("b", EXCLUSIVE),))]
    answers = [
        partitions[0].on_request(t1[0]),
        partitions[1].on_request(t2[1]),
        partitions[0].on_request(t2[0]),
        partitions[1].on_request(t1[1]),
    ]
    assert [a.granted for a in answers] == [True, True, False, False]
    assert answers[2].blockers == ("t1",) and answers[3].blockers == ("t2",)  # a cycle: neither can end
