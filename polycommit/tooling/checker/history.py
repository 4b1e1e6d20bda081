"""The history a workload keeps for the checker: what it sent, and every result it heard.

The statuses are the fold of `projections.results`; `recover_from_log` adds what the `results` topic
holds for results a client missed (a client killed, or one that gave up waiting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polycommit.client import Transaction, TransactionResult
from polycommit.config import Settings
from projections import results
from projections.results import TERMINAL

# The status of a transaction the log shows no result for: still running, its keys not yet judged.
IN_FLIGHT = "in-flight"


@dataclass
class History:
    """Transactions as invoked (by id, in order) and every status reported for each, in arrival order.

    `open_is_pending`: a transaction with no result is still in flight (the view of `polycommit check`,
    which reads the log of a running system), not lost (the view of a workload after recovery)."""

    intents: dict[str, Transaction] = field(default_factory=dict)
    results: dict[str, list[str]] = field(default_factory=dict)
    open_is_pending: bool = False

    def invoke(self, transaction: Transaction) -> None:
        self.intents[transaction.tx_id] = transaction

    def record(self, tx_id: str, status: str) -> None:
        """A result heard for `tx_id` (a repeat of the last status heard is not counted twice)."""
        results.heard(self.results.setdefault(tx_id, []), status)

    def record_result(self, result: TransactionResult) -> None:
        self.record(result.tx_id, result.status)

    def final(self, tx_id: str) -> str | None:
        """The last terminal status heard, else the last status (e.g. `stuck`), else None."""
        return results.final(self.results.get(tx_id, []))

    def statuses(self, absent: str = "none") -> dict[str, int]:
        """Transactions by final status (sorted), `absent` for those with no result heard."""
        found: dict[str, int] = {}
        for tx_id in self.intents:
            status = self.final(tx_id) or absent
            found[status] = found.get(status, 0) + 1
        return dict(sorted(found.items()))

    def forget(self, tx_ids: set[str]) -> int:
        """Drop invoked transactions that have no result and never will (nothing of them reached the log);
        returns how many were dropped."""
        dropped = [t for t in tx_ids if t in self.intents and self.final(t) is None]
        for tx_id in dropped:
            del self.intents[tx_id]
        return len(dropped)

    def missing(self) -> list[str]:
        """Invoked transactions with no terminal result yet."""
        return [t for t in self.intents if self.final(t) not in TERMINAL]

    async def recover_from_log(self, settings: Settings) -> int:
        """Read the `results` topic from the start and record every result of an invoked transaction;
        returns how many transactions gained a terminal status."""
        from polycommit.bus import read_topic, topics_for
        from polycommit.codec import default_codec

        codec = default_codec()
        before = set(self.missing())
        found: list[tuple[str, str]] = []

        def handle(record: Any) -> None:
            key = record.key.decode() if record.key else ""
            if key in self.intents and record.value is not None:
                event = codec.decode_as(record.value, "TransactionResult")
                found.append((str(event["tx_id"]), str(event["status"])))

        await read_topic(settings, topics_for(settings).results, handle)
        self.results = results.merge(self.results, results.fold(found))
        return len(before - set(self.missing()))
