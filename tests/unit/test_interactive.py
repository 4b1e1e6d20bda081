"""Interactive transactions in the coordinator, pure: locks granted or queued on demand before the intent,
the intent run under the locks held, deadlock verdicts acted on only for a victim still waiting in the
cycle, idle and lock-wait timeouts, and a restore that rebuilds what open transactions held and awaited."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lock_requests import request
from step_replies import reply

from orchestrator import registry
from orchestrator.interactive import Interactive
from orchestrator.interactive_inputs import input_topics
from orchestrator.interactive_model import LockRequested, OpenLocks, OpenPhase, VictimChosen
from orchestrator.locking import LockingPhase
from orchestrator.locks import EXCLUSIVE, SHARED, LockMode, covers
from orchestrator.protocol import IntentReceived, LocksGranted, OutcomeReceived, TimerDue, Transition
from orchestrator.saga import SagaPolicy, SagaProtocol
from polycommit import operations as ops
from polycommit.bus import Topics
from polycommit.client import Transaction
from polycommit.codec import default_codec
from polycommit.events import DeadlockVerdict
from projections import tx_state

POLICY = SagaPolicy(default_timeout_ms=1000, backoff_base_ms=100, backoff_max_ms=2000, compensation_retries=2)
ROW = ops.lock_keys(ops.upsert_row("t", {"id": 1}, {"v": 1}))[0]
NODE = ops.lock_keys(ops.merge_node("N", {"id": 1}, {"v": 1}))[0]
WAIT_MS = 500


def protocol() -> Interactive:
    return Interactive(SagaProtocol(POLICY), lock_wait_ms=WAIT_MS)


def verdict(victim: str, *cycle: str) -> DeadlockVerdict:
    return {"cycle": list(cycle), "victim": victim, "scores": {}, "at_ms": 0}


class Members:
    """The protocol and the current state of each transaction, as the driver keeps them."""

    def __init__(self) -> None:
        self.p = protocol()
        self.states: dict[str, Any] = {}

    def keep(self, t: Transition) -> Transition:
        self.states[t.state["intent"]["tx_id"]] = t.state
        return t

    def ask(self, tx_id: str, n: int, keys: list[str], mode: str = "EXCLUSIVE", now: int = 10) -> Transition:
        if tx_id not in self.states:
            return self.keep(self.p.open(request(tx_id, n, keys, mode), now))
        return self.keep(self.p.decide(self.states[tx_id], LockRequested(request(tx_id, n, keys, mode)), now))

    def decide(self, tx_id: str, event: Any, now: int = 20) -> Transition:
        return self.keep(self.p.decide(self.states[tx_id], event, now))


def replies(t: Transition) -> list[tuple[int, str, str | None]]:
    return [(r["request"], r["status"], r["error"]["error_class"] if r["error"] else None) for r in t.lock_replies]


def actions(t: Transition) -> dict[str, str]:
    return {e["resource"]: e["action"] for e in t.lock_requests}


def deadlock(m: Members) -> None:
    """T1 holds the row and waits for the node; T2 holds the node and waits for the row."""
    m.ask("T1", 1, [ROW])
    m.ask("T2", 1, [NODE])
    assert m.ask("T1", 2, [NODE]).state["phase"] == OpenPhase.WAITING
    t = m.ask("T2", 2, [ROW])
    assert t.state["phase"] == OpenPhase.WAITING and t.lock_requests[0]["blockers"] == ["T1"]


def test_a_free_key_is_granted_at_once_and_the_transaction_stays_open_until_its_idle_deadline() -> None:
    m = Members()
    t = m.ask("T1", 1, [ROW, NODE], now=100)
    assert replies(t) == [(1, "GRANTED", None)]
    assert t.state["phase"] == OpenPhase.OPEN and t.state["due_at_ms"] == 100 + WAIT_MS
    assert actions(t) == {ROW: "GRANTED", NODE: "GRANTED"} and not t.commands
    assert OpenLocks.of(t.state).held == {ROW: "EXCLUSIVE", NODE: "EXCLUSIVE"}
    assert m.p.is_in_flight(t.state["phase"]) and registry.is_in_flight(t.state)


def test_a_held_key_queues_the_request_with_its_blocker_and_the_release_grants_it() -> None:
    m = Members()
    m.ask("T1", 1, [ROW])
    waiting = m.ask("T2", 1, [ROW])
    assert waiting.state["phase"] == OpenPhase.WAITING and not waiting.lock_replies
    assert waiting.lock_requests[0]["action"] == "WAITING" and waiting.lock_requests[0]["blockers"] == ["T1"]
    released = m.decide("T1", LockRequested({**request("T1", 2, []), "release": True}))
    assert released.result is not None and released.result["status"] == "ABORTED"
    assert actions(released) == {ROW: "RELEASED"} and released.wake == ["T2"]
    granted = m.decide("T2", LocksGranted())
    assert replies(granted) == [(1, "GRANTED", None)] and granted.state["phase"] == OpenPhase.OPEN


def test_shared_locks_are_held_together_and_an_exclusive_one_waits_for_both() -> None:
    m = Members()
    assert replies(m.ask("R1", 1, [ROW], "SHARED")) == [(1, "GRANTED", None)]
    assert replies(m.ask("R2", 1, [ROW], "SHARED")) == [(1, "GRANTED", None)]
    w = m.ask("W", 1, [ROW])
    assert w.state["phase"] == OpenPhase.WAITING and sorted(w.lock_requests[0]["blockers"]) == ["R1", "R2"]
    assert OpenLocks.of(m.states["R1"]).held == {ROW: SHARED.value}


def test_a_verdict_for_a_waiting_victim_aborts_it_refuses_its_request_and_wakes_the_other() -> None:
    m = Members()
    deadlock(m)
    t = m.decide("T2", VictimChosen(verdict("T2", "T1", "T2")))
    assert t.state["phase"] == OpenPhase.VICTIM and m.p.is_terminal(t.state["phase"])
    assert replies(t) == [(2, "REFUSED", "DeadlockVictimError")]
    assert t.result is not None and t.result["status"] == "ABORTED"
    assert t.result["error"] is not None and t.result["error"]["error_class"] == "DeadlockVictimError"
    assert t.result["error"]["retriable"] is True
    assert actions(t) == {NODE: "RELEASED", ROW: "RELEASED"} and t.wake == ["T1"]
    granted = m.decide("T1", LocksGranted())
    assert replies(granted) == [(2, "GRANTED", None)]
    assert OpenLocks.of(granted.state).held == {ROW: "EXCLUSIVE", NODE: "EXCLUSIVE"}


def test_duplicate_and_stale_verdicts_change_nothing() -> None:
    m = Members()
    deadlock(m)
    victim = m.decide("T2", VictimChosen(verdict("T2", "T1", "T2")))
    again = m.p.decide(victim.state, VictimChosen(verdict("T2", "T1", "T2")), 30)  # delivered twice
    assert again.state is victim.state and not again.publishes()
    m.decide("T1", LocksGranted())
    granted = m.states["T1"]
    stale = m.p.decide(granted, VictimChosen(verdict("T1", "T1", "T2")), 40)  # T1 no longer waits
    assert stale.state is granted and not stale.publishes()
    assert m.p.locks.holds_all("T1")


def test_a_verdict_whose_cycle_the_victim_no_longer_waits_in_changes_nothing() -> None:
    m = Members()
    m.ask("T1", 1, [ROW])
    t = m.ask("T3", 1, [ROW])  # T3 waits for T1, in no cycle with T9
    stale = m.p.decide(t.state, VictimChosen(verdict("T3", "T3", "T9")), 30)
    assert stale.state is t.state and not stale.publishes() and "T3" in m.p.locks


def test_the_intent_runs_at_once_under_the_locks_held_asking_only_what_is_missing() -> None:
    m = Members()
    m.ask("T1", 1, [ROW])
    tx = Transaction(tx_id="T1").add(ops.upsert_row("t", {"id": 1}, {"v": 1})).add(ops.merge_node("N", {"id": 1}))
    t = m.decide("T1", IntentReceived(tx.intent("polycommit.replies:0", "test")))
    assert [c["action"] for c in t.commands] == ["EXECUTE", "EXECUTE"]  # independent steps: in parallel
    assert t.state["started_at_ms"] == 10  # its age counts from its first lock
    pending = list(t.commands)
    while pending:
        t = m.decide("T1", OutcomeReceived(reply(pending.pop(0), "APPLIED")))
        pending.extend(t.commands)
    assert t.result is not None and t.result["status"] == "COMPLETED"
    assert actions(t) == {ROW: "RELEASED", NODE: "RELEASED"} and "T1" not in m.p.locks


def test_the_read_locks_go_when_the_saga_starts_and_the_write_locks_stay_to_its_end() -> None:
    m = Members()
    m.ask("T1", 1, [ROW], "SHARED")  # read
    m.ask("T1", 2, [NODE])  # the key it writes
    assert m.ask("W", 1, [ROW]).state["phase"] == OpenPhase.WAITING  # a writer of what T1 read
    assert m.ask("R", 1, [NODE], "SHARED").state["phase"] == OpenPhase.WAITING  # a reader of what T1 writes
    tx = Transaction(tx_id="T1").add(ops.merge_node("N", {"id": 1}))
    t = m.decide("T1", IntentReceived(tx.intent("polycommit.replies:0", "test")))
    assert [c["action"] for c in t.commands] == ["EXECUTE"]  # the saga started
    assert {e["resource"]: (e["action"], e["mode"]) for e in t.lock_requests if e["tx_id"] == "T1"} == {
        ROW: ("RELEASED", "SHARED"),
        NODE: ("GRANTED", "EXCLUSIVE"),
    }
    assert t.wake == ["W"] and m.p.locks.holds("T1", NODE) and not m.p.locks.holds("R", NODE)


def test_an_intent_waiting_for_a_write_key_is_a_victim_like_an_open_transaction() -> None:
    m = Members()
    deadlock(m)
    tx = Transaction(tx_id="T2").add(ops.upsert_row("t", {"id": 1}, {"v": 2}))
    locking = m.decide("T2", IntentReceived(tx.intent("", "test")), 30)
    t = m.decide("T2", VictimChosen(verdict("T2", "T1", "T2")))
    assert t.state["phase"] == OpenPhase.VICTIM and t.wake == ["T1"] and locking.state["phase"] == LockingPhase.LOCKING
    assert t.result is not None and t.result["error"] is not None
    assert t.result["error"]["error_class"] == "DeadlockVictimError"


def test_an_idle_open_transaction_and_an_expired_wait_are_aborted_with_their_locks_freed() -> None:
    m = Members()
    m.ask("T1", 1, [ROW], now=0)
    m.ask("T2", 1, [ROW], now=0)
    assert not m.decide("T1", TimerDue(), now=WAIT_MS - 1).publishes()  # early
    idle = m.decide("T1", TimerDue(), now=WAIT_MS)
    assert idle.result is not None and idle.result["error"] is not None
    assert idle.result["error"]["error_class"] == "TransactionAbortedError" and idle.wake == ["T2"]
    m.ask("T3", 1, [NODE], now=0)
    m.ask("T4", 1, [NODE], now=0)
    expired = m.decide("T4", TimerDue(), now=WAIT_MS)
    assert replies(expired) == [(1, "REFUSED", "LockTimeoutError")] and expired.state["phase"] == OpenPhase.RELEASED


def test_a_request_for_a_transaction_that_ended_is_refused_and_opens_nothing() -> None:
    p = protocol()
    t = p.open(request("T9", 3, [ROW]), 0)
    assert replies(t) == [(3, "REFUSED", "TransactionAbortedError")] and "T9" not in p.locks
    assert p.is_terminal(t.state["phase"])


def test_a_strong_intent_after_open_locks_is_refused_and_frees_them() -> None:
    m = Members()
    m.ask("T1", 1, [ROW])
    tx = Transaction(tx_id="T1", consistency="STRONG").add(ops.upsert_row("t", {"id": 1}, {"v": 1}))
    t = m.decide("T1", IntentReceived(tx.intent("", "test")))
    assert t.result is not None and t.result["status"] == "FAILED" and "T1" not in m.p.locks


def test_restore_rebuilds_what_open_transactions_held_and_awaited() -> None:
    m = Members()
    m.ask("T1", 1, [ROW], "SHARED")
    m.ask("T2", 1, [NODE])
    m.ask("T3", 1, [ROW, NODE])  # waits for both
    codec = default_codec()
    restored = []
    for state in m.states.values():
        intent_bytes = codec.encode("TransactionIntent", state["intent"])
        record = codec.decode_as(codec.encode("SagaSnapshot", tx_state.to_record(state, intent_bytes)), "SagaSnapshot")
        restored.append(tx_state.from_record(codec, record)[0])
    assert all(registry.is_in_flight(s) for s in restored)
    fresh = protocol()
    assert fresh.restored(reversed(restored)) == []
    assert fresh.locks.holders(ROW) == {"T1": SHARED} and fresh.locks.holders(NODE) == {"T2": EXCLUSIVE}
    assert fresh.locks.blockers("T3") == ["T1", "T2"]
    by_id = {s["intent"]["tx_id"]: s for s in restored}
    fresh.decide(by_id["T1"], LockRequested({**request("T1", 2, []), "release": True}), 30)
    t = fresh.decide(by_id["T2"], LockRequested({**request("T2", 2, []), "release": True}), 30)
    assert t.wake == ["T3"]
    assert replies(fresh.decide(by_id["T3"], LocksGranted(), 40)) == [(1, "GRANTED", None)]


# -- random interleavings: requests, releases, verdicts and timers over a few keys ---------------------

TXS, KEYS = ["T0", "T1", "T2", "T3"], [ROW, NODE, "k:2"]
action = st.one_of(
    st.tuples(
        st.just("ask"),
        st.sampled_from(TXS),
        st.sets(st.sampled_from(KEYS), min_size=1),
        st.sampled_from(["SHARED", "EXCLUSIVE"]),
    ),
    st.tuples(st.just("release"), st.sampled_from(TXS)),
    st.tuples(st.just("verdict"), st.sampled_from(TXS), st.sampled_from(TXS)),
    st.tuples(st.just("timer"), st.integers(min_value=0, max_value=2 * WAIT_MS)),
)


class Driver(Members):
    """Members plus what the service does with a transition: wake whom it names, count every reply."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict[tuple[str, int], int] = {}  # (tx, request) -> replies received
        self.requests: dict[str, int] = {}
        self.now = 10

    def apply(self, t: Transition) -> None:
        self.keep(t)
        for r in t.lock_replies:
            self.asked[(r["tx_id"], r["request"])] = self.asked.get((r["tx_id"], r["request"]), 0) + 1
        if self.p.is_terminal(t.state["phase"]):
            self.states.pop(t.state["intent"]["tx_id"])
        for woken in t.wake:
            self.apply(self.p.decide(self.states[woken], LocksGranted(), self.now))

    def step(self, act: tuple[Any, ...]) -> None:
        kind, tx = act[0], act[1]
        state = self.states.get(tx) if kind != "timer" else None
        if kind == "ask" and (state is None or state["phase"] == OpenPhase.OPEN):
            n = self.requests[tx] = self.requests.get(tx, 0) + 1 if state is not None else 1
            self.asked[(tx, n)] = 0
            req = request(tx, n, sorted(act[2]), act[3])
            self.apply(
                self.p.open(req, self.now) if state is None else self.p.decide(state, LockRequested(req), self.now)
            )
        elif kind == "release" and state is not None:
            self.apply(self.p.decide(state, LockRequested({**request(tx, 99, []), "release": True}), self.now))
        elif kind == "verdict" and state is not None:
            waiting = state["phase"] == OpenPhase.WAITING and bool(set(self.p.locks.blockers(tx)) & {act[2], tx})
            t = self.p.decide(state, VictimChosen(verdict(tx, tx, act[2])), self.now)
            assert (t.state["phase"] == OpenPhase.VICTIM) == waiting  # only a waiter in the cycle dies
            self.apply(t)
        elif kind == "timer":
            self.now += tx
            for due in [s for s in self.states.values() if s["due_at_ms"] <= self.now]:
                if due["intent"]["tx_id"] in self.states:
                    self.apply(self.p.decide(self.states[due["intent"]["tx_id"]], TimerDue(), self.now))

    def check(self) -> None:
        for tx_id, state in self.states.items():
            for key, mode in OpenLocks.of(state).held.items():  # what the client was told it holds, it holds
                held = self.p.locks.holders(key).get(tx_id)  # SHARED still, while its upgrade waits
                assert held is not None and covers(held, LockMode(mode)), (tx_id, key, mode, held)
            waiting = state["phase"] == OpenPhase.WAITING
            assert waiting == (not self.p.locks.holds_all(tx_id)), state["phase"]
        for key in KEYS:
            holders = self.p.locks.holders(key)
            assert len(holders) <= 1 or set(holders.values()) == {SHARED}
        assert all(n <= 1 for n in self.asked.values()), self.asked  # never two answers to one request


