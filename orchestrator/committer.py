"""The transactional producer a coordinator member commits its loops with, and whose Kafka transactional id.

Kafka fences a producer when another one initialises the same transactional id: the older one's open
transaction is aborted and its next request fails with ProducerFenced. That is what keeps a member that
was given up for dead (a stall longer than the session timeout) from committing on top of its successor.

- `partitioned` members each own a share of the partitions under their own instance's id, opened with
  the session (a restarted process with the same name fences its predecessor).
- `active-standby` (orchestrator/members.py): the work has one owner, so the id is the *role's*,
  `<prefix>-coordinator-active`, opened only by the member the group makes active, each time it does,
  before it restores the state: its initialisation fences whoever was active before and aborts their
  open transaction at once, so neither a zombie's late commit lands nor a dead member's unfinished
  transaction holds the read_committed consumers back until its transaction timeout. A standby opens none
  (opening it would fence the active member).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from polycommit.bus import Outgoing, Publisher
from polycommit.codec import EventCodec
from polycommit.config import Settings
from polycommit.failpoints import failpoint

log = logging.getLogger(__name__)


def active_transactional_id(topic_prefix: str) -> str:
    return f"{topic_prefix}-coordinator-active"


@dataclass
class Committer:
    settings: Settings
    codec: EventCodec
    transactional_id: str
    per_session: bool  # partitioned: opened with the session; active-standby: when this member is made active
    publisher: Publisher | None = None
    wanted: bool = False  # active-standby: this member was given the work
    stale: bool = False  # given it anew: open a producer of a new epoch before the next restore or commit
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def session_started(self) -> None:
        if self.per_session:
            await self._open()

    async def assigned(self, owned: set[int]) -> None:
        """Active-standby, when the group assigns: given the work, a fresh producer under the role's id (a
        new epoch even if this member was active before: the group may have made another active between),
        opened now, before the restore; standing by, none. A commit in progress finishes first (the lock)."""
        if self.per_session:
            return
        self.wanted, self.stale = bool(owned), True
        await self.ready()

    async def ready(self) -> None:
        """The producer is open and of the latest assignment's epoch. Also called by the restore, since
        records of new partitions can reach the loop before the assignment callback has run."""
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> None:
        """Active-standby: none while standing by; given the work, one of the latest assignment's epoch."""
        if self.per_session or not (self.stale or self.wanted != (self.publisher is not None)):
            return
        await self._close()
        if self.wanted:
            await self._open()  # InitProducerId: fences the member active before, aborts its transaction
        self.stale = False

    async def close(self) -> None:
        async with self._lock:
            await self._close()
        self.wanted = False

    async def _close(self) -> None:
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            await publisher.stop()

    async def _open(self) -> None:
        publisher = Publisher(
            self.settings, transactional_id=self.transactional_id, codec=self.codec, client_id="coordinator"
        )
        await publisher.start()
        self.publisher = publisher

    async def commit(self, out: list[Outgoing], decided: bool) -> bool:
        """One Kafka transaction: the records (among them the inputs' positions, orchestrator/positions.py),
        then commit (aborted on any failure); whether it committed. Under the lock: a producer is never
        replaced (closed) in the middle of a transaction, which would leave the transaction, and every later
        loop waiting for it, hanging."""
        async with self._lock:
            await self._ensure()
            publisher = self.publisher
            if publisher is None:
                # Made a standby while the loop folded a batch: its inputs are another member's now, and
                # their positions were not committed, so that member reads them again and does the work. The
                # loop's epoch check (orchestrator/rebalance.py) drops such a batch before it gets here;
                # this is the same rule where the producer is, so no path commits without one.
                log.warning("a batch folded before this member stood by is dropped (%d records)", len(out))
                return False
            await publisher.producer.begin_transaction()
            try:
                await publisher.publish(out)
                failpoint("coordinator.before_commit")
                await publisher.producer.commit_transaction()
                failpoint("coordinator.after_commit")
                if decided:
                    failpoint("coordinator.after_decision")  # the commit point passed, nothing else done
            except BaseException as failure:
                await _abort(publisher, failure)
                raise
            return True


async def _abort(publisher: Publisher, failure: BaseException) -> None:
    """Abort the transaction a failure ended. A producer whose sender failed outright is in a fatal state
    and cannot abort (aiokafka asserts, seen in a chaos run: EndTxn answered UnknownError while the broker
    restarted): the failure that ended the transaction is the one raised, so the session starts over with
    a new producer, whose InitProducerId aborts what this one left open."""
    try:
        await publisher.producer.abort_transaction()
    except Exception as abort_failure:
        log.warning("the failed Kafka transaction could not be aborted (%r) after %r", abort_failure, failure)
