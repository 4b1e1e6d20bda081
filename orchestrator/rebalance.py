"""What a coordinator member does when the group moves partitions, and why a loop caught in it starts over.

aiokafka runs the rebalance callbacks in its own background task, so they interleave with the member's
loop at any await: while the loop folds a batch (a restore, a reply-address lookup) or waits for the
previous Kafka transaction before committing its own. The callbacks give the revoked partitions up
(commit what earlier loops put off, drop their states) and restore the assigned ones from the changelog.
A loop caught in between holds a batch read under the old assignment and folded over states that no
longer exist: committing it would publish commands and offsets the restored states know nothing of (the
member would then ignore those transactions' outcomes, and they would hang), or fold the rest of the batch
over restored states it already changed. So every rebalance starts a new *epoch*; a loop that began in an
older one commits nothing, drops what it folded, and restores its partitions afresh (`start_over`). Its
inputs' positions were not committed, and the restore moves the consumer to the committed ones
(orchestrator/positions.py), so the same records come again and are folded once, over the right states.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiokafka import ConsumerRebalanceListener, TopicPartition

from orchestrator.members import report_assignment

if TYPE_CHECKING:
    from orchestrator.service import CoordinatorService

log = logging.getLogger("orchestrator.service")  # a loop's fate is the service's story


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: CoordinatorService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        service = self.service
        # The transaction in flight, and what earlier loops put off, still commit positions of these
        # partitions: they were read and folded under the assignment that ends now.
        await service.flush()
        await service.drain(reraise=False)
        service.epoch += 1  # a loop still folding or committing now belongs to the assignment that ended
        service.owned = set()
        service.forget({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        owned = {tp.partition for tp in assigned}  # the whole assignment (eager rebalance)
        service = self.service
        service.owned = owned
        shared = service.partitioned is not None  # every member asks one lock manager
        report_assignment(service.instance, owned, service.transactions.partitions, service.standby, shared)
        await service.committer.assigned(owned)  # made active: fences the member active before (committer.py)
        await service.restore(owned)


async def start_over(service: CoordinatorService) -> None:
    """Drop what a loop folded under an assignment that ended, and what loops put off since: their inputs'
    positions were not committed, so the restore moves the consumer back to the committed ones and the
    records are read again. The states they may have changed are restored afresh from the changelog."""
    service.stats.loops_started_over += 1
    log.info("a rebalance ran while a loop folded or committed: its batch is dropped and read again")
    service.deferred.clear()
    service.forget(set(range(service.transactions.partitions)))
    await service.restore(service.owned)
