"""What a transition publishes: commands, decisions, lock events, alerts, dead letters and the result.

The driver (orchestrator/service.py) folds events through a protocol and hands each transition here; this
turns it into the records of the loop's Kafka transaction, routed to their topics and keys, with the
trace context of the input and the metrics each kind of record counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from orchestrator import registry
from orchestrator.admission import ReplyTargets
from orchestrator.lock_partitions import partition_record
from orchestrator.positions import Offsets, position_key, position_record
from orchestrator.protocol import Transition, TxState
from polycommit import lock_log, tracing
from polycommit.bus import Outgoing, Topics
from polycommit.codec import EventCodec
from polycommit.deadletters import dead_letter
from polycommit.errors import PermanentError
from polycommit.events import ErrorInfo, LockEvent, TransactionResult

log = logging.getLogger("orchestrator.service")

COORDINATOR_LABELS = {"process": "coordinator"}  # the labels of this process's metrics


@dataclass
class CoordinatorStats:
    intents: int = 0
    outcomes: int = 0
    commands: int = 0
    results: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    restored: int = 0
    restarts: int = 0
    loops_started_over: int = 0  # a rebalance ran while the loop folded or committed (rebalance.py)
    corrupt_snapshots: int = 0
    kafka_transactions: int = 0
    # Where the loop's time goes (seconds, cumulative): reading, folding events, the Kafka transaction.
    read_s: float = 0.0
    fold_s: float = 0.0
    commit_s: float = 0.0


def position_records(topics: Topics, offsets: Offsets) -> list[Outgoing]:
    """How far the inputs were folded, as changelog records in their own partitions (positions.py)."""
    return [
        Outgoing(topics.tx_state, position_key(tp), "InputPosition", position_record(tp, o), tp.partition)
        for tp, o in offsets.items()
    ]


class TransitionWriter:
    """Builds the outgoing records of transitions; counts them in the coordinator's stats and metrics."""

    def __init__(
        self,
        topics: Topics,
        codec: EventCodec,
        replies: ReplyTargets,
        stats: Any,
        trace: tracing.LoopTrace,
        observe: tracing.Observe,
    ) -> None:
        self.topics = topics
        self.codec = codec
        self.replies = replies
        self.stats = stats
        self.trace = trace
        self.observe = observe
        # The partitions of `locks`, known once a session has asked the broker: lock events that share one
        # travel as one record (polycommit/lock_log.py).
        self.lock_partitions: list[int] = [0]

    def publish(self, transition: Transition, record: Any, out: list[Outgoing]) -> None:
        state = transition.state
        tx_id = state["intent"]["tx_id"]
        traced = self.trace.headers()
        for command in transition.commands:
            topic = self.topics.commands(command["operation"]["store"])
            out.append(Outgoing(topic, tx_id, "StoreCommand", command, headers=traced))
        self.stats.commands += len(transition.commands)
        out.extend(Outgoing(self.topics.decisions, tx_id, "Decision", d, headers=traced) for d in transition.decisions)
        out.extend(self.lock_events(transition.lock_requests))
        for message in transition.partition_messages:  # to the partition that owns the keys
            asked = partition_record(message, state["updated_at_ms"])
            requested = Outgoing(
                self.topics.lock_requests, tx_id, "LockPartitionRequest", asked, message.partition, headers=traced
            )
            out.append(requested)
        for alert in transition.alerts:
            out.append(Outgoing(self.topics.alerts, tx_id, "Alert", alert))
            self.observe("alert", 1, {"kind": alert["kind"], "tx_id": tx_id})
        for error in transition.rejections:
            self.reject(record, tx_id, error, out)
        target = self.replies.target(state["intent"]["reply_to"]) if transition.lock_replies else None
        if target is not None:  # to the client's own partition, like its result
            topic, partition = target
            replies = transition.lock_replies
            out.extend(Outgoing(topic, tx_id, "LockReply", a, partition, headers=traced) for a in replies)
        if transition.result is not None:
            self.publish_result(state, transition.result, out, traced)

    def lock_events(self, events: list[LockEvent]) -> list[Outgoing]:
        """Lock events go to `locks` keyed by resource: each key's events in one partition, in order; those
        of a transaction alike but for their resource, one record per partition (polycommit/lock_log.py)."""
        records = lock_log.merged(events, self.lock_partitions)
        return [Outgoing(self.topics.locks, record["resource"], "LockEvent", record) for record in records]

    def reject(self, record: Any, tx_id: str, error: ErrorInfo, out: list[Outgoing]) -> None:
        """The input record is poison for its protocol: it is kept for inspection as a dead letter."""
        if record is None:
            log.error("%s: %s: %s (no input record to keep)", tx_id, error["error_class"], error["message"])
            return
        letter = dead_letter(
            record, PermanentError(f"{error['error_class']}: {error['message']}"), "coordinator", tx_id
        )
        letter["error_class"] = error["error_class"]
        out.append(Outgoing(self.topics.dead_letters, tx_id, "DeadLetter", letter))
        self.stats.dead_letters += 1
        self.observe("dead_letter", 1, COORDINATOR_LABELS)

    def publish_result(
        self, state: TxState, result: TransactionResult, out: list[Outgoing], traced: tracing.Headers | None = None
    ) -> None:
        tx_id = result["tx_id"]
        self.stats.results[result["status"]] = self.stats.results.get(result["status"], 0) + 1
        self.observe("transaction", 1, {"protocol": registry.protocol_of(state), "outcome": result["status"].lower()})
        encoded = self.codec.encode("TransactionResult", result)  # once, for both topics
        out.append(Outgoing(self.topics.results, tx_id, "TransactionResult", result, encoded=encoded))
        target = self.replies.target(state["intent"]["reply_to"])
        if target is not None:
            reply = Outgoing(target[0], tx_id, "TransactionResult", result, target[1], encoded, headers=traced)
            out.append(reply)