@settings(max_examples=300, deadline=None)
@given(st.lists(action, max_size=40))
def test_random_interleavings_keep_the_table_and_the_replies_consistent(actions: list[tuple[Any, ...]]) -> None:
    d = Driver()
    for act in actions:
        d.step(act)
        d.check()
    for tx_id in list(d.states):  # everyone ends: every request got exactly one answer, every lock is free
        if tx_id in d.states:
            d.step(("release", tx_id))
    assert all(n == 1 for n in d.asked.values()), d.asked
    assert len(d.p.locks) == 0


def test_a_first_request_the_driver_refuses_is_answered_and_becomes_a_dead_letter() -> None:
    p = protocol()
    refusal = {"error_class": "InvalidIntentKeyError", "message": "wrong key", "retriable": False}
    t = p.open(request("T9", 1, [ROW]), 0, refusal)  # type: ignore[arg-type]
    assert replies(t) == [(1, "REFUSED", "InvalidIntentKeyError")] and t.rejections == [refusal]
    assert "T9" not in p.locks


class Partitions:
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    async def partitions(self, topic: str) -> list[int]:
        return list(range(self.counts[topic]))


@pytest.mark.parametrize(("verdicts", "read"), [(2, True), (4, False)])
async def test_the_coordinator_reads_verdicts_only_when_they_are_co_partitioned_with_intents(
    verdicts: int, read: bool
) -> None:
    names = Topics("p")
    counts = {names.intents: 2, names.deadlocks: verdicts}
    topics = await input_topics(Partitions(counts), names)  # type: ignore[arg-type]
    assert (names.deadlocks in topics) is read and set(names.coordinator_inputs()) <= set(topics)


def test_a_release_announces_the_new_blockers_of_those_still_waiting() -> None:
    """The detector drops a waiter's edge to whoever released; the waiter's next blocker must be published
    (else a deadlock through it goes unseen until a lock-wait timeout)."""
    m = Members()
    m.ask("T1", 1, [ROW])
    m.ask("T2", 1, [ROW])
    third = m.ask("T3", 1, [ROW])
    assert [e["blockers"] for e in third.lock_requests] == [["T1", "T2"]]
    released = m.decide("T1", LockRequested({**request("T1", 2, []), "release": True}))
    assert released.wake == ["T2"]
    again = [e for e in released.lock_requests if e["tx_id"] == "T3"]
    assert [(e["action"], e["blockers"]) for e in again] == [("WAITING", ["T2"])]
    assert not [e for e in released.lock_requests if e["tx_id"] == "T2"], "T2's own wake-up says GRANTED"
