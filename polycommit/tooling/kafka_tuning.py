"""Process-wide aiokafka tuning that polycommit's own processes apply at start, never on import.

The tuning changes a private constant of aiokafka, which every producer of the process shares: an
application that imports the polycommit library must keep aiokafka's own behaviour for its producers,
so only the processes polycommit runs itself (the CLI's commands — `run`, `consumer`, `recover`, the demo,
the benchmark, chaos — and an in-process `Runtime`) call `apply()`.
"""

from __future__ import annotations

from aiokafka.producer import sender as aiokafka_sender

# After a Kafka transaction commits, the broker spends a few milliseconds writing its markers; the next
# transaction's first request meanwhile gets CONCURRENT_TRANSACTIONS and aiokafka waits a fixed 20 ms
# before retrying. The coordinator commits one transaction per loop, back to back, so that wait was most
# of each loop (measured: 27 ms per transaction with 20 ms, 8 ms with 2 ms). 2 ms costs a few more
# retries and nothing else.
CONCURRENT_TRANSACTIONS_BACKOFF_S = 0.002


def apply() -> None:
    """Shorten aiokafka's CONCURRENT_TRANSACTIONS retry backoff for this process (idempotent).

    aiokafka's sender reads the module constant at each retry, so setting it before or after producers
    are created both take effect."""
    aiokafka_sender.BACKOFF_OVERRIDE = CONCURRENT_TRANSACTIONS_BACKOFF_S


def applied() -> bool:
    """Whether this process runs with the tuning (for reports and tests)."""
    return bool(aiokafka_sender.BACKOFF_OVERRIDE == CONCURRENT_TRANSACTIONS_BACKOFF_S)
