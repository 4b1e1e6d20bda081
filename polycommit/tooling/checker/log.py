"""The log as the checker's history: intents, outcomes, results, decisions and lock grants folded into what
was decided.

`fold` is pure (decoded records in log order in, a `History` and `LogFacts` out); `read_log` reads the
topics with `polycommit.bus.read_topic`. Built for `polycommit check`, which judges a system it did not
drive: a transaction with no result yet is in flight, not lost; a two-phase commit's Decision is its
commit point, so a decided transaction counts as committed (or aborted) before its result is published.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from polycommit.client import Transaction
from polycommit.config import Settings
from polycommit.lock_log import expand_all
from polycommit.tooling.checker.history import History
from polycommit.tooling.checker.keys import Applied, StepRef
from polycommit.tooling.checker.report import APPLIED_TWICE, CONFLICTING, UNDECIDED, Violation

DECIDED = {"COMMIT": "committed", "ABORT": "aborted"}
# Outcomes whose before-image is the one a step's undo restores: a saga step's, a 2PC participant's vote.
IMAGED = {("EXECUTE", "APPLIED"), ("PREPARE", "PREPARED")}


@dataclass
class LogFacts:
    """What the log says beyond results: when each step applied, how often, votes, decisions, dead letters."""

    applied: dict[StepRef, Applied] = field(default_factory=dict)
    applications: dict[tuple[str, int, str], int] = field(default_factory=dict)  # APPLIED outcomes per action
    prepared: set[str] = field(default_factory=set)  # transactions with a participant that voted PREPARED
    decisions: dict[str, list[str]] = field(default_factory=dict)
    dead_letters: int = 0
    grants: dict[str, list[str]] = field(default_factory=dict)  # resource -> tx ids granted it, in log order


def transaction_of(intent: Mapping[str, Any]) -> Transaction:
    return Transaction(
        steps=list(intent["steps"]),
        name=intent.get("name", ""),
        consistency=intent.get("consistency", "EVENTUAL"),
        isolation=intent.get("isolation", "READ_COMMITTED"),
        priority=intent.get("priority", 0),
        tx_id=intent["tx_id"],
    )


def _outcome(facts: LogFacts, outcome: Mapping[str, Any]) -> None:
    tx_id, step, action, status = outcome["tx_id"], outcome["step_index"], outcome["action"], outcome["status"]
    if status == "APPLIED":
        key = (tx_id, step, action)
        facts.applications[key] = facts.applications.get(key, 0) + 1
    if status == "PREPARED":
        facts.prepared.add(tx_id)
    if (action, status) in IMAGED and (tx_id, step) not in facts.applied:
        facts.applied[(tx_id, step)] = Applied(float(outcome["at_ms"]), outcome.get("before_image"))


def fold(
    intents: Iterable[Mapping[str, Any]],
    outcomes: Iterable[Mapping[str, Any]],
    results: Iterable[Mapping[str, Any]],
    decisions: Iterable[Mapping[str, Any]],
    dead_letters: int = 0,
    locks: Iterable[Mapping[str, Any]] = (),
) -> tuple[History, LogFacts]:
    """Records of each topic in log order -> the history (transactions by first intent) and the facts.
    `locks`: lock events, each resource's in its partition's order (the order the lock table granted it)."""
    history = History(open_is_pending=True)
    facts = LogFacts(dead_letters=dead_letters)
    for intent in intents:
        if intent["tx_id"] not in history.intents:  # a replayed intent is the same transaction
            history.invoke(transaction_of(intent))
    for outcome in outcomes:
        _outcome(facts, outcome)
    for decision in decisions:
        facts.decisions.setdefault(decision["tx_id"], []).append(decision["outcome"])
        history.record(decision["tx_id"], DECIDED.get(decision["outcome"], decision["outcome"]))
    for result in results:
        history.record(result["tx_id"], result["status"])
    for lock in expand_all(locks):  # a record may be about several resources (polycommit/lock_log.py)
        if lock["action"] == "GRANTED":
            facts.grants.setdefault(lock["resource"], []).append(lock["tx_id"])
    return history, facts


def log_violations(history: History, facts: LogFacts) -> list[Violation]:
    """What the log alone shows: a step applied twice, a vote with no decision, two different decisions."""
    found: list[Violation] = []
    for (tx_id, step, action), count in sorted(facts.applications.items()):
        if count > 1 and tx_id in history.intents:
            found.append(Violation(tx_id, APPLIED_TWICE, f"{action} APPLIED {count} times", None, step))
    for tx_id in sorted(facts.prepared):
        if tx_id in history.intents and tx_id not in facts.decisions:
            found.append(Violation(tx_id, UNDECIDED, "participants voted PREPARED; no decision was recorded"))
    for tx_id, outcomes in sorted(facts.decisions.items()):
        if len(set(outcomes)) > 1 and tx_id in history.intents:
            found.append(Violation(tx_id, CONFLICTING, f"decided {' then '.join(outcomes)}"))
    return found


async def read_log(settings: Settings) -> tuple[History, LogFacts]:
    """Read the intents, outcomes, decisions, results and dead letters of `settings`' prefix, and fold."""
    from polycommit.bus import read_topic, topics_for
    from polycommit.codec import default_codec
    from polycommit.errors import CodecError

    codec, topics = default_codec(), topics_for(settings)
    records: dict[str, list[dict[str, Any]]] = {}

    async def read(topic: str, event_type: str) -> list[dict[str, Any]]:
        found = records.setdefault(topic, [])

        def handle(record: Any) -> None:
            with contextlib.suppress(CodecError):  # a poison record: the dead-letter topic accounts for it
                found.append(codec.decode_as(record.value, event_type))

        await read_topic(settings, topic, handle)
        return found

    intents = await read(topics.intents, "TransactionIntent")
    outcomes = await read(topics.outcomes, "StepOutcome")
    decisions = await read(topics.decisions, "Decision")
    results = await read(topics.results, "TransactionResult")
    letters = await read(topics.dead_letters, "DeadLetter")
    locks = await read(topics.locks, "LockEvent")
    return fold(intents, outcomes, results, decisions, len(letters), locks)
