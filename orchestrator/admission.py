"""What the driver checks of an intent before its protocol sees it: the record's key and the reply address.

Only the driver can check these (they are about the Kafka record and the cluster), and a client's mistake
in either must never reach the coordinator's own Kafka transaction or state: a result sent to a topic or
partition that does not exist fails that transaction, so the same intent would come back forever; one
sent to polycommit's own topics would corrupt them; an intent keyed by something else than its tx_id
lands on a partition that may not hold its transaction's outcomes and snapshot. The verdict goes to the
protocol's `start` as a refusal: the transaction fails with the typed error and its intent becomes a
dead letter. The same goes for an intent older than the marker retention (`expiry_refusal`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

from orchestrator.positions import RESERVED_PREFIX, is_reserved
from polycommit.bus import Publisher, Topics
from polycommit.canonical import canonical_intent
from polycommit.errors import ExpiredIntentError, InvalidIntentKeyError, InvalidOperationError, InvalidReplyToError
from polycommit.events import ErrorInfo, TransactionIntent, error_info


def reply_target(reply_to: str) -> tuple[str, int | None] | None:
    """`topic` or `topic:partition` -> (topic, partition); empty -> None."""
    if not reply_to:
        return None
    topic, _, partition = reply_to.rpartition(":")
    if topic and partition.isdigit():
        return topic, int(partition)
    return reply_to, None


def canonical_or_refusal(intent: TransactionIntent) -> tuple[TransactionIntent, ErrorInfo | None]:
    """The intent in canonical form (any producer's JSON compares as the SDK's), or why it cannot be.

    Lock keys and batch grouping compare JSON text as strings, so this runs before anything else reads
    the operations; JSON that does not parse refuses the intent like any other invalid operation."""
    try:
        return canonical_intent(intent), None
    except InvalidOperationError as exc:
        return intent, error_info(exc.error_class, str(exc), False)


def key_refusal(key: bytes | None, tx_id: str) -> ErrorInfo | None:
    """An intent keyed by anything but its tx_id may land on another partition than the transaction's
    outcomes and snapshot, which breaks per-transaction ordering and state ownership. A tx id in the
    changelog's reserved key space (orchestrator/positions.py) would overwrite the coordinator's records."""
    if is_reserved(tx_id):
        message = f"tx id {tx_id[:100]!r} starts with {RESERVED_PREFIX!r}, which polycommit keeps for its own records"
        return error_info(InvalidIntentKeyError.__name__, message, False)
    if key is not None and key == tx_id.encode():
        return None
    shown = "no key" if key is None else f"key {key[:100]!r}"
    message = f"the intent of {tx_id} has {shown}: intents must be keyed by their tx_id"
    return error_info(InvalidIntentKeyError.__name__, message, False)


def expiry_refusal(intent: TransactionIntent, now: int, retention_ms: int) -> ErrorInfo | None:
    """An intent created longer ago than the marker retention is refused: `polycommit prune` may have
    removed its markers, and without them its steps could apply a second time. Within the window the
    same intent sent again ends the same way (P4). A producer that sets no creation time (0) is admitted."""
    created = intent["created_at_ms"]
    if not created or now - created <= retention_ms:
        return None
    age_h = (now - created) / 3_600_000
    message = (
        f"the intent of {intent['tx_id']} was created {age_h:.1f} h ago, longer ago than the marker retention "
        f"({retention_ms / 3_600_000:.1f} h, POLYCOMMIT_MARKER_RETENTION): it is not run again"
    )
    return error_info(ExpiredIntentError.__name__, message, False)


@functools.cache
def _own_topics(topics: Topics) -> frozenset[str]:
    return frozenset(topics.all()) - {topics.replies}


def is_internal(topic: str, topics: Topics) -> bool:
    """polycommit's own topics (every one but `replies`, which exists for results) and Kafka's."""
    return topic in _own_topics(topics) or topic.startswith((f"{topics.prefix}.commands.", "__"))


def reply_to_problem(reply_to: str, topics: Topics, partitions: Collection[int] | None) -> str | None:
    """Why a result cannot go to `reply_to`, given the partitions its topic has (None: no such topic)."""
    target = reply_target(reply_to)
    if target is None:
        return None
    topic, partition = target
    if is_internal(topic, topics):
        return f"reply_to {reply_to!r} names an internal topic"
    if partitions is None:
        return f"reply_to {reply_to!r}: topic {topic!r} does not exist"
    if partition is not None and partition not in partitions:
        return f"reply_to {reply_to!r}: topic {topic!r} has no partition {partition} (it has {len(partitions)})"
    return None


async def cluster_topics(publisher: Publisher | None) -> Mapping[str, Collection[int]]:
    """Every topic of the cluster with its partitions, through a session's producer (none: nothing known)."""
    if publisher is None:
        return {}
    cluster = await publisher.producer.client.fetch_all_metadata()
    return {topic: cluster.partitions_for_topic(topic) or set() for topic in cluster.topics()}


@dataclass
class ReplyTargets:
    """The cluster's topics as the coordinator last saw them, to check reply addresses against.

    `fetch` reads every topic's partitions (one metadata request; asking for one unknown topic instead
    would make the producer wait out its request timeout). An address not in the cache refreshes it at
    most once per batch of input records, so a flood of bad intents costs one request per batch.
    """

    topics: Topics
    fetch: Callable[[], Awaitable[Mapping[str, Collection[int]]]]
    _partitions: Mapping[str, Collection[int]] | None = None
    _refreshed_this_batch: bool = False

    def new_batch(self) -> None:
        self._refreshed_this_batch = False

    async def load(self) -> None:
        """Read the cluster's topics now (a new session): results of restored transactions may be
        published before the restore that would otherwise load them has finished."""
        self._partitions = await self.fetch()

    async def refusal(self, reply_to: str) -> ErrorInfo | None:
        problem = reply_to_problem(reply_to, self.topics, self._known(reply_to))
        if problem is not None and not self._refreshed_this_batch and not self._internal(reply_to):
            self._partitions = await self.fetch()  # a topic or partition created since the last look
            self._refreshed_this_batch = True
            problem = reply_to_problem(reply_to, self.topics, self._known(reply_to))
        return None if problem is None else error_info(InvalidReplyToError.__name__, problem, False)

    def target(self, reply_to: str) -> tuple[str, int | None] | None:
        """Where to send a result besides `results`: only an address the cache shows valid."""
        if reply_to_problem(reply_to, self.topics, self._known(reply_to)) is not None:
            return None
        return reply_target(reply_to)

    def _known(self, reply_to: str) -> Collection[int] | None:
        target = reply_target(reply_to)
        return None if target is None or self._partitions is None else self._partitions.get(target[0])

    def _internal(self, reply_to: str) -> bool:
        target = reply_target(reply_to)
        return target is not None and is_internal(target[0], self.topics)
